"""The grounding language: parse, format and draw ``<|ref|>``, ``<|det|>``, ``<|box|>`` and ``<|point|>``.

Two dialects share one scanner (reference deepseek-ocr.md §7.3, deepseek-vision-lineage.md §0, §5.2):

* DeepSeek-OCR blocks: ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` then the block's content.
* Visual primitives: ``<|ref|>T<|/ref|><|box|>[[x1,y1,x2,y2],...]<|/box|>`` and ``<|point|>[[x,y],...]<|/point|>``.

Coordinates are integers 0-999 relative to the original image; pixels are ``int(v / 999 * size)`` as the
official runner computes them. Model output is untrusted text (truncated at max tokens, looping, garbage), so
every parser here is total: it never raises, drops what it cannot read and clamps what is out of range.
The full-width bar (``<｜ref｜>``) used in the paper's rendered examples is accepted everywhere; the formatters
write the ASCII form, which is what the DeepSeek-OCR tokenizer has as special tokens.
"""

from __future__ import annotations

import colorsys
import re
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from numbers import Integral
from typing import Sequence, Union

from PIL import Image, ImageDraw, ImageFont

from optictx.errors import ImageError, PrimitiveError

Box = tuple[int, int, int, int]
Point = tuple[int, int]
COORD_MAX = 999  # the official code divides by 999 (reference §7.3), not 1000

_BAR = "[|\uff5c]"
_TAG = re.compile(rf"<{_BAR}(/?)(ref|det|box|point){_BAR}>")
_ANY_TAG_TEXT = re.compile(rf"<{_BAR}/?(ref|det|box|point){_BAR}>")
# A special token cut in half by max_tokens at the very end of the output: ``...<|/de``.
_PARTIAL_TAG_AT_END = re.compile(rf"<{_BAR}/?[a-z]{{0,5}}{_BAR}?$")
_GROUP = re.compile(r"\[([^\[\]]*)(\])?")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_LIST_PREFIX = re.compile(r"[\s\[\],.0-9-]*")  # the characters a coordinate list can be made of
_ARITY = {"det": 4, "box": 4, "point": 2}


@dataclass(frozen=True)
class Block:
    """One DeepSeek-OCR layout element: its label, its boxes in 0-999 units and its content text."""

    label: str
    boxes_999: tuple[Box, ...]
    content: str


@dataclass(frozen=True)
class Primitive:
    """One visual primitive span: ``kind`` is ``"box"`` (``<|box|>`` or ``<|det|>``) or ``"point"``.

    ``label`` is the preceding ``<|ref|>`` text, or None (points carry no label in the paper).
    ``coords`` holds 4-tuples for boxes and 2-tuples for points, in 0-999 units.
    """

    kind: str
    label: str | None
    coords: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Tag:
    name: str
    closing: bool
    start: int
    end: int


@dataclass(frozen=True)
class _Span:
    """A stretch of special syntax: an optional ref label, an optional coordinate list, or a stray tag."""

    start: int
    end: int
    label: str | None = None
    kind: str | None = None  # det / box / point
    coords: tuple[tuple[int, ...], ...] = ()


# ----------------------------------------------------------------------------- scanning


def _clamp_number(token: str) -> int:
    # Clamp before rounding: float("9" * 400) is inf, and round(inf) raises.
    value = min(max(float(token), 0.0), float(COORD_MAX))
    return int(value + 0.5)


def _normalize_coords(nums: list[int]) -> tuple[int, ...]:
    if len(nums) == 4:  # a box written right-to-left or bottom-to-top is still the same box
        x1, y1, x2, y2 = nums
        return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return tuple(nums)


def _parse_coords(body: str, closed: bool, arity: int) -> tuple[tuple[int, ...], ...]:
    """Read ``[[a, b, ...], ...]`` leniently. A group is kept when it has exactly ``arity`` numbers and is closed
    by ``]``; an unclosed group is kept only when the whole list is known to be complete (``closed``), since
    otherwise its last number may be half-written.
    """
    groups: list[tuple[int, ...]] = []
    if "[" not in body:  # ``<|det|>1, 2, 3, 4<|/det|>``: tolerated when complete
        nums = _NUMBER.findall(body)
        if closed and nums and len(nums) % arity == 0:
            values = [_clamp_number(n) for n in nums]
            groups = [_normalize_coords(values[i:i + arity]) for i in range(0, len(values), arity)]
        return tuple(groups)
    for m in _GROUP.finditer(body):
        inner, close = m.group(1), m.group(2)
        if not inner.strip():
            continue
        if close is None and not (closed and not body[m.end():].strip(" ]\n\t")):
            continue
        nums = _NUMBER.findall(inner)
        if len(nums) == arity:
            groups.append(_normalize_coords([_clamp_number(n) for n in nums]))
    return tuple(groups)


