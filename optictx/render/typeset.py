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


def strong_direction(text: str) -> str:
    """Direction of the first strong character ('L', 'R'), or 'N' when there is none (digits, marks)."""
    for ch in text:
        d = bidi_class(ch)
        if d != "N":
            return d
    return "N"


@dataclass(frozen=True)
class WordImage:
    """Ink of a word: ``mask`` (uint8 coverage) whose top-left sits at (pen + left, baseline + top)."""

    mask: np.ndarray
    left: int
    top: int
    advance: float


class FaceMetrics:
    """Size-independent advances and kerning of one face, in ems (HarfBuzz values via Pillow raqm)."""

    def __init__(self, ff: FontFile):
        self.font = load_font(ff, REF_SIZE)
        self.shaped = self.font.layout_engine == 1  # raqm: kerning available
        self._adv: dict[str, float] = {}
        self._kern: dict[tuple[str, str], float] = {}

    def advance(self, ch: str) -> float:
        got = self._adv.get(ch)
        if got is None:
            got = self._adv[ch] = self.font.getlength(ch) / REF_SIZE
        return got

    def kerning(self, a: str, b: str) -> float:
        if not self.shaped or is_cjk(a) or is_cjk(b):  # CJK faces kern nothing worth a lookup per pair
            return 0.0
        got = self._kern.get((a, b))
        if got is None:
            pair = self.font.getlength(a + b, features=NO_LIGATURES) / REF_SIZE
            got = self._kern[(a, b)] = pair - self.advance(a) - self.advance(b)
        return got


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
        self.space = face_metrics(stack.fonts[0]).advance(" ") * size
        self._adv: dict[str, float] = {}
        self._img: dict[str, WordImage] = {}
        self._img_bytes = 0
        self._glyph: dict[tuple[int, str], tuple[np.ndarray, int, int]] = {}

    def font(self, face: int):
        f = self._fonts.get(face)
        if f is None:
            f = self._fonts[face] = load_font(self.stack.fonts[face], self.size)
        return f

    def runs(self, word: str) -> list[tuple[int, str]]:
        """Split a word into (face, text) runs. Neutral characters (digits, punctuation) stay in the
        current run's face when it has them, so "مرحبا." is one Arabic run shaped as a whole."""
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
        if any(map(is_complex, text)) or strong_direction(text) == "R":
            return self.font(face).getlength(text)
        m = face_metrics(self.stack.fonts[face])
        total, prev = 0.0, ""
        for ch in text:
            total += m.advance(ch) + (m.kerning(prev, ch) if prev else 0.0)
            prev = ch
        return total * self.size

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
        if any(map(is_complex, text)) or strong_direction(text) == "R":
            mask, dx, dy = _rasterise(self.font(face), text)
            return [(mask, round(x0) + dx, dy)]
        m = face_metrics(self.stack.fonts[face])
        pieces, pen, prev = [], x0, ""
        for ch in text:
            if prev:
                pen += m.kerning(prev, ch) * self.size
            mask, dx, dy = self._glyph_of(face, ch)
            if mask.size:
                pieces.append((mask, round(pen) + dx, dy))
            pen += m.advance(ch) * self.size
            prev = ch
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
        got = WordImage(*_composite(pieces), advance=x)
        if self._img_bytes > WORD_CACHE_BYTES:
            self._img.clear()
            self._img_bytes = 0
        self._img[word] = got
        self._img_bytes += got.mask.nbytes + 100
        return got


def _composite(pieces: list[tuple[np.ndarray, int, int]]) -> tuple[np.ndarray, int, int]:
    """Union of positioned bitmaps -> (mask, left, top); overlaps keep the darker ink."""
    if not pieces:
        return np.zeros((0, 0), np.uint8), 0, 0
    if len(pieces) == 1:
        return pieces[0]
    x1 = min(x for _, x, _ in pieces)
    y1 = min(y for _, _, y in pieces)
    x2 = max(x + m.shape[1] for m, x, _ in pieces)
    y2 = max(y + m.shape[0] for m, _, y in pieces)
    out = np.zeros((y2 - y1, x2 - x1), np.uint8)
    for m, x, y in pieces:
        dst = out[y - y1:y - y1 + m.shape[0], x - x1:x - x1 + m.shape[1]]
        np.maximum(dst, m, out=dst)
    return out, x1, y1


@functools.lru_cache(maxsize=16)
def stack_for(family: str, bold: bool = False) -> FontStack:
    return FontStack(font_stack(family, bold))


@functools.lru_cache(maxsize=64)
def typesetter(family: str, size: int, bold: bool = False) -> Typesetter:
    """Shared per (family, size, bold): caches warm up once per process, which is what makes
    rendering thousands of small training pages with one font cheap."""
    return Typesetter(stack_for(family, bold), size)
