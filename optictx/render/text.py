"""Plain text -> page images with ground truth: word wrap, bidi, columns, pagination, painting.

The walk: normalise -> paragraphs (words + the spaces before them) -> visual lines (greedy wrap on
cached word advances) -> pages of columns -> paint (paste cached word sprites onto white paper) ->
RGB (+ optional augmentation). Layout never draws, so :func:`render_to_fit` can try many font sizes
for the price of measuring.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import compress

import numpy as np
from PIL import Image

from optictx.errors import RenderError
from optictx.render.page import (Block, PageStyle, RenderedPage, TextBox, augment, ink_to_image, paper_to_image,
                                 to_999)
from optictx.render.typeset import Typesetter, bidi_class, is_cjk, paste_darker, strong_direction, typesetter

NO_BREAK_BEFORE = frozenset("、。，．・：；？！）」』】〕〉》〗〙〛｝＞ー々〜…‥,.;:!?)]}%")
"""Closing punctuation that stays with the character before it when CJK text wraps per character."""


@dataclass
class Paragraph:
    """One source line: its words and the number of spaces before each (``gaps[0]`` = indentation)."""

    words: list[str]
    gaps: list[int]
    rtl: bool = False
    bidi: bool = False  # contains right-to-left words: visual order differs from logical order
    block: int = -1  # id of the blank-line-separated paragraph; -1 for blank lines
    label: str = "text"


@dataclass
class Line:
    """A visual line. ``xs`` are logical pen offsets from the line start; ``text`` is its ground truth."""

    words: list[str]
    gaps: list[int]
    xs: list[float]
    width: float
    para: Paragraph

    @property
    def text(self) -> str:
        gaps = self.gaps
        if gaps and not gaps[0] and gaps.count(1) == len(gaps) - 1:  # single spaces: the common case
            return " ".join(self.words)
        return "".join(" " * g + w for g, w in zip(gaps, self.words))


def normalize(text: str) -> str:
    """CR/CRLF -> LF and tabs -> spaces (4-column stops), so the ground truth is what is drawn."""
    return text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)


def split_cjk(word: str) -> list[str]:
    """Break opportunities inside a space-free run: around every CJK character, never before closing
    punctuation. 'AI技术。' -> ['AI', '技', '术。']."""
    if word.isascii() or not any(map(is_cjk, word)):
        return [word]
    pieces: list[str] = []
    latin_open = False
    for ch in word:
        if pieces and ch in NO_BREAK_BEFORE:
            pieces[-1] += ch
        elif is_cjk(ch):
            pieces.append(ch)
            latin_open = False
        elif latin_open:
            pieces[-1] += ch
        else:
            pieces.append(ch)
            latin_open = True
    return pieces


def paragraphs(text: str, label: str = "text", first_block: int = 0) -> list[Paragraph]:
    """Split normalised text into source lines; consecutive non-blank lines share a block id."""
    out, block, blank_before = [], first_block - 1, True
    for src in text.split("\n"):
        words, gaps, spaces = [], [], 0
        body = src.rstrip(" ")  # trailing spaces belong to no word
        indent = len(body) - len(body.lstrip(" "))
        if body and "  " not in body[indent:] and (body.isascii() or not any(map(is_cjk, set(body)))):
            words = body[indent:].split(" ")  # the common case: single spaces, no CJK to split
            gaps = [indent] + [1] * (len(words) - 1)
        for part in () if words or not body else body.split(" "):
            if not part:
                spaces += 1
                continue
            for i, piece in enumerate(split_cjk(part)):
                words.append(piece)
                gaps.append(0 if i else spaces + (len(words) > 1))
            spaces = 0
        if not words:
            out.append(Paragraph([], [], block=-1, label=label))
            blank_before = True
            continue
        block += blank_before
        blank_before = False
        rtl = bidi = False
        if not src.isascii() and any(bidi_class(c) == "R" for c in set(src)):
            rtl = strong_direction(src) == "R"
            bidi = rtl or any(strong_direction(w) == "R" for w in words)
        out.append(Paragraph(words, gaps, rtl, bidi, block, label))
    return out


def _split_long(word: str, ts: Typesetter, width: float) -> list[str]:
    """Hard-break a word wider than the column (URLs, long numbers) into pieces that fit."""
    pieces, start = [], 0
    while start < len(word):
        end = start + 1
        while end < len(word) and ts.advance(word[start:end + 1], cache=False) <= width:
            end += 1
        pieces.append(word[start:end])
        start = end
    return pieces


def wrap(para: Paragraph, ts: Typesetter, width: float) -> Iterator[Line]:
    """Greedy line breaking on cached advances; the spaces at a break are dropped."""
    if not para.words:
        yield Line([], [], [], 0.0, para)
        return
    cached, space = ts._adv.get, ts.space
    words, gaps, xs, x = [], [], [], 0.0
    for k, (word, n) in enumerate(zip(para.words, para.gaps)):
        gap = space if n == 1 else n * space if n < 8 else min(n * space, width / 2)
        adv = cached(word)
        if adv is None:  # measure this word and the next ones in one go
            ts.measure(para.words[k:k + 1024])
            adv = cached(word) or ts.advance(word)
        if x + gap + adv > width:
            if words:
                yield Line(words, gaps, xs, x, para)
                words, gaps, xs, x, gap, n = [], [], [], 0.0, 0.0, 0
            if gap + adv > width:  # wider than the column on its own: hard-break it
                pieces = _split_long(word, ts, width - gap)
                for piece in pieces[:-1]:
                    yield Line([piece], [n], [gap], gap + ts.advance(piece, False), para)
                    gap, n = 0.0, 0
                word = pieces[-1]
                adv = ts.advance(word, cache=False)
        words.append(word)
        gaps.append(n)
        xs.append(x + gap)
        x += gap + adv
    yield Line(words, gaps, xs, x, para)


def visual_order(words: list[str], rtl: bool) -> list[int]:
    """Word-level Unicode bidi: embedding levels from each word's strong direction, then reverse runs
    from the highest level down (UAX #9 rule L2). Returns logical indices, left to right."""
    dirs = [strong_direction(w) for w in words]
    strong = [i for i, d in enumerate(dirs) if d != "N"]
    levels = []
    for i, d in enumerate(dirs):
        if d == "N":  # neutrals take the direction of their strong neighbours when both agree
            prev = next((dirs[j] for j in reversed(strong) if j < i), "R" if rtl else "L")
            nxt = next((dirs[j] for j in strong if j > i), "R" if rtl else "L")
            numeric = any(c.isdigit() for c in words[i])
            d = prev if prev == nxt else ("L" if numeric and rtl else ("R" if rtl else "L"))
        levels.append((1 if d == "R" else 2) if rtl else (1 if d == "R" else 0))
    order = list(range(len(words)))
    for level in range(max(levels), 0, -1):
        i = 0
        while i < len(order):
            if levels[order[i]] >= level:
                j = i
                while j < len(order) and levels[order[j]] >= level:
                    j += 1
                order[i:j] = order[i:j][::-1]
                i = j
            else:
                i += 1
    return order


def placements(line: Line, ts: Typesetter, x0: float, width: float) -> list[tuple[str, float]]:
    """(word, pen x) in page pixels, in reading order. LTR text uses the wrap's offsets; bidi lines are
    reordered visually and, for right-to-left paragraphs, set flush right."""
    if not line.para.bidi:
        return [(w, x0 + x) for w, x in zip(line.words, line.xs)]
    order = visual_order(line.words, line.para.rtl)
    indent = line.xs[0]
    xs, x = [0.0] * len(order), 0.0
    for k, i in enumerate(order):
        if k:
            x += line.gaps[max(i, order[k - 1])] * ts.space
        xs[i] = x
        x += ts.advance(line.words[i])
    start = x0 + width - indent - x if line.para.rtl else x0 + indent
    return [(w, start + dx) for w, dx in zip(line.words, xs)]  # logical (reading) order


@dataclass
class Metrics:
    """Vertical grid of a style: baseline pitch, first baseline offset, lines per column."""

    pitch: float
    first: float
    per_column: int


def metrics(style: PageStyle, ts: Typesetter) -> Metrics:
    pitch = style.font_size * style.line_spacing
    line_h = ts.ascent + ts.descent
    lead = max(0.0, (pitch - line_h) / 2)
    content = style.height - 2 * style.margin
    per_column = math.floor((content - lead - line_h) / pitch) + 1 if content >= lead + line_h else 0
    return Metrics(pitch, lead + ts.ascent, per_column)


def layout(lines: Iterator[Line], per_column: int, columns: int,
           max_pages: int | None = None) -> tuple[list[list[list[Line]]], bool]:
    """Fill columns then pages. Returns (pages of columns of lines, whether text was left over)."""
    if per_column < 1:
        raise RenderError("the font is too large for the page: not one line fits; use a smaller font_size")
    pages: list[list[list[Line]]] = []
    cols: list[list[Line]] = []
    col: list[Line] = []
    for line in lines:
        if not line.words and not col:
            continue  # a column never starts with a blank line
        if max_pages is not None and len(pages) == max_pages:
            return pages, True
        col.append(line)
        if len(col) == per_column:
            cols.append(col)
            col = []
            if len(cols) == columns:
                pages.append(cols)
                cols = []
    if col:
        cols.append(col)
    if cols:
        if max_pages is not None and len(pages) == max_pages:
            return pages, True
        pages.append(cols)
    for cols in pages:
        for col in cols:
            while col and not col[-1].words:
                col.pop()
    return pages, False


Box = tuple[int, int, int, int]


def _union(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _blit(ink: np.ndarray, mask: np.ndarray, x: int, y: int) -> tuple[int, int, int, int] | None:
    """ink = max(ink, mask placed at (x, y)), clipped to the page; returns the clipped box."""
    H, W = ink.shape
    h, w = mask.shape
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 >= x2 or y1 >= y2:
        return None
    dst = ink[y1:y2, x1:x2]
    np.maximum(dst, mask[y1 - y:y2 - y, x1 - x:x2 - x], out=dst)
    return x1, y1, x2, y2


def paint_line(ink: np.ndarray, placed: list[tuple[str, float]], ts: Typesetter,
               baseline: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Draw one line; return (word, ink box clipped to the page) pairs.

    The exact painter's (and markdown pages'): per word one dict lookup and one slice copy of its cached
    strip (fixed rows around the baseline) into a line buffer, then one blit of the line. A line whose words' ink
    overlaps (or is taller than the strip) falls back to one ``np.maximum`` blit per word.
    """
    get, image = ts._img.get, ts.image
    items, ordered, prev, x0, x1 = [], True, -(1 << 30), 1 << 30, -(1 << 30)
    for word, x in placed:
        img = get(word) or image(word)
        if img.width:
            bx = round(x) + img.left
            if bx < prev:  # reading order is not left to right (RTL words)
                ordered = False
            prev = bx
            if bx < x0:
                x0 = bx
            if bx + img.width > x1:
                x1 = bx + img.width
            items.append((word, img, bx))
    if not items:
        return []
    drawn = items if ordered else sorted(items, key=lambda t: t[2])
    buf = np.zeros((ts.strip_h, x1 - x0), np.uint8)
    cursor = x0
    for _, img, bx in drawn:  # left to right
        if img.strip is None or bx < cursor:
            break
        buf[:, bx - x0:bx - x0 + img.width] = img.strip
        cursor = bx + img.width
    else:
        _blit(ink, buf, x0, baseline + ts.strip_top)
        cursor = -1
    tall = cursor >= 0
    if tall:  # overlapping or tall ink: word by word
        for _, img, bx in items:
            _blit(ink, img.mask, bx, baseline + img.top)
    out = [(word, (bx, baseline + img.top, bx + img.width, baseline + img.bottom)) for word, img, bx in items]
    H, W = ink.shape  # ground truth stays in reading order
    if tall or x0 < 0 or x1 > W or baseline + ts.strip_top < 0 or baseline + ts.strip_top + ts.strip_h > H:
        out = [(w, (max(b[0], 0), max(b[1], 0), min(b[2], W), min(b[3], H))) for w, b in out]
        out = [(w, b) for w, b in out if b[0] < b[2] and b[1] < b[3]]
    return out


def paint(cols: list[list[Line]], ts: Typesetter, style: PageStyle, m: Metrics, index: int,
          exact: bool = False) -> RenderedPage:
    """Draw one page of columns and collect its ground truth (``exact``: with the reference painter)."""
    W, H = style.width, style.height
    sx, sy = 999 / W, 999 / H  # boxes are clipped to the page, so no clamping is needed
    image, painted = (paint_exact if exact else paint_sprites)(cols, ts, style, m)
    lines, words, blocks, texts = [], [], [], []
    painted = iter(painted)
    for col in cols:
        block_lines: list[TextBox] = []
        for i, line in enumerate(col):
            text = line.text
            texts.append(text)
            placed, b = next(painted)
            if placed and (b[0] < 0 or b[1] < 0 or b[2] > W or b[3] > H):  # ground truth is clipped to the page
                placed = [(w, _clip(b, W, H)) for w, b in placed]
                placed = [(w, b) for w, b in placed if b[0] < b[2] and b[1] < b[3]]
                b = _union([b for _, b in placed]) if placed else None
            if placed:
                words += placed
                lines.append(TextBox(text, b, (round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy))))
                if line.para.block >= 0:
                    block_lines.append(lines[-1])
            nxt = col[i + 1].para.block if i + 1 < len(col) else None
            if block_lines and nxt != line.para.block:
                text = "\n".join(b.text for b in block_lines)
                b = _union([b.box_px for b in block_lines])
                blocks.append(Block(line.para.label, text, b, to_999(b, W, H)))
                block_lines = []
    return RenderedPage(image=image, text="\n".join(texts), lines=lines, word_boxes=words, blocks=blocks, index=index)


Painted = list[tuple[list[tuple[str, Box]], Box | None]]
"""Per line of a page (columns in order): its (word, ink box) pairs in reading order, not yet clipped
to the page, and their union (None: no ink)."""


def paint_exact(cols: list[list[Line]], ts: Typesetter, style: PageStyle, m: Metrics) -> tuple[Image.Image, Painted]:
    """The reference painter: word bitmaps composed line by line with numpy (:func:`paint_line`)."""
    ink = _scratch(style.height, style.width)
    out = []
    for c, col in enumerate(cols):
        x0 = style.margin + c * (style.column_width + style.gap)
        for i, line in enumerate(col):
            baseline = style.margin + round(m.first + i * m.pitch)
            placed = paint_line(ink, placements(line, ts, x0, style.column_width), ts, baseline)
            out.append((placed, _union([b for _, b in placed]) if placed else None))
    return ink_to_image(ink, style.fg, style.bg), out


def paint_sprites(cols: list[list[Line]], ts: Typesetter, style: PageStyle, m: Metrics) -> tuple[Image.Image, Painted]:
    """The fast painter: the page's word sprites (:meth:`Typesetter.sprites`) pasted onto white paper
    with Pillow's C paste, the positions and boxes of all its words computed at once with numpy.

    The pixels are those of :func:`paint_exact`. A plain copy is right only where a sprite's box holds no
    ink yet, so a word is pasted darker-wins (the max of coverages, as :func:`paint_line` composes) when
    its box may meet earlier ink: it starts left of the end of an earlier word of its line, reaches
    above the lowest ink of the lines above it, leaves its column, an earlier column's ink left that
    column, or its line is bidirectional. The boxes of plain copies are then disjoint from all others,
    so the plain copies can all go first and the darker-wins pastes after them, in any order.
    """
    cw = style.column_width
    words: list[str] = []
    xs: list[float] = []
    counts, x0s, lows, baselines, cols_of, bidi = [], [], [], [], [], []
    for c, col in enumerate(cols):
        x0 = style.margin + c * (cw + style.gap)
        for i, line in enumerate(col):
            if line.para.bidi:  # visual order, flush right: placements() gives page x
                placed = placements(line, ts, x0, cw)
                words += [w for w, _ in placed]
                xs += [x for _, x in placed]
            else:
                words += line.words
                xs += line.xs
            counts.append(len(line.words))
            x0s.append(0.0 if line.para.bidi else x0)
            lows.append(x0)
            baselines.append(style.margin + round(m.first + i * m.pitch))
            cols_of.append(c)
            bidi.append(line.para.bidi)
    images, extents = ts.sprites(words)
    left, top, width, bottom = extents.T
    line = np.repeat(np.arange(len(counts)), counts)
    x = np.fromiter(xs, np.float64, len(xs)) + np.repeat(x0s, counts)
    x1 = np.rint(x).astype(np.int64) + left  # round(x0 + x) + left, as paint_line places a word
    inked = np.flatnonzero(width > 0)
    line, x1 = line[inked], x1[inked]
    base = np.take(baselines, line)
    x2, y1, y2 = x1 + width[inked], base + top[inked], base + bottom[inked]
    starts = np.flatnonzero(np.diff(line, prepend=-1))  # the first inked word of each line with ink
    ends = np.append(starts[1:], len(line))

    # right of the earlier words of its line: one running maximum of word ends, lines set 2**32 px apart
    reach = np.maximum.accumulate(x2 + (line << 32))
    plain = np.empty(len(line), bool)
    plain[1:] = x1[1:] + (line[1:] << 32) >= reach[:-1]
    plain[starts] = True
    # inside its column
    lo = np.take(lows, line)
    outside = (x1 < lo) | (x2 > lo + cw)
    plain &= ~outside
    if len(cols) > 1:  # no earlier column's ink left that column
        spilled = np.zeros(len(cols) + 1, bool)
        spilled[np.take(cols_of, line[outside]) + 1] = True
        plain &= ~np.logical_or.accumulate(spilled)[np.take(cols_of, line)]
    if any(bidi):
        plain &= ~np.take(bidi, line)
    # below the ink of the lines above it in its column: a running maximum of line bottoms, per column
    ly2 = np.maximum.reduceat(y2, starts)
    lcol = np.take(cols_of, line[starts])
    lowest = np.maximum.accumulate(ly2 + (lcol << 32)) - (lcol << 32)
    above = np.full(len(starts), -(1 << 40))
    same = lcol[1:] == lcol[:-1]
    above[1:][same] = lowest[:-1][same]
    plain &= y1 >= np.repeat(above, ends - starts)

    paper = Image.new("L", (style.width, style.height), 255)
    canvas = paper.im
    boxes = list(zip(x1.tolist(), y1.tolist(), x2.tolist(), y2.tolist()))
    images = list(map(images.__getitem__, inked.tolist()))
    flags = plain.tolist()
    list(map(canvas.paste, compress(images, flags), compress(boxes, flags)))
    for k in np.flatnonzero(~plain).tolist():
        paste_darker(canvas, images[k], boxes[k])

    placed = list(zip(map(words.__getitem__, inked.tolist()), boxes))
    unions = zip(np.minimum.reduceat(x1, starts).tolist(), np.minimum.reduceat(y1, starts).tolist(),
                 np.maximum.reduceat(x2, starts).tolist(), ly2.tolist())
    out: Painted = [([], None) for _ in counts]
    for j, a, e, box in zip(line[starts].tolist(), starts.tolist(), ends.tolist(), unions):
        out[j] = (placed[a:e], box)
    return paper_to_image(paper, style.fg, style.bg), out


def _clip(b: tuple[int, int, int, int], W: int, H: int) -> tuple[int, int, int, int]:
    return max(b[0], 0), max(b[1], 0), min(b[2], W), min(b[3], H)


_SCRATCH = threading.local()


def _scratch(h: int, w: int) -> np.ndarray:
    """A zeroed ink array reused across pages of one thread (ink_to_image copies out of it), which
    saves re-faulting megabytes of fresh memory for every dense page."""
    buf = getattr(_SCRATCH, "ink", None)
    if buf is None or buf.shape != (h, w):
        buf = _SCRATCH.ink = np.zeros((h, w), np.uint8)
    else:
        buf.fill(0)
    return buf


def prepare(text: str, style: PageStyle) -> tuple[str, Typesetter]:
    """Normalise, refuse empty text and characters no installed face draws, pick the typesetter."""
    if not isinstance(text, str):
        raise RenderError(f"text must be a str, got {type(text).__name__}")
    text = normalize(text)
    if not text.strip():
        raise RenderError("empty text: there is nothing to render")
    ts = typesetter(style.font_family, style.font_size)
    ts.stack.check(text)
    return text, ts


def _lines(paras: list[Paragraph], ts: Typesetter, width: float) -> Iterator[Line]:
    for p in paras:
        yield from wrap(p, ts, width)


def render_text(text: str, style: PageStyle | None = None, *, max_pages: int | None = None) -> list[RenderedPage]:
    """Render text onto as many pages as it needs (or the first ``max_pages``), with ground truth.

    Raises RenderError for empty text, characters no installed font can draw, or a font too large
    for the page.
    """
    if max_pages is not None and (isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1):
        # a negative count would otherwise be ignored (layout never reaches it) and 0 would render nothing
        raise RenderError(f"max_pages must be a whole number >= 1 or None, got {max_pages!r}")
    style = style or PageStyle()
    text, ts = prepare(text, style)
    m = metrics(style, ts)
    pages, _ = layout(_lines(paragraphs(text), ts, style.column_width), m.per_column, style.columns, max_pages)
    return [augment(paint(cols, ts, style, m, i), style) for i, cols in enumerate(pages)]
