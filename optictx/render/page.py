"""Page style, ground-truth records and the last step of every render: ink -> RGB image (+ augmentation).

Coordinates: ``box_px`` is ``(x1, y1, x2, y2)`` in pixels with x2/y2 exclusive (PIL crop convention), so
``image.crop(box_px)`` is exactly the box. ``box_999`` is the DeepSeek-OCR grid: ``v = round(x * 999 / W)``
(clamped to 0..999), the inverse of the official decoder's ``x_px = v / 999 * W`` (reference §7.3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from optictx.errors import RenderError

Box = tuple[int, int, int, int]
MAX_PAGE_PIXELS = 100_000_000
"""A page larger than this (e.g. 10000 x 10000 px) is a mistake, not a document: refuse it."""


def to_999(box: Box, width: int, height: int) -> Box:
    """Pixel box -> 0..999 grid of the DeepSeek-OCR grounding format (``v = round(x * 999 / W)``)."""
    x1, y1, x2, y2 = box

    def conv(v: float, size: int) -> int:
        return min(999, max(0, round(v * 999 / size)))

    return (conv(x1, width), conv(y1, height), conv(x2, width), conv(y2, height))


def from_999(box: Box, width: int, height: int) -> Box:
    """0..999 grid -> pixels, exactly as the official decoder maps boxes back (``int(v / 999 * W)``)."""
    x1, y1, x2, y2 = box
    return (int(x1 / 999 * width), int(y1 / 999 * height), int(x2 / 999 * width), int(y2 / 999 * height))


class TextBox(NamedTuple):
    """A word or a line and where its ink is: tight ink bounding box, pixels and 0..999 units.

    A NamedTuple rather than a dataclass because a dense page makes ~700 of them and tuple
    construction is several times cheaper; it is immutable all the same.
    """

    text: str
    box_px: Box
    box_999: Box


class Block(NamedTuple):
    """A layout block (label ``title`` / ``text`` / ``list`` / ``table`` / ``code``) as DeepSeek-OCR's
    grounding output names them; ``text`` is the source of the block (markdown for markdown pages)."""

    label: str
    text: str
    box_px: Box
    box_999: Box


@dataclass
class RenderedPage:
    """One rendered page and its ground truth.

    ``text`` is what is on the page, in reading order: visual lines joined by ``"\\n"`` (a blank line keeps
    paragraphs apart; for markdown it is the markdown source of the page). ``lines`` / ``words`` hold a
    box per non-empty line / per word (per character for CJK, which has no spaces to break on).
    ``words`` is built from ``word_boxes`` on first use: most training consumers read only text and lines.
    """

    image: Image.Image
    text: str
    lines: list[TextBox]
    word_boxes: list[tuple[str, Box]] = field(default_factory=list, repr=False)
    blocks: list[Block] = field(default_factory=list)
    index: int = 0

    @functools.cached_property
    def words(self) -> list[TextBox]:
        w, h = self.image.size
        sx, sy = 999 / w, 999 / h  # boxes are clipped to the page, so no clamping is needed
        return [TextBox(t, b, (round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy)))
                for t, b in self.word_boxes]


def _colour(value, name: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in value)
    except TypeError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise RenderError(f"{name} must be an (r, g, b) tuple of ints 0..255, got {value!r}")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class PageStyle:
    """How a page looks. Sizes are pixels of the output image (rendered straight at that size).

    ``font_size`` is pixels per em (12 pt at 144 DPI = 24 px; see :meth:`a4`). ``font_family`` is
    ``sans`` / ``serif`` / ``mono`` / ``cjk`` or a path to a font file. ``line_spacing`` is the baseline
    pitch in ems. Augmentation (off by default): Gaussian ``noise_std`` in grey levels, ``blur_radius``
    in pixels, and a random rotation uniform in ``±max_rotation_deg`` (boxes follow the rotation as
    axis-aligned hulls), all drawn from ``seed`` and the page index so a seeded run repeats exactly.
    """

    width: int = 1191
    height: int = 1684
    margin: int = 96
    font_family: str = "sans"
    font_size: int = 24
    line_spacing: float = 1.25
    columns: int = 1
    column_gap: int | None = None
    fg: tuple[int, int, int] = (0, 0, 0)
    bg: tuple[int, int, int] = (255, 255, 255)
    dpi: int = 144
    noise_std: float = 0.0
    blur_radius: float = 0.0
    max_rotation_deg: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (8 <= self.width and 8 <= self.height and self.width * self.height <= MAX_PAGE_PIXELS):
            raise RenderError(f"page {self.width}x{self.height} px is outside 8 px .. {MAX_PAGE_PIXELS} pixels")
        if not 0 <= 2 * self.margin < min(self.width, self.height):
            raise RenderError(f"margin {self.margin} px leaves no room on a {self.width}x{self.height} page")
        if not 3 <= self.font_size <= 1000:
            raise RenderError(f"font_size {self.font_size} px must be 3..1000")
        if not 0.8 <= self.line_spacing <= 5:
            raise RenderError(f"line_spacing {self.line_spacing} must be 0.8..5 (ems between baselines)")
        if not 1 <= self.columns <= 8 or (self.column_gap is not None and self.column_gap < 0):
            raise RenderError(f"columns must be 1..8 and column_gap >= 0, got {self.columns}, {self.column_gap}")
        if self.column_width < self.font_size:
            raise RenderError(f"columns {self.column_width:.0f} px wide cannot hold a {self.font_size} px font")
        object.__setattr__(self, "fg", _colour(self.fg, "fg"))
        object.__setattr__(self, "bg", _colour(self.bg, "bg"))
        if self.dpi <= 0 or self.noise_std < 0 or self.blur_radius < 0 or not 0 <= self.max_rotation_deg <= 45:
            raise RenderError("dpi must be > 0, noise_std and blur_radius >= 0, max_rotation_deg 0..45")

    @property
    def gap(self) -> int:
        return self.font_size * 2 if self.column_gap is None else self.column_gap

    @property
    def column_width(self) -> float:
        content = self.width - 2 * self.margin
        return (content - self.gap * (self.columns - 1)) / self.columns

    @classmethod
    def a4(cls, dpi: int = 144, font_pt: float = 12.0, margin_in: float = 0.75, **kw) -> "PageStyle":
        """A4 portrait at ``dpi`` with a ``font_pt`` point font (1 pt = dpi/72 px)."""
        px = dpi / 72
        return cls(width=round(595.28 * px), height=round(841.89 * px), margin=round(margin_in * dpi),
                   font_size=max(3, round(font_pt * px)), dpi=dpi, **kw)

    def with_(self, **kw) -> "PageStyle":
        """A copy with some fields changed (validated again)."""
        return replace(self, **kw)


def ink_to_image(ink: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> Image.Image:
    """Coverage (0 = paper, 255 = full ink) -> RGB. ``ink`` may be overwritten (it is scratch space).

    Black on white, the common case, inverts in place and merges one band three times: two C passes.
    """
    if fg == (0, 0, 0) and bg == (255, 255, 255):
        gray = Image.fromarray(np.subtract(255, ink, out=ink), "L")
        return Image.merge("RGB", (gray, gray, gray))
    gray = Image.fromarray(ink, "L")
    bands = [gray.point([round(b + (f - b) * v / 255) for v in range(256)]) for f, b in zip(fg, bg)]
    return Image.merge("RGB", bands)


def paper_to_image(paper: Image.Image, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> Image.Image:
    """Paper (255 = paper, 0 = full ink; an "L" image) -> RGB: the same colours as :func:`ink_to_image`."""
    if fg == (0, 0, 0) and bg == (255, 255, 255):
        return Image.merge("RGB", (paper, paper, paper))
    bands = [paper.point([round(b + (f - b) * (255 - p) / 255) for p in range(256)]) for f, b in zip(fg, bg)]
    return Image.merge("RGB", bands)


def _rotate_box(box: Box, angle: float, width: int, height: int) -> Box:
    """Axis-aligned hull of a box after PIL's counter-clockwise rotation about the image centre."""
    cx, cy = width / 2, height / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xs, ys = [], []
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
        dx, dy = x - cx, y - cy
        xs.append(cx + dx * c + dy * s)
        ys.append(cy - dx * s + dy * c)
    return (max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
            min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys))))


def augment(page: RenderedPage, style: PageStyle) -> RenderedPage:
    """Apply rotation, blur and noise; boxes follow the rotation. No-op (and free) when all are off."""
    if not (style.noise_std or style.blur_radius or style.max_rotation_deg):
        return page
    rng = np.random.default_rng(None if style.seed is None else (style.seed, page.index))
    image, (w, h) = page.image, page.image.size
    if style.max_rotation_deg:
        angle = float(rng.uniform(-style.max_rotation_deg, style.max_rotation_deg))
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=style.bg)

        def move(tb):
            box = _rotate_box(tb.box_px, angle, w, h)
            return tb._replace(box_px=box, box_999=to_999(box, w, h))

        page = replace(page, lines=[move(t) for t in page.lines], blocks=[move(b) for b in page.blocks],
                       word_boxes=[(t, _rotate_box(b, angle, w, h)) for t, b in page.word_boxes])
    if style.blur_radius:
        image = image.filter(ImageFilter.GaussianBlur(style.blur_radius))
    if style.noise_std:
        arr = np.asarray(image, dtype=np.float32)
        arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * style.noise_std
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return replace(page, image=image)
