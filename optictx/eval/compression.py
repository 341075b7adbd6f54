"""Compression vs precision: how well a model reads pages that hold more and more text per vision token.

Held-out pages (licence texts, never used for training) are rendered with growing amounts of text on
the model's page size, in the bundled model's grid layout (optictx.data.ocr_pages: 8 x 16 px cells, so a
256-px page holds at most 16 lines of 32 characters, about 8-10x); each page's compression ratio is text tokens (DeepSeek tokenizer, as the paper
counts) / vision tokens. Every figure is printed next to two baselines measured on the same pages:
- the *mismatched-image control*: the model decodes page i from page i+1's image. Anything a model
  scores there comes from its language prior, not from reading;
- Tesseract reading the same pixels (upscaled 4x with bicubic, since it is tuned for ~30 px glyphs).
"""
from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from optictx.budget import text_tokens
from optictx.data.corpus import heldout_paragraphs
from optictx.data.ocr_pages import grid_shape, render_page, to_ascii
from optictx.eval.metrics import normalized_edit_distance, ocr_precision_recall, substitutions

# Ratio bins (text tokens per vision token), like the paper's Table 2 rows but in ratios.
BINS = ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 15), (15, 20), (20, 30))


@dataclass
class PageScore:
    ratio: float
    text_tokens: int
    lines: int
    precision: float
    edit_distance: float
    control_precision: float
    control_edit_distance: float
    tesseract_precision: float | None = None
    tesseract_edit_distance: float | None = None
    text: str = ""  # the page's ground truth and the model's reading, kept so every error can be looked at
    prediction: str = ""


def heldout_text(rng: random.Random, n_chars: int) -> str:
    paras = heldout_paragraphs()
    i = rng.randrange(len(paras))
    words = paras[i].split()[rng.randrange(3):]
    while sum(len(w) + 1 for w in words) < n_chars:
        i = (i + 1) % len(paras)
        words += paras[i].split()
    out, n = [], 0
    for w in words:
        if n + len(w) + 1 > n_chars and out:
            break
        out.append(w)
        n += len(w) + 1
    return to_ascii(" ".join(out))


def make_pages(n_pages: int, page_size: int = 256, grid: int = 4, seed: int = 4321) -> list:
    """`n_pages` held-out pages from one line up to a full page, evenly spread (a spread of ratios)."""
    rng = random.Random(seed)
    cols, rows = grid_shape(page_size)
    pages = []
    for k in range(n_pages):
        lines = max(1, round(rows * (k + 1) / n_pages))
        pages.append(render_page(heldout_text(rng, 2 * lines * cols), page_size, grid, max_lines=lines))
    return pages


def tesseract_read(image: Image.Image) -> str | None:
    """Tesseract on the same pixels (4x bicubic upscale); None when tesseract is not installed."""
    try:
        import pytesseract

        big = image.resize((image.width * 4, image.height * 4), Image.BICUBIC)
        return pytesseract.image_to_string(big, config="--psm 6")
    except Exception:  # pytesseract raises TesseractNotFoundError (and friends) when the binary is missing
        return None


def score_pages(read: Callable[[Image.Image], str], pages: list, vision_tokens: int,
                use_tesseract: bool = True, progress: bool = True) -> list[PageScore]:
    scores = []
    iterator = range(len(pages))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="eval compression", dynamic_ncols=True)
    for i in iterator:
        page = pages[i]
        other = pages[(i + 1) % len(pages)]
        pred = read(page.image)
        control = read(other.image)  # mismatched-image control: same target, another page's pixels
        p, _ = ocr_precision_recall(pred, page.text)
        cp, _ = ocr_precision_recall(control, page.text)
        n_tok = text_tokens(page.text)
        s = PageScore(ratio=n_tok / vision_tokens, text_tokens=n_tok, lines=page.n_lines, precision=p,
                      edit_distance=normalized_edit_distance(pred, page.text), control_precision=cp,
                      control_edit_distance=normalized_edit_distance(control, page.text), text=page.text,
                      prediction=pred)
        if use_tesseract:
            t = tesseract_read(page.image)
            if t is not None:
                s.tesseract_precision = ocr_precision_recall(t, page.text)[0]
                s.tesseract_edit_distance = normalized_edit_distance(t, page.text)
        scores.append(s)
    return scores


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def bin_table(scores: list[PageScore]) -> list[dict]:
    rows = []
    for lo, hi in BINS:
        sel = [s for s in scores if lo <= s.ratio < hi]
        if not sel:
            continue
        rows.append({
            "bin": f"{lo}-{hi}x", "pages": len(sel), "mean_ratio": _mean(s.ratio for s in sel),
            "precision": _mean(s.precision for s in sel), "edit_distance": _mean(s.edit_distance for s in sel),
            "control_precision": _mean(s.control_precision for s in sel),
            "control_edit_distance": _mean(s.control_edit_distance for s in sel),
            "tesseract_precision": _mean(s.tesseract_precision for s in sel),
            "tesseract_edit_distance": _mean(s.tesseract_edit_distance for s in sel),
        })
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    table = Table(title=title)
    for col in ("ratio bin", "pages", "mean ratio", "precision", "edit dist", "control prec.", "control ED",
                "tesseract prec.", "tesseract ED"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["bin"], str(r["pages"]), f"{r['mean_ratio']:.1f}x", fmt(r["precision"]),
                      f"{r['edit_distance']:.3f}", fmt(r["control_precision"]), f"{r['control_edit_distance']:.3f}",
                      fmt(r["tesseract_precision"]),
                      "-" if r["tesseract_edit_distance"] is None else f"{r['tesseract_edit_distance']:.3f}")
    Console().print(table)


def plot(scores: list[PageScore], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [s.ratio for s in scores]
    ax.scatter(xs, [s.precision for s in scores], s=12, label="model: precision")
    ax.scatter(xs, [s.control_precision for s in scores], s=12, marker="x", label="mismatched-image control")
    tess = [(s.ratio, s.tesseract_precision) for s in scores if s.tesseract_precision is not None]
    if tess:
        ax.scatter(*zip(*tess), s=12, marker="^", label="Tesseract, same pixels")
    ax.set_xlabel("compression ratio (DeepSeek text tokens / vision tokens)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def top_substitutions(scores: list[PageScore], n: int = 12) -> list[tuple[str, str, int]]:
    """The model's most frequent misreadings over all pages: (truth char, read char, count)."""
    total: Counter[tuple[str, str]] = Counter()
    for s in scores:
        total += substitutions(s.prediction, s.text)
    return [(a, b, k) for (a, b), k in total.most_common(n)]


def summary(scores: list[PageScore]) -> dict:
    """Headline numbers: precision at <=10x and at 15-25x, with the control beside them."""
    def at(lo, hi, attr):
        return _mean(getattr(s, attr) for s in scores if lo <= s.ratio < hi)

    return {
        "pages": len(scores),
        "precision_le_10x": at(0, 10, "precision"), "control_le_10x": at(0, 10, "control_precision"),
        "precision_10_15x": at(10, 15, "precision"), "control_10_15x": at(10, 15, "control_precision"),
        "precision_15_25x": at(15, 25, "precision"), "control_15_25x": at(15, 25, "control_precision"),
        "tesseract_le_10x": at(0, 10, "tesseract_precision"),
        "top_substitutions": [f"{a!r}->{b!r} x{k}" for a, b, k in top_substitutions(scores)],
    }


def to_jsonable(scores: list[PageScore]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(s).items()}
            for s in scores]
