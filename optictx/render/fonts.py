"""Find real fonts on disk and answer "which font draws this character?".

Why a file-name search and not fontconfig: the fonts we rely on (Debian ``fonts-noto-core``,
``fonts-noto-cjk``, ``fonts-dejavu-core``) have stable file names, a directory walk needs no extra
binary, and it behaves the same inside minimal containers where ``fc-match`` silently substitutes a
different face. Coverage comes from the font's own cmap (fontTools), so a character no font maps
raises :class:`RenderError` instead of being drawn as tofu (the .notdef box).
"""
from __future__ import annotations

import functools
import os
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

from optictx.errors import RenderError

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
             "/Library/Fonts", "/System/Library/Fonts")
"""Searched in order; ``OPTICTX_FONT_DIRS`` (os.pathsep-separated) is searched first."""

# (file name, face index inside a .ttc). Index 2 of NotoSansCJK-*.ttc is "Noto Sans CJK SC": Simplified
# Chinese glyph forms, the main CJK language of DeepSeek-OCR's data.
_CJK_REGULAR = [("NotoSansCJK-Regular.ttc", 2), ("NotoSansCJKsc-Regular.otf", 0)]
_CJK_BOLD = [("NotoSansCJK-Bold.ttc", 2), ("NotoSansCJKsc-Bold.otf", 0)]

FAMILIES: dict[tuple[str, bool], list[tuple[str, int]]] = {
    ("sans", False): [("NotoSans-Regular.ttf", 0), ("DejaVuSans.ttf", 0)],
    ("sans", True): [("NotoSans-Bold.ttf", 0), ("DejaVuSans-Bold.ttf", 0)],
    ("serif", False): [("NotoSerif-Regular.ttf", 0), ("DejaVuSerif.ttf", 0)],
    ("serif", True): [("NotoSerif-Bold.ttf", 0), ("DejaVuSerif-Bold.ttf", 0)],
    ("mono", False): [("NotoSansMono-Regular.ttf", 0), ("DejaVuSansMono.ttf", 0)],
    ("mono", True): [("NotoSansMono-Bold.ttf", 0), ("DejaVuSansMono-Bold.ttf", 0)],
    ("cjk", False): _CJK_REGULAR,
    ("cjk", True): _CJK_BOLD + _CJK_REGULAR,
}
"""Primary face per (family, bold): the first file found wins (Noto, then DejaVu)."""

FALLBACKS: list[tuple[str, int]] = [
    ("NotoSans-Regular.ttf", 0), ("NotoSansArabic-Regular.ttf", 0), ("NotoSansHebrew-Regular.ttf", 0),
    ("NotoSansDevanagari-Regular.ttf", 0), ("NotoSansBengali-Regular.ttf", 0),
    ("NotoSansTamil-Regular.ttf", 0), ("NotoSansThai-Regular.ttf", 0), ("NotoSansArmenian-Regular.ttf", 0),
    ("NotoSansGeorgian-Regular.ttf", 0), ("NotoSansEthiopic-Regular.ttf", 0), *_CJK_REGULAR,
    ("NotoSansSymbols-Regular.ttf", 0), ("NotoSansSymbols2-Regular.ttf", 0), ("NotoSansMath-Regular.ttf", 0),
    ("DejaVuSans.ttf", 0),
]
"""Per-character fallbacks after the primary face, so mixed-script text (English with Arabic or Chinese
words) renders with one style; tried in order, only for characters the primary face lacks."""

INSTALL_HINT = "install Debian fonts-noto-core fonts-noto-cjk fonts-dejavu-core (or set OPTICTX_FONT_DIRS)"


@dataclass(frozen=True)
class FontFile:
    """One face: a file and the face index inside a collection (.ttc)."""

    path: str
    index: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name if not self.index else f"{Path(self.path).name}#{self.index}"


@functools.lru_cache(maxsize=1)
def _font_index() -> dict[str, str]:
    """File name -> first path found. One walk per process (a few hundred files on Debian)."""
    dirs = [d for d in os.environ.get("OPTICTX_FONT_DIRS", "").split(os.pathsep) if d] + list(FONT_DIRS)
    index: dict[str, str] = {}
    for d in dirs:
        for root, _, files in os.walk(os.path.expanduser(d)):
            for f in sorted(files):
                if f.lower().endswith((".ttf", ".otf", ".ttc")):
                    index.setdefault(f, os.path.join(root, f))
    return index


