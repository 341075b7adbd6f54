"""Synthetic OCR pages for training the bundled tiny model: image + exact text + where each character is.

A sample is a pure function of ``(seed, index, level)``, so a training run can resume at any step and
replay exactly the same pages. Besides the text, a sample records for every character the vision token
(cell of the encoder's token grid) that covers it. Training uses this to ground the encoder (each token
must encode the characters it covers) and to guide one attention head of the decoder onto the token it
is reading: the two signals the probes before this issue found missing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from optictx.data.corpus import TextSampler, heldout_paragraphs
from optictx.render import PageStyle, render_text

# Tiny-model font: one fixed monospace face, pinned by file (DejaVu Sans Mono, Debian fonts-dejavu-core) so that
# installing another mono font (e.g. Noto Sans Mono) never changes the pixels the bundled model was trained on.
TINY_MODEL_FONT = "DejaVuSansMono.ttf"


def tiny_model_font() -> str:
    from optictx.errors import RenderError
    from optictx.render.fonts import find_font

    found = find_font([(TINY_MODEL_FONT, 0)])
    if found is None:
        raise RenderError(f"the bundled model reads {TINY_MODEL_FONT}; install Debian fonts-dejavu-core")
    return found.path


@dataclass
class OCRPage:
    image: Image.Image
    text: str  # exact text on the page, lines joined by "\n"
    char_cells: list[int]  # for each character of `text`: index of the vision-token cell covering it (-1: none)
    font_size: int
    n_lines: int
    lines: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # text, box px


@dataclass(frozen=True)
class Level:
    """Curriculum level: how many lines and which font sizes a page may have."""

    max_lines: int
    font_sizes: tuple[int, ...]


def char_cells(text_lines: list[tuple[str, tuple[float, float, float, float]]], page_size: int, grid: int) -> list[int]:
    """Map each character (and the "\n" between lines) to the grid cell under its centre.

    Character x-centres are spread evenly over the line box, which is exact for a monospace font.
    A newline belongs to the cell of the next line's first character (that is what the reader looks at next).
    """
    cell = page_size / grid
    out: list[int] = []
    for li, (line, (x1, y1, x2, y2)) in enumerate(text_lines):
        if li > 0:
            out.append(-2)  # placeholder for the "\n": filled below
        n = max(1, len(line))
        yc = (y1 + y2) / 2
        row = min(grid - 1, max(0, int(yc // cell)))
        for i in range(len(line)):
            xc = x1 + (i + 0.5) * (x2 - x1) / n
            col = min(grid - 1, max(0, int(xc // cell)))
            out.append(row * grid + col)
    for i, c in enumerate(out):  # a newline looks at the next character's cell
        if c == -2:
            out[i] = out[i + 1] if i + 1 < len(out) else -1
    return out


def render_page(text: str, font_size: int, page_size: int, grid: int, max_lines: int | None = None) -> OCRPage:
    """Render `text` on one square page; text that does not fit is dropped (the target is what is drawn)."""
    style = PageStyle(width=page_size, height=page_size, margin=max(2, page_size // 64), font_family=tiny_model_font(),
                      font_size=font_size, line_spacing=1.15)
    page = render_text(text, style)[0]
    lines = [(b.text, b.box_px) for b in page.lines]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        page = render_text("\n".join(t for t, _ in lines), style)[0]
        lines = [(b.text, b.box_px) for b in page.lines]
    page_text = "\n".join(t for t, _ in lines)
    return OCRPage(page.image, page_text, char_cells(lines, page_size, grid), font_size, len(lines), lines)


class OCRPageSource:
    """Deterministic stream of training pages (`seed`, `index`) -> page, at a given curriculum level."""

    def __init__(self, seed: int, page_size: int = 256, grid: int = 4):
        self.seed, self.page_size, self.grid = seed, page_size, grid
        self.sampler = TextSampler(seed)

    def page(self, index: int, level: Level) -> OCRPage:
        rng = random.Random(self.seed * 1_000_003 + index)
        self.sampler.rng = rng  # the sampler's choices follow this page's RNG (Faker keeps its own seed)
        self.sampler.faker.seed_instance(self.seed * 7919 + index)
        font = rng.choice(level.font_sizes)
        n_lines = rng.randint(1, level.max_lines)
        chars_per_line = int(self.page_size / (0.6 * font)) + 2
        text = self.sampler.sample(n_lines * chars_per_line + 8)
        return render_page(text, font, self.page_size, self.grid, max_lines=n_lines)


def heldout_pages(n: int, font_size: int, page_size: int = 256, grid: int = 4, seed: int = 1234,
                  max_lines: int | None = None) -> list[OCRPage]:
    """Pages of held-out licence text (never seen in training), for evaluation and the demo."""
    paras = heldout_paragraphs()
    rng = random.Random(seed)
    pages = []
    for _ in range(n):
        i = rng.randrange(len(paras))
        words = paras[i].split()
        words = words[rng.randrange(max(1, len(words) // 3)):]
        while sum(len(w) + 1 for w in words) < 3 * (page_size / (0.6 * font_size)) * (page_size / font_size):
            i = (i + 1) % len(paras)
            words += paras[i].split()
        pages.append(render_page(" ".join(words), font_size, page_size, grid, max_lines=max_lines))
    return pages
