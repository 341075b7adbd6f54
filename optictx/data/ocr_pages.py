"""Synthetic OCR pages for training the bundled tiny model: image + exact text + where each character is.

A sample is a pure function of ``(seed, index, level)``, so a training run can resume at any step and
replay exactly the same pages. Besides the text, a sample records for every character the vision token
(cell of the encoder's token grid) that covers it. Training uses this to ground the encoder (each token
must encode the characters it covers) and to guide one attention head of the decoder onto the token it
is reading: the two signals the probes before this issue found missing.
"""
from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass, field

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from optictx.data.corpus import TextSampler, heldout_paragraphs

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
    """Curriculum level: how many lines a page may have."""

    max_lines: int


NEWLINE = -2  # placeholder for the "\n" between lines in per-character lists


def newlines_look_ahead(values: list[int]) -> list[int]:
    """Give each NEWLINE placeholder the next character's value (what the reader looks at next); -1 at the end."""
    return [(values[i + 1] if i + 1 < len(values) else -1) if v == NEWLINE else v for i, v in enumerate(values)]


def char_cells(text_lines: list[tuple[str, tuple[float, float, float, float]]], page_size: int, grid: int) -> list[int]:
    """Map each character (and the "\n" between lines) to the grid cell under its centre.

    Character x-centres are spread evenly over the line box, which is exact for a monospace font.
    A newline belongs to the cell of the next line's first character (that is what the reader looks at next).
    """
    cell = page_size / grid
    out: list[int] = []
    for li, (line, (x1, y1, x2, y2)) in enumerate(text_lines):
        if li > 0:
            out.append(NEWLINE)
        n = max(1, len(line))
        yc = (y1 + y2) / 2
        row = min(grid - 1, max(0, int(yc // cell)))
        for i in range(len(line)):
            xc = x1 + (i + 0.5) * (x2 - x1) / n
            col = min(grid - 1, max(0, int(xc // cell)))
            out.append(row * grid + col)
    return newlines_look_ahead(out)


# The bundled model reads a typewriter grid: every character sits in its own 8 x 16 px cell, so two characters
# fill one 16-px SAM patch and one line fills one patch row, and a vision token (64 x 64 px) covers exactly
# 8 characters x 4 lines. The font is sized so that its advance is exactly one cell (DejaVu Sans Mono advance =
# 1233/2048 em). On free layouts (glyphs at any sub-patch phase) a from-scratch 16-px-patch ViT needs far more
# CPU hours than we have before it sees glyphs (issue 6 probes: per-character accuracy 10% after 300 steps,
# versus learning within ~100 steps when the phase is fixed).
CELL_W, CELL_H = 8, 16


@lru_cache(maxsize=None)
def grid_font() -> ImageFont.FreeTypeFont:
    font = ImageFont.truetype(tiny_model_font(), size=100)
    size = 100 * CELL_W / font.getlength("M")
    return ImageFont.truetype(tiny_model_font(), size=size)


def grid_shape(page_size: int) -> tuple[int, int]:
    """(columns, rows) of the character grid on a square page."""
    return page_size // CELL_W, page_size // CELL_H


def wrap_grid(text: str, columns: int) -> list[str]:
    """Greedy word wrap to at most `columns` characters; longer words are cut; newlines are kept."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            while len(word) > columns:
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:columns])
                word = word[columns:]
            if not word:
                continue
            if not line:
                line = word
            elif len(line) + 1 + len(word) <= columns:
                line += " " + word
            else:
                lines.append(line)
                line = word
        if line:
            lines.append(line)
    return lines


def render_page(text: str, page_size: int = 256, grid: int = 4, max_lines: int | None = None) -> OCRPage:
    """Render `text` on one square grid page; text that does not fit is dropped (the target is what is drawn).

    Raises RenderError for characters outside printable ASCII (the model's alphabet: DejaVu draws them all).
    """
    from optictx.errors import RenderError

    bad = sorted({c for c in text if not (" " <= c <= "~") and c != "\n"})
    if bad:
        raise RenderError(f"the bundled model reads printable ASCII only; cannot draw {''.join(bad)!r}")
    cols, rows = grid_shape(page_size)
    lines = wrap_grid(text, cols)[: min(rows, max_lines or rows)]
    image = Image.new("RGB", (page_size, page_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = grid_font()
    ascent, descent = font.getmetrics()
    baseline = (CELL_H - (ascent + descent)) / 2 + ascent  # glyphs centred vertically in the cell
    boxes = []
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            if ch != " ":
                draw.text((c * CELL_W, r * CELL_H + baseline), ch, font=font, fill=(0, 0, 0), anchor="ls")
        boxes.append((line, (0.0, float(r * CELL_H), float(len(line) * CELL_W), float((r + 1) * CELL_H))))
    page_text = "\n".join(lines)
    return OCRPage(image, page_text, char_cells(boxes, page_size, grid), CELL_H, len(lines), boxes)


def to_ascii(text: str) -> str:
    """Fold text into the model's alphabet: accents dropped (NFKD), other characters outside ASCII removed."""
    folded = unicodedata.normalize("NFKD", text.replace("\t", " ")).encode("ascii", "ignore").decode("ascii")
    return "".join(c for c in folded if " " <= c <= "~" or c == "\n")


def grid_lines(text: str, page_size: int = 256) -> list[str]:
    """The lines `text` fills on grid pages (folded to ASCII, word-wrapped)."""
    return wrap_grid(to_ascii(text), grid_shape(page_size)[0])


def render_grid_pages(text: str, page_size: int = 256, grid: int = 4) -> list[OCRPage]:
    """All of `text` on as many grid pages as it needs (at least one), e.g. for optical memory."""
    lines, rows = grid_lines(text, page_size), grid_shape(page_size)[1]
    return [render_page("\n".join(lines[i:i + rows]), page_size, grid) for i in range(0, max(1, len(lines)), rows)]


class OCRPageSource:
    """Deterministic stream of training pages (`seed`, `index`) -> page, at a given curriculum level."""

    def __init__(self, seed: int, page_size: int = 256, grid: int = 4, text_weights: dict | None = None):
        self.seed, self.page_size, self.grid = seed, page_size, grid
        self.sampler = TextSampler(seed, text_weights)

    def page(self, index: int, level: Level) -> OCRPage:
        rng = random.Random(self.seed * 1_000_003 + index)
        self.sampler.rng = rng  # the sampler's choices follow this page's RNG (Faker keeps its own seed)
        self.sampler.faker.seed_instance(self.seed * 7919 + index)
        n_lines = rng.randint(1, level.max_lines)
        cols, _ = grid_shape(self.page_size)
        text = to_ascii(self.sampler.sample(n_lines * (cols + 4) + 8))
        return render_page(text, self.page_size, self.grid, max_lines=n_lines)


def heldout_pages(n: int, lines: int, page_size: int = 256, grid: int = 4, seed: int = 1234) -> list[OCRPage]:
    """`n` pages of `lines` lines of held-out licence text (never seen in training), for evaluation."""
    paras = heldout_paragraphs()
    rng = random.Random(seed)
    cols, _ = grid_shape(page_size)
    pages = []
    for _ in range(n):
        i = rng.randrange(len(paras))
        words = paras[i].split()
        words = words[rng.randrange(max(1, len(words) // 3)):]
        while sum(len(w) + 1 for w in words) < 2 * lines * cols:
            i = (i + 1) % len(paras)
            words += paras[i].split()
        pages.append(render_page(to_ascii(" ".join(words)), page_size, grid, max_lines=lines))
    return pages