def _tags(text: str) -> list[_Tag]:
    return [_Tag(m.group(2), bool(m.group(1)), m.start(), m.end()) for m in _TAG.finditer(text)]


def _spans(text: str) -> list[_Span]:
    """Split model output into special-syntax spans, tolerating missing close tags and truncation."""
    tags, spans, i = _tags(text), [], 0
    while i < len(tags):
        tag = tags[i]
        label, after, start = None, tag.end, tag.start
        if tag.name == "ref" and not tag.closing:
            nxt = tags[i + 1] if i + 1 < len(tags) else None
            if nxt is None:  # truncated inside the label
                spans.append(_Span(start, len(text), label=_PARTIAL_TAG_AT_END.sub("", text[tag.end:]).strip()))
                break
            label = text[tag.end:nxt.start].strip()
            if nxt.name == "ref" and nxt.closing:
                after, i = nxt.end, i + 2
            else:  # ``<|ref|>a<|det|>``: behave as if ``<|/ref|>`` had been written
                after, i = nxt.start, i + 1
        elif tag.name in _ARITY and not tag.closing:
            after = tag.start  # a bare coordinate tag
        else:  # a stray closing tag or a close without its open
            spans.append(_Span(tag.start, tag.end))
            i += 1
            continue
        coord = tags[i] if i < len(tags) else None
        if coord is None or coord.closing or coord.name not in _ARITY or text[after:coord.start].strip():
            spans.append(_Span(start, after, label=label))
            continue
        close = tags[i + 1] if i + 1 < len(tags) else None
        if close is not None and close.closing and close.name == coord.name:
            body, end, complete, i = text[coord.end:close.start], close.end, True, i + 2
        else:  # close tag missing (truncated, or the model went on writing): the list is its longest prefix
            body = _LIST_PREFIX.match(text, coord.end, close.start if close is not None else len(text)).group(0)
            complete = "]]" in body  # the outer list was closed; what follows (even digits) is content
            body = body[:body.index("]]") + 2] if complete else body
            end, i = coord.end + len(body), i + 1
        coords = _parse_coords(body, complete, _ARITY[coord.name])
        spans.append(_Span(start, end, label=label, kind=coord.name, coords=coords))
    return spans


# ----------------------------------------------------------------------------- parsers


def parse_grounding(text: str) -> list[Block]:
    """DeepSeek-OCR grounded output -> blocks in reading order. Never raises.

    A block is a ``<|ref|>`` label with the ``<|det|>`` (or ``<|box|>``) list that follows it; its content is the
    text up to the next ``<|ref|>``. A label cut off before its boxes gives a block with no boxes.
    """
    if not isinstance(text, str):
        return []
    spans = _spans(text)
    blocks = []
    for n, span in enumerate(spans):
        if span.label is None or span.kind == "point":
            continue
        nxt = next((s.start for s in spans[n + 1:] if s.label is not None), len(text))
        content = _remove_spans(text, span.end, nxt, spans[n + 1:])
        if nxt == len(text):  # only the very end of the output can hold a half-written tag
            content = _PARTIAL_TAG_AT_END.sub("", content)
        content = content.strip()
        boxes = tuple(c for c in span.coords if len(c) == 4)
        blocks.append(Block(span.label, boxes, content))  # type: ignore[arg-type]
    return blocks


def _remove_spans(text: str, start: int, stop: int, spans: Sequence[_Span]) -> str:
    parts, pos = [], start
    for s in spans:
        if s.start >= stop:
            break
        parts.append(text[pos:s.start])
        pos = s.end
    parts.append(text[pos:stop])
    return "".join(parts)


def parse_primitives(text: str) -> list[Primitive]:
    """Every ``<|box|>``/``<|det|>`` and ``<|point|>`` span, with its ``<|ref|>`` label if any. Never raises."""
    if not isinstance(text, str):
        return []
    return [Primitive("point" if s.kind == "point" else "box", s.label, s.coords)
            for s in _spans(text) if s.kind is not None]


# ----------------------------------------------------------------------------- formatters