def find_font(candidates: list[tuple[str, int]]) -> FontFile | None:
    """The first candidate (file name, face index) present on this machine, or None."""
    index = _font_index()
    for name, face in candidates:
        if name in index:
            return FontFile(index[name], face)
    return None


def primary_font(family: str, bold: bool = False) -> FontFile:
    """The face for a family name ("sans", "serif", "mono", "cjk") or a path to a font file."""
    if (family, bold) not in FAMILIES:
        if os.path.isfile(family):
            return FontFile(family, 0)
        known = sorted({f for f, _ in FAMILIES})
        raise RenderError(f"unknown font family {family!r}: use one of {known} or a path to a .ttf/.otf/.ttc file")
    found = find_font(FAMILIES[(family, bold)])
    if found is None and bold:
        found = find_font(FAMILIES[(family, False)])  # a regular face beats no face for headings
    if found is None:
        raise RenderError(f"no font file for family {family!r} on this machine: {INSTALL_HINT}")
    return found


def font_stack(family: str, bold: bool = False) -> tuple[FontFile, ...]:
    """Primary face first, then the installed script fallbacks (no duplicates)."""
    stack = [primary_font(family, bold)]
    for name, face in FALLBACKS:
        ff = find_font([(name, face)])
        if ff is not None and ff not in stack:
            stack.append(ff)
    return tuple(stack)


@functools.lru_cache(maxsize=64)
def coverage(ff: FontFile) -> frozenset[int]:
    """Code points the face maps to a real glyph (its cmap). Unmapped ones would draw .notdef."""
    try:
        got = _cmap_codes(ff.path, ff.index)
        if got is not None:
            return got
        from fontTools.ttLib import TTFont

        font = TTFont(ff.path, fontNumber=ff.index, lazy=True)
        cmap = font.getBestCmap() or {}
    except Exception as e:  # a broken font file must not pass as "covers nothing" silently
        raise RenderError(f"cannot read font {ff.path}: {e}") from e
    return frozenset(cp for cp, glyph in cmap.items() if glyph != ".notdef")


CMAP_PREFERENCE = ((3, 10), (0, 6), (0, 4), (3, 1), (0, 3), (0, 2), (0, 1), (0, 0))
"""(platform, encoding) of the Unicode cmap subtable to read, best first: fontTools' getBestCmap order."""


