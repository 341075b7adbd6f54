"""Word measurement and word images, cached, so a page is a composite of cached words.

Why this design: FreeType runs the hinting bytecode of Noto fonts for every glyph it rasterises
(~100 µs per glyph with Pillow), so drawing a dense A4 page (~5,000 glyphs) with Pillow costs ~0.4 s.
Here every glyph is rasterised once per (face, size), and a word's image is assembled from its glyphs
once and cached.

Positions follow what Pillow+raqm would draw: advances and pair kerning are HarfBuzz's (measured once
per face at a 1000 px reference size, so they are exact at every size), and each glyph lands on the
pixel nearest its pen position. Ligatures are not formed (``fi`` stays two glyphs), which keeps the
one-character-one-glyph ground truth simple. Words in complex scripts (Arabic, Hebrew, Indic, Thai,
anything with combining marks) are shaped as a whole by raqm instead, and cached the same way.

Two forms of the same word ink: :meth:`Typesetter.image`, a numpy coverage bitmap (the exact painter
composes these with numpy), and :meth:`Typesetter.sprite`, a Pillow image in paper space (255 = paper,
0 = full ink) that the fast painter pastes onto white paper with Pillow's C paste, ~0.5 µs a word. A
sprite of a simple word (one face, no shaping) is pasted together from glyph sprites at the glyph
positions of :meth:`image`, so both forms hold exactly the same pixels; other words convert their
bitmap. ASCII words of the primary face (nearly all words of English text and code) are measured and
assembled many at a time, their glyph arithmetic done by numpy for the batch: an open vocabulary
brings ~100 new words to every dense page, and per-character Python for each would cost more than
painting the page.
"""
from __future__ import annotations

import functools
import threading
import unicodedata
from dataclasses import dataclass
from itertools import compress
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from optictx.render.fonts import FontFile, FontStack, coverage, font_stack, load_font

REF_SIZE = 1000
BATCH_WORD_CHARS = 64
"""ASCII words up to this long are measured and drawn many at a time with numpy (one padded row each)."""
MIN_BATCH = 48
"""Fewer new words than this are measured one by one."""
NO_LIGATURES = ["-liga", "-clig", "-dlig"]
WORD_CACHE_BYTES = 32 << 20
"""Word bitmaps (and, apart, word sprites) kept per typesetter before that cache is dropped (~10k words
of a 24 px font)."""
ADVANCE_CACHE_WORDS = 500_000
"""Word advances kept per typesetter (a float per word) before that cache is dropped."""

_COMPLEX_RANGES = ((0x0590, 0x08FF), (0x0900, 0x0DFF), (0x0E00, 0x0FFF), (0x1000, 0x109F),
                   (0x1780, 0x17FF), (0xFB1D, 0xFDFF), (0xFE70, 0xFEFF))
_CJK_RANGES = ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
               (0x20000, 0x3FFFF))


@functools.lru_cache(maxsize=None)
def is_complex(ch: str) -> bool:
    """Needs shaping (contextual forms, reordering or mark positioning), so glyphs cannot be pasted."""
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _COMPLEX_RANGES) or unicodedata.category(ch) in ("Mn", "Mc", "Me")


@functools.lru_cache(maxsize=None)
def is_cjk(ch: str) -> bool:
    """Ideographs, kana, hangul, CJK punctuation and full-width forms: a line may break around each one."""
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _CJK_RANGES)


@functools.lru_cache(maxsize=None)
def bidi_class(ch: str) -> str:
    """'R' for right-to-left letters, 'L' for left-to-right letters, 'N' for everything else."""
    b = unicodedata.bidirectional(ch)
    return "R" if b in ("R", "AL") else "L" if b == "L" else "N"


def _shaped(text: str) -> bool:
    """Must be shaped by raqm as a whole (complex script or right-to-left), not pasted glyph by glyph."""
    return not text.isascii() and (any(map(is_complex, text)) or strong_direction(text) == "R")


def strong_direction(text: str) -> str:
    """Direction of the first strong character ('L', 'R'), or 'N' when there is none (digits, marks)."""
    for ch in text:
        d = bidi_class(ch)
        if d != "N":
            return d
    return "N"