def _check_label(label: str) -> str:
    if not isinstance(label, str) or _ANY_TAG_TEXT.search(label):
        raise PrimitiveError(f"label {label!r} must be a string without <|ref|>/<|det|>/<|box|>/<|point|> tokens")
    return label.strip()


def _check_coords(values: Sequence[Sequence[int]], arity: int, what: str) -> list[tuple[int, ...]]:
    out = []
    for v in values:
        t = tuple(v)
        if len(t) != arity or not all(isinstance(c, Integral) and not isinstance(c, bool) and 0 <= c <= COORD_MAX
                                      for c in t):
            raise PrimitiveError(f"{what} {t!r} must be {arity} integers in 0..{COORD_MAX}; use to_999() first")
        out.append(tuple(int(c) for c in t))
    if not out:
        raise PrimitiveError(f"at least one {what} is needed")
    return out


def _coord_list(values: list[tuple[int, ...]], sep: str) -> str:
    return "[" + sep.join("[" + sep.join(str(c) for c in v) + "]" for v in values) + "]"


def format_det(label: str, boxes: Sequence[Sequence[int]]) -> str:
    """DeepSeek-OCR form with the official spacing: ``<|ref|>l<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``."""
    boxes_ = [_normalize_coords(list(b)) for b in _check_coords(boxes, 4, "box")]
    return f"<|ref|>{_check_label(label)}<|/ref|><|det|>{_coord_list(boxes_, ', ')}<|/det|>"


def format_box(label: str, boxes: Sequence[Sequence[int]]) -> str:
    """Visual-primitive box, paper spacing (none): ``<|ref|>T<|/ref|><|box|>[[x1,y1,x2,y2],...]<|/box|>``."""
    boxes_ = [_normalize_coords(list(b)) for b in _check_coords(boxes, 4, "box")]
    return f"<|ref|>{_check_label(label)}<|/ref|><|box|>{_coord_list(boxes_, ',')}<|/box|>"


def format_points(points: Sequence[Sequence[int]]) -> str:
    """Visual-primitive points (no label; order is kept, so a list can be a trajectory)."""
    return f"<|point|>{_coord_list(_check_coords(points, 2, 'point'), ',')}<|/point|>"


def sort_left_to_right(boxes: Sequence[Box]) -> list[Box]:
    """The paper orders multiple instances left to right; ties broken top to bottom."""
    return sorted((tuple(b) for b in boxes), key=lambda b: (b[0], b[1], b[2], b[3]))  # type: ignore[misc]


# ----------------------------------------------------------------------------- coordinates


def to_pixels(v: float, size: int) -> int:
    """0-999 -> pixel, exactly as the official runner: ``int(v / 999 * size)``."""
    return int(v / COORD_MAX * size)


def to_999(px: float, size: int) -> int:
    """Pixel -> 0-999 (rounded, clamped): the inverse of ``to_pixels`` up to one 0-999 step."""
    if size <= 0:
        raise PrimitiveError(f"image size must be positive, got {size}")
    return min(max(int(px / size * COORD_MAX + 0.5), 0), COORD_MAX)


def box_to_pixels(box: Sequence[float], size: tuple[int, int]) -> Box:
    """A 0-999 box -> pixel box on an image of ``size = (width, height)``."""
    w, h = size
    return (to_pixels(box[0], w), to_pixels(box[1], h), to_pixels(box[2], w), to_pixels(box[3], h))


def box_to_999(box_px: Sequence[float], size: tuple[int, int]) -> Box:
    """A pixel box -> 0-999 box (normalised so x1 <= x2, y1 <= y2)."""
    w, h = size
    return _normalize_coords([to_999(box_px[0], w), to_999(box_px[1], h),  # type: ignore[return-value]
                              to_999(box_px[2], w), to_999(box_px[3], h)])


def point_to_pixels(point: Sequence[float], size: tuple[int, int]) -> Point:
    return (to_pixels(point[0], size[0]), to_pixels(point[1], size[1]))


def point_to_999(point_px: Sequence[float], size: tuple[int, int]) -> Point:
    return (to_999(point_px[0], size[0]), to_999(point_px[1], size[1]))


# ----------------------------------------------------------------------------- markdown


_TABLE_HTML = re.compile(r"<table\b.*?</table\s*>", re.IGNORECASE | re.DOTALL)