def _cmap_codes(path: str, index: int) -> frozenset[int] | None:
    """The code points of the face's best Unicode cmap subtable that map to a glyph other than 0
    (.notdef), read straight from the file: what fontTools' getBestCmap gives, without building glyph
    names (half a second for a CJK font, most of the cost of a cold first page). Formats 4 and 12, the
    ones Unicode fonts use; None for anything else (the caller falls back to fontTools)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"ttcf":  # a collection: the face's own table directory
            if index >= struct.unpack(">I", head[8:12])[0]:
                return None
            f.seek(12 + 4 * index)
            f.seek(struct.unpack(">I", f.read(4))[0])
            head = f.read(12)
        elif index:
            return None
        n = struct.unpack(">H", head[4:6])[0]
        tables = {rec[0]: rec[2:] for rec in struct.iter_unpack(">4sIII", f.read(16 * n))}
        if b"cmap" not in tables:
            return None
        offset, length = tables[b"cmap"]
        f.seek(offset)
        cmap = f.read(length)
    n = struct.unpack(">H", cmap[2:4])[0]
    subtables = {(p, e): off for p, e, off in struct.iter_unpack(">HHI", cmap[4:4 + 8 * n])}
    off = next((subtables[k] for k in CMAP_PREFERENCE if k in subtables), None)
    if off is None:
        return None
    fmt = struct.unpack(">H", cmap[off:off + 2])[0]
    if fmt == 12:
        n = struct.unpack(">I", cmap[off + 12:off + 16])[0]
        groups = struct.iter_unpack(">III", cmap[off + 16:off + 16 + 12 * n])  # start, end, first glyph
        return frozenset(c for start, end, glyph in groups for c in range(start + (glyph == 0), end + 1))
    if fmt == 4:  # segments: endCode[], pad, startCode[], idDelta[], idRangeOffset[], glyphIdArray[]
        segs = struct.unpack(">H", cmap[off + 6:off + 8])[0] // 2
        field = off + 16 + 6 * segs  # idRangeOffset[0]
        ends, starts, deltas, ranges = (struct.unpack(f">{segs}H", cmap[at:at + 2 * segs])
                                        for at in (off + 14, off + 16 + 2 * segs, off + 16 + 4 * segs, field))
        codes = []
        for i, (start, end, delta, ro) in enumerate(zip(starts, ends, deltas, ranges)):
            for c in range(start, end + 1):
                if ro:  # the glyph comes from glyphIdArray, at an offset from this idRangeOffset field
                    at = field + 2 * i + ro + 2 * (c - start)
                    glyph = struct.unpack(">H", cmap[at:at + 2])[0] if at + 2 <= len(cmap) else 0
                    glyph = (glyph + delta) & 0xFFFF if glyph else 0
                else:
                    glyph = (c + delta) & 0xFFFF
                if glyph:
                    codes.append(c)
        return frozenset(codes)
    return None


@functools.lru_cache(maxsize=256)
def load_font(ff: FontFile, size: float) -> ImageFont.FreeTypeFont:
    """Pillow face at ``size`` pixels per em, with raqm (HarfBuzz) layout when available for shaping."""
    try:
        return ImageFont.truetype(ff.path, size, index=ff.index, layout_engine=ImageFont.Layout.RAQM)
    except (OSError, KeyError) as e:  # KeyError: raqm missing in this Pillow build
        try:
            return ImageFont.truetype(ff.path, size, index=ff.index)
        except OSError:
            raise RenderError(f"cannot load font {ff.path}: {e}") from e


def describe_chars(chars) -> str:
    """'U+0378 (unassigned), U+1F600 GRINNING FACE' — names make the error actionable."""
    out = []
    for c in sorted(set(chars))[:20]:
        out.append(f"{c!r} U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}")
    more = len(set(chars)) - 20
    return ", ".join(out) + (f" and {more} more" if more > 0 else "")


class FontStack:
    """A primary face plus fallbacks; maps each character to the first face that covers it.

    Why per character and cached: text is checked once up front (so a missing glyph is an error
    before any drawing), and the answer for a character never changes for a stack.
    """

    def __init__(self, fonts: tuple[FontFile, ...]):
        self.fonts = fonts
        self._choice: dict[str, int] = {}

    @functools.cached_property
    def draws_ascii(self) -> bool:
        """The primary face has every printable ASCII character."""
        return all(cp in coverage(self.fonts[0]) for cp in range(0x21, 0x7F))

    def face_of(self, ch: str) -> int:
        """Index in ``fonts`` of the face that draws ``ch``; -1 when none does."""
        got = self._choice.get(ch)
        if got is None:
            cp = ord(ch)
            got = next((i for i, ff in enumerate(self.fonts) if cp in coverage(ff)), -1)
            self._choice[ch] = got
        return got

    def check(self, text: str) -> None:
        """Raise RenderError naming every character of ``text`` that no face can draw."""
        if text.isascii() and text.replace("\n", " ").isprintable() and self.draws_ascii:
            return  # printable ASCII, all in the primary face: the common case, without a set of the text
        chars = set(text) - {" ", "\n"}
        controls = [c for c in chars if unicodedata.category(c) == "Cc"]
        if controls:  # some fonts map controls to blank glyphs; drawing "nothing" would corrupt the ground truth
            raise RenderError(f"control characters cannot be rendered: {describe_chars(controls)}; "
                              f"remove them (tabs and CR/LF are fine)")
        bad = [c for c in chars if self.face_of(c) < 0]
        if bad:
            raise RenderError(
                f"no installed font can draw {describe_chars(bad)} (faces tried: "
                f"{', '.join(f.name for f in self.fonts)}); remove these characters or {INSTALL_HINT}")
