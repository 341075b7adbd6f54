"""Markdown -> page images with ground truth per block, for "Convert the document to markdown." data.

Supported: ATX/setext headings, paragraphs, bullet and ordered lists (nested), block quotes, fenced and
indented code (monospace on a grey panel), GFM tables (drawn grid, bold header, column alignment) and
thematic breaks. Inline markup (``**bold**``, ``*em*``, ```code```, links) is parsed and drawn as its
plain text; the ground truth keeps the markdown source.

Ground truth per page: ``text`` is the markdown source of the blocks on the page (blocks joined by a
blank line, items of one list by a newline); ``blocks`` carry DeepSeek-OCR grounding labels
(``title`` for headings, ``text``, ``table``, ``code``) with the source of the block and its box;
``lines``/``words`` are the drawn lines and words. A block taller than the space left is split between
rows; a split table repeats its header row on the next page, and each part's source is itself valid
markdown (a split paragraph's part is the text of its lines).

Parsing is markdown-it-py (CommonMark + GFM tables), whose token line maps give each block's exact source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from markdown_it import MarkdownIt

from optictx.errors import RenderError
from optictx.render.page import Block, PageStyle, RenderedPage, TextBox, augment, ink_to_image, to_999
from optictx.render.text import Line, _scratch, _union, normalize, paint_line, paragraphs, placements, wrap
from optictx.render.typeset import Typesetter, typesetter

HEADING_SCALE = {1: 1.6, 2: 1.4, 3: 1.2, 4: 1.05, 5: 1.0, 6: 1.0}
CODE_PANEL_INK = 20  # coverage of the code background: ~ (235, 235, 235) for black on white
RULE_INK = 150


@dataclass
class MdBlock:
    """One parsed block: its label, exact source, display text and what the kind needs to draw it."""

    kind: str  # heading / para / item / code / table / rule
    label: str  # grounding label: title / text / code / table
    source: str
    text: str = ""
    level: int = 0  # heading level; list or quote depth
    marker: str = ""  # list marker drawn in the gutter ("•", "3.")
    quote: int = 0  # block-quote depth (bars drawn on the left)
    joiner: str = "\n\n"  # separator from the previous block's source in the page text
    info: str = ""  # code fence language
    rows: list[list[str]] = field(default_factory=list)  # table: cell texts, row 0 is the header
    row_sources: list[str] = field(default_factory=list)  # table: header, separator, body row source lines
    align: list[str] = field(default_factory=list)  # table: "left" / "center" / "right" per column


def _inline_text(token) -> str:
    """Display text of an inline token: markup dropped, code spans and link texts kept."""
    out = []
    for child in token.children or []:
        if child.type in ("text", "code_inline", "html_inline"):
            out.append(child.content)
        elif child.type == "softbreak":
            out.append(" ")
        elif child.type == "hardbreak":
            out.append("\n")
        elif child.type == "image":
            out.append(_inline_text(child))
    return "".join(out)


def _align(token) -> str:
    style = (token.attrs or {}).get("style", "")
    return "center" if "center" in style else "right" if "right" in style else "left"


def parse_markdown(md: str) -> list[MdBlock]:
    """Markdown source -> blocks in reading order, each with its exact source lines."""
    src = normalize(md).split("\n")
    tokens = MarkdownIt("commonmark").enable("table").parse("\n".join(src))

    def lines(a: int, b: int) -> str:
        return "\n".join(src[a:b]).rstrip()

    blocks: list[MdBlock] = []
    lists: list[list] = []  # stack of [ordered, next number]
    quote, item_open, i = 0, None, 0
    while i < len(tokens):
        t = tokens[i]
        if t.type == "heading_open":
            blocks.append(MdBlock("heading", "title", lines(*t.map), _inline_text(tokens[i + 1]), int(t.tag[1]),
                                  quote=quote))
            i += 3
            continue
        if t.type in ("bullet_list_open", "ordered_list_open"):
            lists.append([t.type == "ordered_list_open", int((t.attrs or {}).get("start", 1))])
        elif t.type in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif t.type == "list_item_open":
            ordered, number = lists[-1]
            marker = f"{number}{t.markup}" if ordered else "•"
            lists[-1][1] += 1
            joiner = "\n" if blocks and blocks[-1].kind == "item" else "\n\n"
            item_open = MdBlock("item", "text", "", "", len(lists), marker, quote, joiner)
            item_open.map = t.map  # type: ignore[attr-defined]
            blocks.append(item_open)
        elif t.type == "blockquote_open":
            quote += 1
        elif t.type == "blockquote_close":
            quote -= 1
        elif t.type == "paragraph_open":
            inline = tokens[i + 1]
            if item_open is not None and not item_open.text:  # first paragraph of a list item
                a, b = item_open.map  # type: ignore[attr-defined]
                item_open.text = _inline_text(inline)
                item_open.source = lines(a, max(t.map[1], a + 1))
                item_open = None
            else:
                blocks.append(MdBlock("para", "text", lines(*t.map), _inline_text(inline), len(lists), quote=quote))
            i += 3
            continue
        elif t.type in ("fence", "code_block"):
            blocks.append(MdBlock("code", "code", lines(*t.map), t.content.rstrip("\n"), len(lists), quote=quote,
                                  info=t.info.strip()))
        elif t.type == "table_open":
            i = _parse_table(tokens, i, src, blocks, quote)
            continue
        elif t.type == "hr":
            blocks.append(MdBlock("rule", "", lines(*t.map)))
        elif t.type == "html_block":
            blocks.append(MdBlock("para", "text", lines(*t.map), t.content.strip(), quote=quote))
        i += 1
    return [b for b in blocks if b.kind == "rule" or b.text.strip() or b.kind == "table"]


def _parse_table(tokens, i: int, src: list[str], blocks: list[MdBlock], quote: int) -> int:
    rows, row_sources, align, header_end = [], [], [], 0
    while tokens[i].type != "table_close":
        t = tokens[i]
        if t.type == "tr_open":
            rows.append([])
            row_sources.append(src[t.map[0]])
        elif t.type == "thead_open":
            header_end = t.map[1]
        elif t.type in ("th_open", "td_open"):
            rows[-1].append(_inline_text(tokens[i + 1]))
            if t.type == "th_open":
                align.append(_align(t))
        i += 1
    row_sources.insert(1, src[header_end])  # the |---|:-:| line
    width = len(rows[0])
    rows = [(r + [""] * width)[:width] for r in rows]
    source = "\n".join(row_sources)
    blocks.append(MdBlock("table", "table", source, "", quote=quote, rows=rows, row_sources=row_sources, align=align))
    return i + 1


# --------------------------------------------------------------------------- layout into rows
@dataclass
class Row:
    """An unbreakable horizontal slice of a block: text lines at baselines, filled rectangles, text."""

    height: int
    texts: list[tuple[Line, Typesetter, float, float, int]]  # line, typesetter, x0, width, baseline (row-relative)
    rects: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # x1, y1, x2, y2 (row-rel), ink
    display: str = ""


@dataclass
class Laid:
    block: MdBlock
    rows: list[Row]
    gap: int  # space above the block
    repeat: list[Row] = field(default_factory=list)  # drawn again on top of a continuation page

    def source(self, first: int, last: int) -> str:
        """Markdown source of rows [first, last): the whole source when the block is whole."""
        b = self.block
        if first == 0 and last == len(self.rows):
            return b.source
        if b.kind == "table":
            body = [b.row_sources[r + 1] for r in range(max(first, 1), last)]  # row r -> source r+1
            return "\n".join(b.row_sources[:2] + body)
        if b.kind == "code":
            return f"```{b.info}\n" + "\n".join(r.display for r in self.rows[first:last]) + "\n```"
        return "\n".join(r.display for r in self.rows[first:last])


class _Fonts:
    """The typesetters a markdown page uses, all derived from the page style."""

    def __init__(self, style: PageStyle):
        self.style = style
        self.body = typesetter(style.font_family, style.font_size)
        self.bold = typesetter(style.font_family if style.font_family != "mono" else "sans", style.font_size, True)
        self.mono = typesetter("mono", max(3, round(style.font_size * 0.9)))
        self.pitch = round(style.font_size * style.line_spacing)

    def heading(self, level: int) -> Typesetter:
        return typesetter(self.style.font_family, max(3, round(self.style.font_size * HEADING_SCALE[level])), True)

    def check(self, text: str) -> None:
        for ts in (self.body, self.bold, self.mono):
            ts.stack.check(text)


def _text_rows(text: str, ts: Typesetter, x0: float, width: float, pitch: int) -> list[Row]:
    rows = []
    for para in paragraphs(text):
        for line in wrap(para, ts, width):
            base = round((pitch - ts.ascent - ts.descent) / 2) + ts.ascent
            rows.append(Row(pitch, [(line, ts, x0, width, base)], display=line.text))
    return rows


def _table_rows(b: MdBlock, f: _Fonts, x0: float, width: float) -> list[Row]:
    """One Row per table row: wrapped cell text, cell borders drawn as filled 1-px rectangles."""
    pad, rule = max(2, f.style.font_size // 3), max(1, f.style.font_size // 20)
    n = len(b.rows[0])
    natural = [max(f.bold.advance(r[c]) if r[c] else 0 for r in b.rows) + 2 * pad + 1 for c in range(n)]
    least = [max([max((f.bold.advance(w) for w in r[c].split()), default=0) for r in b.rows]) + 2 * pad + 1
             for c in range(n)]
    widths = natural
    if sum(natural) > width:  # shrink the columns that have slack first, then everything
        slack = sum(natural) - sum(least)
        widths = ([lo + (nat - lo) * (width - sum(least)) / slack for lo, nat in zip(least, natural)]
                  if sum(least) <= width and slack > 0 else [w * width / sum(natural) for w in natural])
    edges = [round(x0 + sum(widths[:c])) for c in range(n + 1)]
    rows = []
    for r, cells in enumerate(b.rows):
        ts = f.bold if r == 0 else f.body
        texts, display, height = [], [], 0
        for c, cell in enumerate(cells):
            cw = edges[c + 1] - edges[c] - 2 * pad
            for k, line in enumerate(l for p in paragraphs(cell) for l in wrap(p, ts, cw) if l.words):
                shift = {"left": 0, "center": (cw - line.width) / 2, "right": cw - line.width}[b.align[c]]
                texts.append((line, ts, edges[c] + pad + max(0.0, shift), cw, pad + k * f.pitch + ts.ascent))
                height = max(height, (k + 1) * f.pitch)
            display.append(cell)
        height += 2 * pad
        rects = [(edges[0], 0, edges[-1] + rule, rule, 255), (edges[0], height, edges[-1] + rule, height + rule, 255)]
        rects += [(x, 0, x + rule, height + rule, 255) for x in edges]
        rows.append(Row(height, texts, rects, " | ".join(display)))
    return rows


def layout_block(b: MdBlock, f: _Fonts, x0: float, width: float) -> Laid:
    """A block -> rows. Indentation: 1.5 em per list level and per quote level."""
    em = f.style.font_size
    depth = 0 if b.kind == "heading" else b.level  # a heading's level is its size, not nesting
    indent = round(1.5 * em * (depth + b.quote))
    x, w = x0 + indent, width - indent
    if w < 4 * em:
        raise RenderError(f"the page is too narrow for this markdown nesting ({w:.0f} px left); use a wider page")
    gap = round(0.6 * em)
    if b.kind == "heading":
        ts = f.heading(b.level)
        rows = _text_rows(b.text, ts, x, w, round(ts.size * f.style.line_spacing))
        gap = round(0.9 * em)
    elif b.kind == "item":
        rows = _text_rows(b.text, f.body, x, w, f.pitch)
        line, ts, lx, lw, base = rows[0].texts[0]
        mark_w = f.body.advance(b.marker)
        with_marker = Line([b.marker] + line.words, [0, 1] + line.gaps[1:], [-mark_w - 0.4 * em] + line.xs,
                           line.width, line.para)  # the marker hangs in the gutter, part of the first line
        rows[0].texts[0] = (with_marker, ts, lx, lw, base)
        rows[0].display = with_marker.text
        gap = round(0.25 * em) if b.joiner == "\n" else gap
    elif b.kind == "code":
        pad = round(0.5 * em)
        rows = _text_rows(b.text, f.mono, x + pad, w - 2 * pad, round(f.mono.size * 1.3))
        rows[0].texts = [(line, ts, lx, lw, base + pad) for line, ts, lx, lw, base in rows[0].texts]
        rows[0].height += pad
        rows[-1].height += pad
        for row in rows:  # the grey panel, one slice per row so a split block keeps its panel
            row.rects.insert(0, (round(x), 0, round(x + w), row.height, CODE_PANEL_INK))
    elif b.kind == "table":
        rows = _table_rows(b, f, x, w)
        return Laid(b, rows, gap, repeat=rows[:1])
    elif b.kind == "rule":
        t = max(1, em // 12)
        rows = [Row(em, [], [(round(x0), em // 2, round(x0 + width), em // 2 + t, RULE_INK)])]
    else:
        rows = _text_rows(b.text, f.body, x, w, f.pitch)
    if b.quote:
        bar = max(2, em // 8)
        for row in rows:
            row.rects += [(round(x0 + 1.5 * em * q + 0.3 * em), 0, round(x0 + 1.5 * em * q + 0.3 * em) + bar,
                           row.height, 110) for q in range(b.quote)]
    return Laid(b, rows, gap)


# --------------------------------------------------------------------------- pagination and painting
@dataclass
class _Placed:
    laid: Laid
    rows: list[tuple[Row, int]] = field(default_factory=list)  # row, top y
    first: int = 0  # index of the first of this block's own rows on the page
    last: int = 0


def paginate(laid: list[Laid], style: PageStyle) -> list[list[_Placed]]:
    """Stack rows top to bottom; break between rows; never end a page with a heading."""
    top, bottom = style.margin, style.height - style.margin
    pages: list[list[_Placed]] = [[]]
    y = top
    for bi, lb in enumerate(laid):
        if not lb.rows:
            continue
        need = lb.rows[0].height
        if lb.block.kind == "heading" and bi + 1 < len(laid) and laid[bi + 1].rows:
            need += laid[bi + 1].gap + laid[bi + 1].rows[0].height  # keep with the next block
        if pages[-1] and y + lb.gap + need > bottom:
            pages.append([])
            y = top
        y += lb.gap if pages[-1] else 0
        placed = _Placed(lb, first=0)
        for r, row in enumerate(lb.rows):
            if row.height > bottom - top:
                raise RenderError(f"a {lb.block.kind} row is {row.height} px tall, more than the page holds; "
                                  f"use a larger page or a smaller font")
            if y + row.height > bottom and placed.rows:
                placed.last = r
                pages[-1].append(placed)
                pages.append([])
                y = top
                placed = _Placed(lb, first=r)
                for rep in lb.repeat:
                    placed.rows.append((rep, y))
                    y += rep.height
            placed.rows.append((row, y))
            y += row.height
        placed.last = len(lb.rows)
        pages[-1].append(placed)
    return [p for p in pages if p]


def paint_page(items: list[_Placed], style: PageStyle, index: int) -> RenderedPage:
    W, H = style.width, style.height
    ink = _scratch(H, W)
    lines, words, blocks, sources = [], [], [], []
    for item in items:
        boxes = []
        for row, y in item.rows:
            for x1, y1, x2, y2, v in row.rects:
                region = ink[max(0, y + y1):min(H, y + y2), max(0, x1):min(W, x2)]
                np.maximum(region, v, out=region)
                if v == 255 or v == CODE_PANEL_INK:
                    boxes.append((max(0, x1), max(0, y + y1), min(W, x2), min(H, y + y2)))
            for line, ts, x0, width, base in row.texts:
                placed = paint_line(ink, placements(line, ts, x0, width), ts, y + base)
                if placed:
                    words += placed
                    box = _union([b for _, b in placed])
                    lines.append(TextBox(line.text, box, to_999(box, W, H)))
                    boxes.append(box)
        source = item.laid.source(item.first, item.last)
        sources.append((item.laid.block.joiner if sources else "") + source)
        if item.laid.block.label and boxes:
            box = _union(boxes)
            blocks.append(Block(item.laid.block.label, source, box, to_999(box, W, H)))
    image = ink_to_image(ink, style.fg, style.bg)
    return RenderedPage(image=image, text="".join(sources), lines=lines, word_boxes=words, blocks=blocks, index=index)


def render_markdown(md: str, style: PageStyle | None = None, *, max_pages: int | None = None) -> list[RenderedPage]:
    """Render markdown onto pages; each page's ``text`` is the markdown source drawn on it.

    Raises RenderError for empty input, characters no installed font can draw, or content that cannot
    fit (a table row taller than a page, nesting too deep for the page width).
    """
    style = style or PageStyle()
    if not isinstance(md, str) or not md.strip():
        raise RenderError("empty markdown: there is nothing to render")
    fonts = _Fonts(style)
    blocks = parse_markdown(md)
    if not blocks:
        raise RenderError("the markdown has no visible content")
    fonts.check("".join(b.text + "".join(c for r in b.rows for c in r) + b.marker for b in blocks))
    width = style.width - 2 * style.margin
    laid = [layout_block(b, fonts, style.margin, width) for b in blocks]
    pages = paginate(laid, style)[:max_pages]
    return [augment(paint_page(items, style, i), style) for i, items in enumerate(pages)]