def _remove_grounding_once(text: str, images: bool, image_path: str, idx: int) -> tuple[str, int]:
    """One pass of :func:`strip_grounding`: drop every span (image spans become links numbered from ``idx``);
    returns the text and the next link number."""
    parts, pos = [], 0
    for span in _spans(text):
        parts.append(text[pos:span.start])
        if images and span.label == "image":
            for _ in (c for c in span.coords if len(c) == 4):
                parts.append(f"![]({image_path.replace('{idx}', str(idx))})\n")
                idx += 1
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts), idx


def strip_grounding(text: str, *, images: bool = False, image_path: str = "images/{idx}.jpg",
                    gfm_tables: bool = False) -> str:
    """Grounded output -> clean markdown, as the official runner writes ``<name>.mmd``.

    Ref/det spans are removed. With ``images=True`` an ``image`` block becomes ``![](images/{idx}.jpg)`` — one
    link per box, numbered like ``crop_blocks`` (the official code numbers links per block and crops per box;
    they agree whenever a figure has one box). ``\\coloneqq``/``\\eqqcolon`` become ``:=``/``=:``, 3+ newlines
    collapse to 2, ``\\(..\\)`` maths is left alone. ``gfm_tables`` turns span-free HTML tables into GFM.
    """
    if not isinstance(text, str):
        return ""
    # Removing a span can join the text on either side into a new tag (``<|re`` + ``<|/ref|>`` + ``f|>``), so
    # passes repeat until no tag is left. Each pass removes at least one ``<``, which links never add, so
    # ``text.count("<") + 1`` passes always suffice (the bound only matters for an ``image_path`` holding tags).
    md, idx = text, 0
    for _ in range(text.count("<") + 1):
        if _TAG.search(md) is None:
            break
        md, idx = _remove_grounding_once(md, images, image_path, idx)
    md = _PARTIAL_TAG_AT_END.sub("", md)
    md = md.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    if gfm_tables:
        md = _TABLE_HTML.sub(lambda m: html_table_to_gfm(m.group(0)) or m.group(0), md)
    return re.sub(r"\n{3,}", "\n\n", md).strip()


@dataclass
class HtmlNode:
    """A minimal DOM node: enough structure for tables (TEDS, GFM), built with the stdlib parser."""

    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Union["HtmlNode", str]] = field(default_factory=list)

    def span(self, name: str) -> int:
        """``colspan``/``rowspan`` as an int >= 1 (missing or garbage -> 1)."""
        m = re.match(r"\s*([0-9]+)", self.attrs.get(name) or "")
        return max(1, int(m.group(1))) if m and len(m.group(1)) < 6 else 1


_VOID = {"br", "img", "hr", "input", "meta", "link", "col", "wbr", "area", "base", "source"}
_CELLS, _SECTIONS = {"td", "th"}, {"thead", "tbody", "tfoot"}