class Sprite(NamedTuple):
    """Ink of a word or glyph as a Pillow core image in paper space (255 = paper, 0 = full ink), whose
    top-left sits at (pen + left, baseline + top); ``width`` x ``bottom - top`` pixels (width 0: no ink)."""

    image: object  # PIL ImagingCore
    left: int
    top: int
    width: int
    bottom: int


NO_INK = Sprite(None, 0, 0, 0, 0)


# Pillow's core image calls (Image.core.fill, ImagingCore.paste / crop / chop_darker) are the C functions
# behind Image.new, Image.paste and ImageChops.darker without their Python-level argument handling: a paste
# costs ~0.5 us instead of ~6 us, and a dense page pastes ~700 words and, for new words, ~1000 glyphs.
CORE = type(Image.core.fill("L", (1, 1), 0))  # Pillow's ImagingCore class: CORE.paste(dst, src, box)


def blank(width: int, height: int):
    """A white (paper) core image."""
    return Image.core.fill("L", (width, height), 255)


def paste_darker(dst, src, box: tuple[int, int, int, int]) -> None:
    """Paste ``src`` into ``dst`` at ``box`` keeping the darker pixel: ink that overlaps ink already there
    composes as the maximum of the coverages, as the word bitmaps do. Parts outside ``dst`` are dropped."""
    dst.paste(dst.crop(box).chop_darker(src), box)


def to_sprite(mask: np.ndarray, left: int, top: int) -> Sprite:
    """A coverage mask (uint8, 255 = full ink) at (left, top) -> its paper-space sprite."""
    h, w = mask.shape
    if not mask.size:
        return NO_INK
    return Sprite(Image.frombytes("L", (w, h), (255 - mask).tobytes()).im, left, top, w, top + h)


@dataclass(frozen=True, slots=True)
class WordImage:
    """Ink of a word: ``mask`` (uint8 coverage) whose top-left sits at (pen + left, baseline + top).

    ``strip`` is the same ink padded to the typesetter's fixed line-strip rows, so the words of a line
    can be joined with one ``np.concatenate`` and blitted once; None when the ink is taller than the strip.
    """

    mask: np.ndarray
    left: int
    top: int
    advance: float
    strip: np.ndarray | None
    width: int = 0  # ink columns and the row below the ink (top + rows): fields because the paint loop
    bottom: int = 0  # reads them for every word


