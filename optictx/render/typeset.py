"""Word measurement and word bitmaps, cached, so a page is a numpy composite of cached words.

Why this design: FreeType runs the hinting bytecode of Noto fonts for every glyph it rasterises
(~100 µs per glyph with Pillow), so drawing a dense A4 page (~5,000 glyphs) with Pillow costs ~0.4 s.
Here every glyph is rasterised once per (face, size); a word's bitmap is assembled from its glyphs
with numpy and cached; a page is ~800 ``np.maximum`` blits of cached words into one uint8 ink array.

Positions follow what Pillow+raqm would draw: advances and pair kerning are HarfBuzz's (measured once
per face at a 1000 px reference size, so they are exact at every size), and each glyph lands on the
pixel nearest its pen position. Ligatures are not formed (``fi`` stays two glyphs), which keeps the
one-character-one-glyph ground truth simple. Words in complex scripts (Arabic, Hebrew, Indic, Thai,
anything with combining marks) are shaped as a whole by raqm instead, and cached the same way.
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from optictx.render.fonts import FontFile, FontStack, coverage, font_stack, load_font

REF_SIZE = 1000
NO_LIGATURES = ["-liga", "-clig", "-dlig"]
WORD_CACHE_BYTES = 64 << 20
"""Word bitmaps kept per typesetter before the cache is dropped (a dense A4 corpus needs a few MB)."""

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
    width: int = 0  # ink columns (mask.shape[1]), kept as a field because the paint loop reads it


class FaceMetrics:
    """Size-independent advances and kerning of one face, in ems (HarfBuzz values via Pillow raqm).

    ``adv`` is keyed by character and ``kern`` by the two-character string; both fill on first use.
    """

    def __init__(self, ff: FontFile):
        self.font = load_font(ff, REF_SIZE)
        self.shaped = self.font.layout_engine == 1  # raqm: kerning available
        self.adv: dict[str, float] = {}
        self.kern: dict[str, float] = {}

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
        self.zeros = np.zeros((self.strip_h, 4 * size), np.uint8)  # gaps between word strips (views)
        self.space = face_metrics(stack.fonts[0]).advance(" ") * size
        self._adv: dict[str, float] = {}
        self._img: dict[str, WordImage] = {}
        self._img_bytes = 0
        self._glyph: dict[tuple[int, str], tuple[np.ndarray, int, int]] = {}
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
            got = sum(self._run_advance(f, t) for f, t in self.runs(word))
            if cache:
                self._adv[word] = got
        return got

    def _glyph_of(self, face: int, ch: str) -> tuple[np.ndarray, int, int]:
        key = (face, ch)
        g = self._glyph.get(key)
        if g is None:
            g = self._glyph[key] = _rasterise(self.font(face), ch)
        return g

    def _run_pieces(self, face: int, text: str, x0: float) -> list[tuple[np.ndarray, int, int]]:
        """Bitmaps of one run with integer offsets from the word's pen origin."""
        if _shaped(text):
            mask, dx, dy = _rasterise(self.font(face), text)
            return [(mask, round(x0) + dx, dy)]
        pens, _ = face_metrics(self.stack.fonts[face]).pens(text)
        glyph, size, pieces = self._glyph.get, self.size, []
        for ch, pen in zip(text, pens):
            g = glyph((face, ch)) or self._glyph_of(face, ch)
            if g[0].size:
                pieces.append((g[0], round(x0 + pen * size) + g[1], g[2]))
        return pieces

    def image(self, word: str) -> WordImage:
        """The word's ink, assembled from cached glyphs (or shaped whole for complex scripts)."""
        got = self._img.get(word)
        if got is not None:
            return got
        runs = self.runs(word)
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

    def _assemble(self, pieces: list[tuple[np.ndarray, int, int]], advance: float) -> WordImage:
        """Union of positioned glyph bitmaps (overlaps keep the darker ink), built directly in strip
        rows; the mask is a view of the strip. Ink taller than the strip gets a plain mask."""
        if not pieces:
            return WordImage(np.zeros((0, 0), np.uint8), 0, 0, advance, np.zeros((self.strip_h, 0), np.uint8), 0)
        x1, x2, y1, y2 = 1 << 30, -(1 << 30), 1 << 30, -(1 << 30)
        for m, x, y in pieces:
            h, w = m.shape
            x1, x2, y1, y2 = min(x1, x), max(x2, x + w), min(y1, y), max(y2, y + h)
        st = self.strip_top
        tall = y1 < st or y2 > st + self.strip_h
        top = y1 if tall else st
        out = np.zeros((y2 - y1 if tall else self.strip_h, x2 - x1), np.uint8)
        for m, x, y in pieces:
            dst = out[y - top:y - top + m.shape[0], x - x1:x - x1 + m.shape[1]]
            np.maximum(dst, m, out=dst)
        if tall:
            return WordImage(out, x1, y1, advance, None, x2 - x1)
        return WordImage(out[y1 - st:y2 - st], x1, y1, advance, out, x2 - x1)


@functools.lru_cache(maxsize=16)
def stack_for(family: str, bold: bool = False) -> FontStack:
    return FontStack(font_stack(family, bold))


@functools.lru_cache(maxsize=64)
def typesetter(family: str, size: int, bold: bool = False) -> Typesetter:
    """Shared per (family, size, bold): caches warm up once per process, which is what makes
    rendering thousands of small training pages with one font cheap."""
    return Typesetter(stack_for(family, bold), size)