class _TableTreeBuilder(HTMLParser):
    """HTML -> HtmlNode tree, closing ``td``/``tr``/sections implicitly as browsers do (models omit them)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = HtmlNode("#document")
        self.stack = [self.root]

    def _close_open(self, names: set[str], boundary: set[str]) -> None:
        """Close the outermost open element in ``names`` above the nearest ``boundary`` (and all inside it)."""
        cut = None
        for k in range(len(self.stack) - 1, 0, -1):
            tag = self.stack[k].tag
            if tag in boundary:
                break
            if tag in names:
                cut = k
        if cut is not None:
            del self.stack[cut:]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _CELLS:
            self._close_open(_CELLS, {"tr", "table"} | _SECTIONS)
        elif tag == "tr":
            self._close_open({"tr"} | _CELLS, {"table"} | _SECTIONS)
        elif tag in _SECTIONS:
            self._close_open(_SECTIONS | {"tr"} | _CELLS, {"table"})
        node = HtmlNode(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for k in range(len(self.stack) - 1, 0, -1):
            if self.stack[k].tag == tag:
                del self.stack[k:]
                return
            if self.stack[k].tag == "table" and tag != "table":
                return  # never let a stray ``</td>`` close an outer table's cell

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_html(html: str) -> HtmlNode:
    """Lenient HTML -> tree. Never raises: on a parser failure the part read so far is returned."""
    builder = _TableTreeBuilder()
    try:
        builder.feed(html if isinstance(html, str) else "")
        builder.close()
    except Exception:  # noqa: BLE001 - html.parser has raised on odd declarations in some versions
        pass
    return builder.root


def find_tables(node: HtmlNode) -> list[HtmlNode]:
    """Top-level ``<table>`` elements in document order (tables nested in cells are not listed)."""
    found = []
    for child in node.children:
        if isinstance(child, HtmlNode):
            found.extend([child] if child.tag == "table" else find_tables(child))
    return found


def cell_tokens(cell: HtmlNode) -> list[str]:
    """A cell's content as PubTabNet tokenises it: single characters plus ``<b>``/``</b>``-style tag tokens.
    Whitespace runs become one space and the ends are trimmed, so layout whitespace does not count.
    """
    tokens: list[str] = []

    def walk(node: HtmlNode) -> None:
        for child in node.children:
            if isinstance(child, str):
                for ch in re.sub(r"\s+", " ", child):
                    if not (ch == " " and (not tokens or tokens[-1] == " ")):
                        tokens.append(ch)
            else:
                tokens.append(f"<{child.tag}>")
                if child.tag not in _VOID:
                    walk(child)
                    tokens.append(f"</{child.tag}>")

    walk(cell)
    while tokens and tokens[-1] == " ":
        tokens.pop()
    return tokens


def table_rows(table: HtmlNode) -> list[list[HtmlNode]]:
    """Rows of cells in document order, looking through thead/tbody/tfoot."""
    rows: list[list[HtmlNode]] = []
    for child in table.children:
        if isinstance(child, HtmlNode) and child.tag in _SECTIONS:
            rows.extend(table_rows(child))
        elif isinstance(child, HtmlNode) and child.tag == "tr":
            rows.append([c for c in child.children if isinstance(c, HtmlNode) and c.tag in _CELLS])
    return rows


def html_table_to_gfm(html: str) -> str | None:
    """A simple HTML table -> GitHub-flavoured markdown, first row as header.

    Returns None when GFM cannot say the same thing (colspan/rowspan > 1, no rows), so callers keep the HTML.
    """
    tables = find_tables(parse_html(html))
    rows = table_rows(tables[0]) if tables else []
    if not rows or any(c.span("colspan") > 1 or c.span("rowspan") > 1 for r in rows for c in r):
        return None
    width = max(len(r) for r in rows)
    if width == 0:
        return None
    text = [["".join(cell_tokens(c)).replace("|", "\\|") for c in r] + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(r) + " |" for r in text]
    lines.insert(1, "|" + " --- |" * width)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drawing


def _color(label: str | None) -> tuple[int, int, int]:
    # The official runner picks a random colour per element; a hash of the label keeps pictures reproducible.
    hue = (zlib.crc32((label or "").encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _check_image(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image) or image.width <= 0 or image.height <= 0:
        raise ImageError(f"expected a non-empty PIL image, got {type(image).__name__}")
    return image


def draw_blocks(image: Image.Image, blocks: Sequence[Block | Primitive]) -> Image.Image:
    """Boxes (and points) drawn on a copy of the *original* image, mapped with ``to_pixels``.

    Like the official runner: ``title`` outlines are 4 px wide and others 2 px, each box gets a translucent
    fill (alpha 20) and its label. Points become small filled circles.
    """
    base = _check_image(image).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(10, min(base.size) // 60))
    size = base.size
    for item in blocks:
        label = item.label
        color = _color(label)
        if isinstance(item, Primitive) and item.kind == "point":
            r = max(3, min(size) // 150)
            for p in item.coords:
                x, y = point_to_pixels(p, size)
                draw.ellipse((x - r, y - r, x + r, y + r), fill=color + (255,))
            continue
        boxes = item.boxes_999 if isinstance(item, Block) else item.coords
        for box in boxes:
            x1, y1, x2, y2 = box_to_pixels(box, size)
            width = 4 if label == "title" else 2
            draw.rectangle((x1, y1, x2, y2), fill=color + (20,), outline=color + (255,), width=width)
            if label:
                draw.text((x1, max(0, y1 - font.size - 2)), label, fill=color + (255,), font=font)
    return Image.alpha_composite(base, overlay).convert("RGB")


def crop_blocks(image: Image.Image, blocks: Sequence[Block], label: str = "image") -> list[Image.Image]:
    """One crop per box of every block with ``label`` (figures), in order; numbering matches ``strip_grounding``.

    A box that maps to zero pixels is widened to 1 px so the crop list stays aligned with the markdown links.
    """
    img = _check_image(image)
    crops = []
    for block in blocks:
        if block.label != label:
            continue
        for box in block.boxes_999:
            x1, y1, x2, y2 = box_to_pixels(box, img.size)
            x1, y1 = min(x1, img.width - 1), min(y1, img.height - 1)
            crops.append(img.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))))
    return crops