class FaceMetrics:
    """Size-independent advances and kerning of one face, in ems (HarfBuzz values via Pillow raqm).

    ``adv`` is keyed by character and ``kern`` by the two-character string; both fill on first use.
    """

    def __init__(self, ff: FontFile):
        self.font = load_font(ff, REF_SIZE)
        self.shaped = self.font.layout_engine == 1  # raqm: kerning available
        self.adv: dict[str, float] = {}
        self.kern: dict[str, float] = {}
        self._ascii_adv = np.full(128, np.nan)  # the same values as adv / kern for ASCII, as arrays
        self._ascii_kern = np.full((128, 128), np.nan)

    def advance(self, ch: str) -> float:
        got = self.adv.get(ch)
        if got is None:
            got = self.adv[ch] = self.font.getlength(ch) / REF_SIZE
        return got

    def kerning(self, pair: str) -> float:
        got = self.kern.get(pair)
        if got is None:
            a, b = pair
            if not self.shaped or is_cjk(a) or is_cjk(b):  # CJK faces kern nothing worth measuring
                got = 0.0
            else:
                got = self.font.getlength(pair, features=NO_LIGATURES) / REF_SIZE - self.advance(a) - self.advance(b)
            self.kern[pair] = got
        return got

    def pens(self, text: str) -> tuple[list[float], float]:
        """Pen position (ems) of each character of a simple run, and the run's advance."""
        adv, kern = self.adv, self.kern
        try:
            pens, pen = [0.0], adv[text[0]]
            for i in range(1, len(text)):
                pen += kern[text[i - 1:i + 1]]
                pens.append(pen)
                pen += adv[text[i]]
            return pens, pen
        except KeyError:  # first sight of a character or pair: measure, then take the fast path
            for i, ch in enumerate(text):
                self.advance(ch)
                if i:
                    self.kerning(text[i - 1:i + 1])
            return self.pens(text)

    def length(self, text: str) -> float:
        """``pens(text)[1]`` without the list of pens: the same additions in the same order."""
        adv, kern = self.adv, self.kern
        try:
            pen = adv[text[0]]
            for i in range(1, len(text)):
                pen += kern[text[i - 1:i + 1]]
                pen += adv[text[i]]
            return pen
        except KeyError:
            return self.pens(text)[1]

    def ascii_pens(self, words: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`pens` of many ASCII words in one numpy pass: (codes, word index, pen) of every
        character, and each word's advance.

        Bit-identical to :meth:`pens`: a word is a row ``[adv0, kern01, adv1, kern12, ...]`` summed left
        to right by ``np.cumsum`` along the row, the same additions in the same order as the Python loop.
        """
        lens = np.fromiter(map(len, words), np.intp, len(words))
        codes = np.frombuffer("".join(words).encode("ascii"), np.uint8)
        word = np.repeat(np.arange(len(words)), lens)
        pos = np.arange(len(codes)) - (np.cumsum(lens) - lens)[word]  # index inside the word
        inner = np.flatnonzero(pos < lens[word] - 1)  # characters with a right neighbour in the word
        left, right = codes[inner], codes[inner + 1]
        adv, kern = self._ascii_tables(codes, left, right)
        rows = np.zeros((len(words), 2 * int(lens.max())))
        rows[word, 2 * pos] = adv[codes]
        rows[word[inner], 2 * pos[inner] + 1] = kern[left, right]
        acc = np.cumsum(rows, axis=1)
        return codes, word, np.where(pos > 0, acc[word, 2 * pos - 1], 0.0), acc[:, -1]

    def _ascii_tables(self, codes: np.ndarray, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The advance and kerning arrays, after measuring what these characters and pairs still lack."""
        adv, kern = self._ascii_adv, self._ascii_kern
        for c in np.unique(codes[np.isnan(adv[codes])]).tolist():
            adv[c] = self.advance(chr(c))
        unknown = np.isnan(kern[left, right])
        if unknown.any():
            for pair in np.unique(left[unknown].astype(np.intp) * 128 + right[unknown]).tolist():
                a, b = divmod(pair, 128)
                kern[a, b] = self.kerning(chr(a) + chr(b))
        return adv, kern


@functools.lru_cache(maxsize=64)
def face_metrics(ff: FontFile) -> FaceMetrics:
    return FaceMetrics(ff)


def _rasterise(font, text: str) -> tuple[np.ndarray, int, int]:
    """Draw ``text`` with its pen at (0, baseline 0); return the tight ink crop and its offset."""
    l, t, r, b = font.getbbox(text, anchor="ls")
    pad = int(font.size) // 4 + 2  # bboxes from metrics can miss overshooting ink; pad, then trim
    im = Image.new("L", (max(1, r - l + 2 * pad), max(1, b - t + 2 * pad)))
    ox, oy = pad - l, pad - t
    ImageDraw.Draw(im).text((ox, oy), text, font=font, fill=255, anchor="ls")
    bbox = im.getbbox()
    if bbox is None:
        return np.zeros((0, 0), np.uint8), 0, 0
    return np.array(im.crop(bbox)), bbox[0] - ox, bbox[1] - oy


class Typesetter:
    """Measures and draws words for one font stack at one pixel size; everything is cached."""

    def __init__(self, stack: FontStack, size: int):
        self.stack, self.size = stack, size
        self._fonts: dict[int, object] = {}
        self.ascent, self.descent = self.font(0).getmetrics()
        pad = max(2, size // 4)
        self.strip_top = -(self.ascent + pad)  # rows of a line strip, relative to the baseline
        self.strip_h = self.ascent + self.descent + 2 * pad
        self._gaps = [np.zeros((self.strip_h, w), np.uint8) for w in range(2 * size)]
        self.space = face_metrics(stack.fonts[0]).advance(" ") * size
        self._adv: dict[str, float] = {}
        self._img: dict[str, WordImage] = {}
        self._img_bytes = 0
        self._glyph: dict[tuple[int, str], tuple[np.ndarray, int, int]] = {}
        self._sprite_lock = threading.Lock()
        self._sprite_ids: dict[str, int] = {}  # word -> index into _sprite_images and _sprite_boxes
        self._sprite_images: list = []
        self._sprite_boxes = np.zeros((1024, 4), np.int64)  # left, top, width, bottom by sprite id
        self._sprite_bytes = 0
        self._glyph_sprite: dict[tuple[int, str], Sprite] = {}
        self._ascii_glyph_table = (np.zeros((128, 4), np.int64), [None] * 128, np.zeros(128, bool))
        self._metrics0 = face_metrics(stack.fonts[0])
        primary = coverage(stack.fonts[0])
        self._ascii_ok = all(cp in primary for cp in range(0x21, 0x7F))  # ASCII words: one run, no lookups

    def font(self, face: int):
        f = self._fonts.get(face)
        if f is None:
            f = self._fonts[face] = load_font(self.stack.fonts[face], self.size)
        return f

    def runs(self, word: str) -> list[tuple[int, str]]:
        """Split a word into (face, text) runs. Neutral characters (digits, punctuation) stay in the
        current run's face when it has them, so "مرحبا." is one Arabic run shaped as a whole."""
        if self._ascii_ok and word.isascii():
            return [(0, word)]
        runs: list[list] = []
        for ch in word:
            face = -1
            if runs and bidi_class(ch) == "N" and self.stack.face_of(ch) >= 0:
                cur = runs[-1][0]
                if ord(ch) in coverage(self.stack.fonts[cur]):
                    face = cur
            if face < 0:
                face = self.stack.face_of(ch)
            if runs and runs[-1][0] == face:
                runs[-1][1] += ch
            else:
                runs.append([face, ch])
        return [(f, t) for f, t in runs]

    def _run_advance(self, face: int, text: str) -> float:
        if _shaped(text):
            return self.font(face).getlength(text)
        return face_metrics(self.stack.fonts[face]).pens(text)[1] * self.size

    def advance(self, word: str, cache: bool = True) -> float:
        """Pen advance of ``word`` in pixels (fractional, as HarfBuzz positions it)."""
        got = self._adv.get(word)
        if got is None:
            if self._ascii_ok and word.isascii():  # one run of the primary face, as runs() would say
                got = self._metrics0.length(word) * self.size
            else:
                got = sum(self._run_advance(f, t) for f, t in self.runs(word))
            if cache:
                if len(self._adv) >= ADVANCE_CACHE_WORDS:
                    self._adv.clear()
                self._adv[word] = got
        return got

    def _batchable(self, words) -> list[str]:
        """Words that :meth:`measure` and :meth:`sprites` handle in one numpy pass: ASCII of the
        primary face (one run, no shaping), not too long for a padded row."""
        if not self._ascii_ok:
            return []
        return [w for w in words if w.isascii() and len(w) <= BATCH_WORD_CHARS]

    def measure(self, words: list[str]) -> None:
        """Cache the advances of many words at once: the same values as :meth:`advance`, computed for
        all the batchable ones in one numpy pass instead of a Python loop per character."""
        new = [w for w in dict.fromkeys(words) if w not in self._adv]
        fast = self._batchable(new)
        if len(fast) >= MIN_BATCH:  # below this, numpy's per-call overhead costs more than it saves
            ends = self._metrics0.ascii_pens(fast)[3] * self.size
            if len(self._adv) + len(fast) > ADVANCE_CACHE_WORDS:
                self._adv.clear()
            self._adv.update(zip(fast, ends.tolist()))
        for w in new:
            self.advance(w)

    def _stripped(self, mask: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, int, int, np.ndarray | None]:
        """Add the bitmap padded to the line-strip rows (None when its ink is taller than the strip)."""
        row = dy - self.strip_top
        if not mask.size or row < 0 or row + mask.shape[0] > self.strip_h:
            return mask, dx, dy, None
        strip = np.zeros((self.strip_h, mask.shape[1]), np.uint8)
        strip[row:row + mask.shape[0]] = mask
        return strip[row:row + mask.shape[0]], dx, dy, strip

    def _glyph_of(self, face: int, ch: str) -> tuple[np.ndarray, int, int, np.ndarray | None]:
        key = (face, ch)
        g = self._glyph.get(key)
        if g is None:
            g = self._glyph[key] = self._stripped(*_rasterise(self.font(face), ch))
        return g

    def _gap(self, width: int) -> np.ndarray:
        """Zero columns between glyphs or words; small widths are shared arrays, never written to."""
        if width < len(self._gaps):
            return self._gaps[width]
        return np.zeros((self.strip_h, width), np.uint8)

    def _run_pieces(self, face: int, text: str, x0: float) -> list[tuple[np.ndarray, int, int, np.ndarray | None]]:
        """Bitmaps of one run (mask, x, y, strip) with integer offsets from the word's pen origin."""
        if _shaped(text):
            mask, dx, dy, strip = self._stripped(*_rasterise(self.font(face), text))
            return [(mask, round(x0) + dx, dy, strip)] if mask.size else []
        pens, _ = face_metrics(self.stack.fonts[face]).pens(text)
        glyph, size, pieces = self._glyph.get, self.size, []
        for ch, pen in zip(text, pens):
            g = glyph((face, ch)) or self._glyph_of(face, ch)
            if g[0].size:
                pieces.append((g[0], round(x0 + pen * size) + g[1], g[2], g[3]))
        return pieces

    def image(self, word: str) -> WordImage:
        """The word's ink, assembled from cached glyphs (or shaped whole for complex scripts)."""
        got = self._img.get(word)
        if got is not None:
            return got
        runs = self.runs(word)
        got = self._simple_image(word) if len(runs) == 1 and not runs[0][0] and not _shaped(word) else None
        if got is None:
            if strong_direction(word) == "R":
                runs = runs[::-1]  # runs of an RTL word are laid out right to left
            pieces, x = [], 0.0
            for face, text in runs:
                pieces += self._run_pieces(face, text, x)
                x += self._run_advance(face, text)
            got = self._assemble(pieces, x)
        if self._img_bytes > WORD_CACHE_BYTES:
            self._img.clear()
            self._img_bytes = 0
        self._img[word] = got
        self._img_bytes += (got.mask.nbytes if got.strip is None else got.strip.nbytes) + 200
        return got

    def _simple_image(self, word: str) -> WordImage | None:
        """The common case in one pass: a word of the primary face whose glyphs' ink never overlaps,
        joined left to right with shared zero gaps by one ``np.concatenate``. None if it does not apply."""
        m = face_metrics(self.stack.fonts[0])
        pens, end = m.pens(word)
        glyph, size, gaps = self._glyph.get, self.size, self._gaps
        parts, x1, cursor, top, bottom = [], None, 0, 1 << 30, -(1 << 30)
        for ch, pen in zip(word, pens):
            mask, dx, dy, strip = glyph((0, ch)) or self._glyph_of(0, ch)
            if not mask.size:
                continue
            if strip is None:
                return None
            x = round(pen * size) + dx
            if x1 is None:
                x1 = cursor = x
            elif x < cursor:
                return None
            elif x > cursor:
                parts.append(gaps[x - cursor] if x - cursor < len(gaps) else self._gap(x - cursor))
            parts.append(strip)
            cursor = x + mask.shape[1]
            top, bottom = min(top, dy), max(bottom, dy + mask.shape[0])
        if x1 is None:
            return self._assemble([], end * size)
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0].copy()
        st = self.strip_top
        return WordImage(out[top - st:bottom - st], x1, top, end * size, out, cursor - x1, bottom)

    def sprite(self, word: str) -> Sprite:
        """The word's ink as a paper-space sprite: the same pixels at the same place as :meth:`image`."""
        images, boxes = self.sprites([word])
        return Sprite(images[0], *boxes[0].tolist())

    def sprites(self, words: list[str]) -> tuple[list, np.ndarray]:
        """The words' sprites as a list of images and an array of their (left, top, width, bottom),
        building the missing ones (see :meth:`sprite`).

        ASCII words of the primary face are built together (:meth:`_ascii_sprites`); another word of one
        face that needs no shaping is pasted from glyph sprites (:meth:`_pasted_sprite`); the rest
        (raqm-shaped, or mixing faces) convert their word bitmap (:meth:`image`). Under a lock, and the
        answer is the caller's own copy: the cache is shared by threads and dropped when it grows too big.
        """
        with self._sprite_lock:
            ids = list(map(self._sprite_ids.get, words))
            if None in ids:
                self._add_sprites(words)
                ids = list(map(self._sprite_ids.__getitem__, words))
            return list(map(self._sprite_images.__getitem__, ids)), self._sprite_boxes[ids]

    def _add_sprites(self, words: list[str]) -> None:
        if self._sprite_bytes > WORD_CACHE_BYTES:  # dropped between pages, never while one is drawn
            self._sprite_ids.clear()
            self._sprite_images.clear()
            self._sprite_bytes = 0
        new = list(dict.fromkeys(w for w in words if w not in self._sprite_ids))
        fast = self._batchable(new)
        if fast:
            self._keep_all(fast, *self._ascii_sprites(fast))
        for word in new:
            if word not in self._sprite_ids:
                runs = self.runs(word)
                if len(runs) == 1 and not _shaped(word):
                    self._keep(word, self._pasted_sprite(runs[0][0], word))
                else:
                    img = self.image(word)
                    self._keep(word, to_sprite(img.mask, img.left, img.top))

    def _keep(self, word: str, got: Sprite) -> None:
        self._keep_all([word], [got.image], np.array([got[1:]], np.int64))

    def _keep_all(self, words: list[str], images: list, extents: np.ndarray) -> None:
        """Cache sprites given as their images and an array of (left, top, width, bottom) rows."""
        i, n = len(self._sprite_images), len(words)
        if i + n > len(self._sprite_boxes):
            grown = np.zeros((2 * (i + n), 4), np.int64)
            grown[:i] = self._sprite_boxes[:i]
            self._sprite_boxes = grown
        self._sprite_boxes[i:i + n] = extents
        self._sprite_images += images
        self._sprite_ids.update(zip(words, range(i, i + n)))
        self._sprite_bytes += int(extents[:, 2] @ (extents[:, 3] - extents[:, 1])) + 200 * n

    def _glyph_sprite_of(self, face: int, ch: str) -> Sprite:
        g = self._glyph_sprite.get((face, ch))
        if g is None:
            mask, dx, dy, _ = self._glyph_of(face, ch)
            g = self._glyph_sprite[(face, ch)] = to_sprite(mask, dx, dy)
        return g

    def _pasted_sprite(self, face: int, word: str) -> Sprite:
        """Glyph sprites pasted where :meth:`image` puts the glyphs (its pen rounded, plus the glyph's
        offset). A glyph whose columns reach into an earlier glyph's (a kerned or overhanging pair) is
        pasted darker-wins, the max of the coverages, as the word bitmaps compose."""
        pens, _ = face_metrics(self.stack.fonts[face]).pens(word)
        get, size = self._glyph_sprite.get, self.size
        placed = []
        for ch, pen in zip(word, pens):
            g = get((face, ch)) or self._glyph_sprite_of(face, ch)
            if g.width:
                placed.append((round(pen * size) + g.left, g))
        if not placed:
            return NO_INK
        x1, y1 = min(x for x, _ in placed), min(g.top for _, g in placed)
        x2, y2 = max(x + g.width for x, g in placed), max(g.bottom for _, g in placed)
        out = blank(x2 - x1, y2 - y1)
        cursor = x1
        for x, g in placed:
            box = (x - x1, g.top - y1, x - x1 + g.width, g.bottom - y1)
            if x >= cursor:  # columns of its own: a plain copy
                out.paste(g.image, box)
            else:
                paste_darker(out, g.image, box)
            cursor = max(cursor, x + g.width)
        return Sprite(out, x1, y1, x2 - x1, y2)

    def _ascii_sprites(self, words: list[str]) -> tuple[list, np.ndarray]:
        """:meth:`_pasted_sprite` for many ASCII words of the primary face, as (images, rows of left, top,
        width, bottom): glyph positions, word boxes and overlaps computed for all of them with numpy;
        left in Python is one paste per glyph."""
        codes, word, pens, _ = self._metrics0.ascii_pens(words)
        left, top, width, bottom, images = self._ascii_glyphs(codes)
        x = np.rint(pens * self.size).astype(np.int64) + left[codes]  # rint = round(): half to even
        inked = np.flatnonzero(width[codes] > 0)
        codes, word, x = codes[inked], word[inked], x[inked]
        x2, y1, y2 = x + width[codes], top[codes], bottom[codes]
        has_ink, first = np.unique(word, return_index=True)  # words with ink; their first glyph
        seg = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(x))))  # glyph -> inked word
        wx1, wy1 = np.minimum.reduceat(x, first), np.minimum.reduceat(y1, first)
        wx2, wy2 = np.maximum.reduceat(x2, first), np.maximum.reduceat(y2, first)
        # a glyph starting left of the right end of an earlier glyph of its word is pasted darker-wins;
        # words are set 2**32 px apart so that one running maximum serves them all
        reach = np.maximum.accumulate(x2 + (word << 32))
        late = np.zeros(len(x), bool)
        late[1:] = x[1:] + (word[1:] << 32) < reach[:-1]
        late[first] = False
        ox, oy = wx1[seg], wy1[seg]
        boxes = list(zip((x - ox).tolist(), (y1 - oy).tolist(), (x2 - ox).tolist(), (y2 - oy).tolist()))
        canvases = [blank(w, h) for w, h in zip((wx2 - wx1).tolist(), (wy2 - wy1).tolist())]
        dst, src = list(map(canvases.__getitem__, seg.tolist())), list(map(images.__getitem__, codes.tolist()))
        plain = (~late).tolist()  # the plain copies first (their boxes are disjoint), as one C-level map
        list(map(CORE.paste, compress(dst, plain), compress(src, plain), compress(boxes, plain)))
        for i in np.flatnonzero(late).tolist():
            paste_darker(dst[i], src[i], boxes[i])
        out = [None] * len(words)  # words without ink keep no image and a zero row
        for i, canvas in zip(has_ink.tolist(), canvases):
            out[i] = canvas
        extents = np.zeros((len(words), 4), np.int64)
        extents[has_ink] = np.stack([wx1, wy1, wx2 - wx1, wy2], axis=1)
        return out, extents

    def _ascii_glyphs(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
        """Glyph sprites of the primary face by ASCII code, as arrays (left, top, width, bottom) and a
        list of images, after rasterising the codes not seen yet."""
        boxes, images, known = self._ascii_glyph_table
        for c in np.unique(codes[~known[codes]]).tolist():
            g = self._glyph_sprite_of(0, chr(c))
            images[c], boxes[c], known[c] = g.image, g[1:], True
        return boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], images

    def _assemble(self, pieces: list, advance: float) -> WordImage:
        """Union of positioned glyph bitmaps, built in strip rows (the mask is a view of the strip).

        Glyphs whose ink starts right of the previous one's (nearly all) are joined by one
        ``np.concatenate`` with shared zero gaps; the few that overlap (kerned or overhanging pairs)
        are added afterwards with ``np.maximum``. Ink taller than the strip gets a plain mask.
        """
        if not pieces:
            return WordImage(np.zeros((0, 0), np.uint8), 0, 0, advance, np.zeros((self.strip_h, 0), np.uint8), 0, 0)
        x1, x2, y1, y2, strips = 1 << 30, -(1 << 30), 1 << 30, -(1 << 30), True
        for m, x, y, strip in pieces:
            h, w = m.shape
            x1, x2, y1, y2 = min(x1, x), max(x2, x + w), min(y1, y), max(y2, y + h)
            strips = strips and strip is not None
        st = self.strip_top
        if not strips:
            out = np.zeros((y2 - y1, x2 - x1), np.uint8)
            for m, x, y, _ in pieces:
                dst = out[y - y1:y - y1 + m.shape[0], x - x1:x - x1 + m.shape[1]]
                np.maximum(dst, m, out=dst)
            return WordImage(out, x1, y1, advance, None, x2 - x1, y2)
        parts, late, cursor = [], [], x1
        for m, x, y, strip in pieces:
            if x >= cursor:
                if x > cursor:
                    parts.append(self._gap(x - cursor))
                parts.append(strip)
                cursor = x + m.shape[1]
            else:
                late.append((strip, x))
        if x2 > cursor:
            parts.append(self._gap(x2 - cursor))
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0].copy()
        for strip, x in late:
            dst = out[:, x - x1:x - x1 + strip.shape[1]]
            np.maximum(dst, strip, out=dst)
        return WordImage(out[y1 - st:y2 - st], x1, y1, advance, out, x2 - x1, y2)


@functools.lru_cache(maxsize=16)
def stack_for(family: str, bold: bool = False) -> FontStack:
    return FontStack(font_stack(family, bold))


@functools.lru_cache(maxsize=32)
def typesetter(family: str, size: int, bold: bool = False) -> Typesetter:
    """Shared per (family, size, bold): caches warm up once per process, which is what makes
    rendering thousands of small training pages with one font cheap."""
    return Typesetter(stack_for(family, bold), size)
