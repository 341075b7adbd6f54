"""Optical memory: long LLM context kept as page images that fade with age, under a token budget.

DeepSeek-OCR ends with this idea ("visual decay", seed 004 §8) and ships no code: recent turns stay text;
older turns are rendered to pages; the older a page gets, the fewer vision tokens it may cost — it is
re-rendered denser or downsampled to a lower mode (Large -> Base -> Small -> Tiny -> nano), blurrier and
cheaper — until the oldest content is forgotten. Here:

* an **entry** is one turn (``add``) or one document chunk (``add_document``); it is rendered as
  ``"role: text"``. The newest entries that fit in ``recent_text_tokens`` stay text.
* older entries are grouped in order into **items** (runs of entries that fill ``item_pages`` pages at
  the last, densest level); an item is the unit that decays.
* a :class:`DecaySchedule` lists the **levels** (mode + font size, or "downsample the pages above") and
  the ages (in turns) where each begins. ``by="age"`` applies those ages as they are; ``by="budget"``
  uses them as the *shape* of the curve and scales it to the sharpest curve that fits the budget.
  Either way the context never exceeds the budget: more decay first, then the oldest items are dropped.

The plan (which item sits at which level) is a pure function of (entries, schedule, budget), so
``context(b)`` for any budget is reproducible and testable; every count comes from :mod:`optictx.budget`.
The entries' text is kept (it is what re-rendering needs and what the ledger counts); :meth:`recall`
never reads it: it decodes the images in context with the OCR reader.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from PIL import Image

from optictx.budget import get_mode, ocr_budget, text_tokens
from optictx.errors import ConfigError, MemoryStoreError, RenderError
from optictx.fileio import atomic_write, fsync_dir
from optictx.render import PageStyle, render_text

TINY_MODEL_FONT = "tiny-model"
"""``font_family`` alias for the bundled model's pinned font file (resolved per machine)."""
COUNTS = ("vision_tokens", "decoder_slots")
FORMAT, VERSION = "optictx-memory", 1
GRID = 0  # Level.font_size: the bundled model's typewriter grid (8 x 16 px cells) instead of free layout
Reader = Callable[[Image.Image], Any]


# --------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Level:
    """One step of the decay curve: a native mode, and either a font size (re-render the text at that
    size on the mode's square page), ``GRID`` (render in the bundled model's grid layout, see
    optictx.data.ocr_pages) or ``None`` (downsample the pages of the level above)."""

    mode: str
    font_size: int | None = None

    @property
    def side(self) -> int:
        return get_mode(self.mode).base_size


@dataclass(frozen=True)
class DecaySchedule:
    """Levels from sharpest to most decayed, and the age (turns) at which each level after the first begins.

    ``by="age"``: ``min_age`` is applied as it is (more decay only if the budget demands it).
    ``by="budget"``: ``min_age`` is the shape; the curve is scaled (ages × s) to the sharpest that fits.
    ``forget_after``: items at least this old are dropped whatever the budget (None: never by age).
    """

    levels: tuple[Level, ...]
    min_age: tuple[int, ...]
    by: str = "budget"
    forget_after: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(Level(*lv) if isinstance(lv, (list, tuple)) else lv
                                                 for lv in self.levels))
        object.__setattr__(self, "min_age", tuple(int(a) for a in self.min_age))
        if not self.levels or self.levels[0].font_size is None:
            raise ConfigError("a decay schedule needs levels, and the first must give a font_size to render at")
        if len(self.min_age) != len(self.levels) - 1:
            raise ConfigError(f"min_age needs one age per level after the first: {len(self.levels) - 1}, "
                              f"got {len(self.min_age)}")
        if any(a <= 0 for a in self.min_age) or list(self.min_age) != sorted(set(self.min_age)):
            raise ConfigError(f"min_age must be strictly increasing positive turns, got {list(self.min_age)}")
        if self.by not in ("age", "budget"):
            raise ConfigError(f"by must be 'age' or 'budget', got {self.by!r}")
        if self.forget_after is not None and self.forget_after <= 0:
            raise ConfigError(f"forget_after must be a positive number of turns or None, got {self.forget_after}")
        prev = None
        for i, lv in enumerate(self.levels):
            m = get_mode(lv.mode)
            if m.crop_mode:
                raise ConfigError(f"level {i}: {m.name!r} tiles by image size; use a native mode "
                                  f"(nano, tiny, small, base, large)")
            if prev is not None and (lv.side > prev.side or self.tokens_per_page(i) > self.tokens_per_page(i - 1)):
                raise ConfigError(f"level {i} ({lv.mode}) costs more per page than level {i - 1} ({prev.mode}): "
                                  f"a decay schedule must get cheaper")
            if lv.font_size is None and lv.side == self.levels[self.source(i)].side:
                raise ConfigError(f"level {i} downsamples to the same {lv.side}-px page: give it a font_size")
            prev = lv

    def source(self, level: int) -> int:
        """The level whose rendering this level's pages come from (itself, or the last one with a font)."""
        return max(i for i in range(level + 1) if self.levels[i].font_size is not None)

    def tokens_per_page(self, level: int, count: str = "vision_tokens") -> int:
        side = self.levels[level].side
        return getattr(ocr_budget(side, side, self.levels[level].mode), count)

    def font_px(self, level: int) -> float:
        """Font size in pixels of this level's pages (a downsampled page scales its source's font)."""
        src = self.levels[self.source(level)]
        if src.font_size == GRID:
            from optictx.data.ocr_pages import grid_font

            return grid_font().size * self.levels[level].side / src.side
        return src.font_size * self.levels[level].side / src.side

    def age_level(self, age: int, scale: float = 1.0) -> int:
        """Level of an item ``age`` turns old when the curve's ages are multiplied by ``scale``."""
        if math.isinf(scale):
            return 0
        return sum(age >= scale * a for a in self.min_age)

    def describe(self, scale: float = 1.0, count: str = "vision_tokens") -> list[dict]:
        """Rows for humans: level, mode, page side, font px, tokens per page, from which age, how made.
        ``from_age`` is where a level really begins under the plan's ``scale`` (by age, the given ages
        are a floor, so a scale above 1 changes nothing)."""
        eff = min(1.0, scale) if self.by == "age" else scale
        return [{"level": i, "mode": lv.mode, "side": lv.side, "font_px": round(self.font_px(i), 1),
                 "tokens_per_page": self.tokens_per_page(i, count),
                 "from_age": 0 if i == 0 else (math.inf if math.isinf(eff) else eff * self.min_age[i - 1]),
                 "made_by": "render" if lv.font_size is not None else f"downsample L{self.source(i)}"}
                for i, lv in enumerate(self.levels)]

    @classmethod
    def tiny(cls, by: str = "budget", min_age: Sequence[int] = (), **kw) -> "DecaySchedule":
        """For the bundled tiny model: one level, 256-px grid pages (16 vision tokens, up to 512 characters),
        the only layout it was trained to read. There is no cheaper mode to decay to, so under a tight
        budget the oldest items are forgotten (``forget_after`` also forgets by age)."""
        if tuple(min_age):
            raise ConfigError("the tiny schedule has one level, so no ages; min_age applies to mono and paper")
        return cls((Level("nano", GRID),), (), by, **kw)

    @classmethod
    def mono(cls, by: str = "budget", min_age: Sequence[int] = (8, 32, 128), **kw) -> "DecaySchedule":
        """Free-layout decay on 256-px pages (16 vision tokens): the text re-rendered at 16 -> 14 -> 12 -> 10 px
        mono (about 4.5x -> 12x text tokens per vision token), for readers that read free layout."""
        return cls(tuple(Level("nano", f) for f in (16, 14, 12, 10)), tuple(min_age), by, **kw)

    @classmethod
    def paper(cls, by: str = "budget", min_age: Sequence[int] = (4, 16, 64, 256), font_size: int = 20,
              **kw) -> "DecaySchedule":
        """The paper's picture for the official model: render on a Large page, then downsample the same pages
        Large -> Base -> Small -> Tiny -> nano (400 -> 256 -> 100 -> 64 -> 16 vision tokens, blurrier)."""
        levels = (Level("large", font_size),) + tuple(Level(m) for m in ("base", "small", "tiny", "nano"))
        return cls(levels, tuple(min_age), by, **kw)

    def to_json(self) -> dict:
        return {"levels": [[lv.mode, lv.font_size] for lv in self.levels], "min_age": list(self.min_age),
                "by": self.by, "forget_after": self.forget_after}


# --------------------------------------------------------------------------- entries and items
@dataclass(frozen=True)
class Entry:
    turn: int
    role: str
    text: str

    @property
    def line(self) -> str:
        """What is rendered (and what the text window holds): ``role: text``."""
        return f"{self.role}: {self.text}"

    @cached_property
    def tokens(self) -> int:
        return text_tokens(self.line)


@dataclass(frozen=True)
class Item:
    """Consecutive archived entries that decay together."""

    index: int
    entries: tuple[Entry, ...]

    @cached_property
    def text(self) -> str:
        return "\n".join(e.line for e in self.entries)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:20]

    @property
    def tokens(self) -> int:
        return sum(e.tokens for e in self.entries)


def count_pages(text: str, style: PageStyle) -> int:
    """Pages ``render_text(text, style)`` would make, by layout only (no painting: ~5x cheaper), so the
    planner can price every item at every level. Tests hold it equal to ``len(render_text(...))``."""
    from optictx.render.text import _lines, layout, metrics, paragraphs, prepare

    text, ts = prepare(text, style)
    m = metrics(style, ts)
    pages, _ = layout(_lines(paragraphs(text), ts, style.column_width), m.per_column, style.columns)
    return len(pages)


def plan_levels(ages: Sequence[int], costs: Sequence[Sequence[int]], schedule: DecaySchedule,
                limit: int) -> tuple[list[int | None], float]:
    """Level per item (oldest first; None = forgotten) so that the summed cost is ``<= limit``.

    ``costs[i][j]`` is item i's token cost at level j (non-increasing in j for a valid schedule). Items
    past ``forget_after`` go; then the oldest go until the rest fit at the last level; then the largest
    curve scale s that fits is found by bisection over the finitely many scales where some item changes
    level (``age / min_age[k]``). By "age", the ages as given are a floor no item goes above.
    Returns the levels and s (``inf``: nothing had to decay).
    """
    n, last = len(ages), len(schedule.levels) - 1
    keep = [i for i in range(n) if schedule.forget_after is None or ages[i] < schedule.forget_after]
    while keep and sum(costs[i][last] for i in keep) > limit:
        keep.pop(0)
    floor = {i: schedule.age_level(ages[i]) if schedule.by == "age" else 0 for i in keep}

    def levels_at(s: float) -> dict[int, int]:
        return {i: max(floor[i], schedule.age_level(ages[i], s)) for i in keep}

    def fits(s: float) -> bool:
        return sum(costs[i][j] for i, j in levels_at(s).items()) <= limit

    scales = [math.inf] + sorted({ages[i] / a for i in keep for a in schedule.min_age}, reverse=True) + [0.0]
    lo, hi = 0, len(scales) - 1  # scales[-1] = 0 puts every kept item at the last level, which fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(scales[mid]) else (mid + 1, hi)
    chosen = levels_at(scales[hi])
    return [chosen.get(i) for i in range(n)], scales[hi]


# --------------------------------------------------------------------------- what the LLM is fed
@dataclass
class TextPart:
    turn: int
    role: str
    text: str
    tokens: int  # budget.text_tokens("role: text")


@dataclass
class ContextImage:
    image: Image.Image
    item: int
    page: int
    level: int
    mode: str
    font_px: float
    vision_tokens: int  # budget.ocr_budget(w, h, mode).vision_tokens
    decoder_slots: int  # ... .decoder_slots (what the decoder sequence really holds)
    text: str  # ground truth drawn on the page: for evaluation and debugging, never fed to the LLM


@dataclass
class LedgerRow:
    """One item: how old, at which level, what its pages cost, and the text tokens it stands for."""

    item: int
    first_turn: int
    last_turn: int
    age: int
    level: int | None  # None: forgotten (not in context)
    mode: str | None
    font_px: float | None
    pages: int
    vision_tokens: int
    decoder_slots: int
    text_tokens: int

    @property
    def compression(self) -> float | None:
        """Text tokens per vision token (the paper's ratio); None when forgotten."""
        return self.text_tokens / self.vision_tokens if self.vision_tokens else None


@dataclass
class Ledger:
    budget: int
    count: str  # which image count the budget is spent in: vision_tokens (paper) or decoder_slots
    recent_text_tokens: int
    image_tokens: int  # in `count` units
    rows: list[LedgerRow]
    scale: float  # decay-curve scale chosen (inf: no decay needed)
    schedule: list[dict] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.recent_text_tokens + self.image_tokens

    @property
    def image_text_tokens(self) -> int:
        """Text tokens the images in context stand for."""
        return sum(r.text_tokens for r in self.rows if r.level is not None)

    @property
    def text_tokens_saved(self) -> int:
        return self.image_text_tokens - self.image_tokens

    @property
    def forgotten_text_tokens(self) -> int:
        return sum(r.text_tokens for r in self.rows if r.level is None)

    @property
    def represented_text_tokens(self) -> int:
        """Text tokens of the conversation still reachable: the recent text plus what the images hold."""
        return self.recent_text_tokens + self.image_text_tokens


@dataclass
class Context:
    """What an LLM would be fed, oldest first: page images, then the recent turns as text; and the ledger."""

    images: list[ContextImage]
    text: list[TextPart]
    ledger: Ledger


@dataclass
class Passage:
    text: str
    score: float  # rapidfuzz 0..100
    source: str  # "image" (OCR-decoded) or "text" (the recent window)
    first_turn: int
    last_turn: int
    item: int | None = None
    level: int | None = None


# --------------------------------------------------------------------------- the memory
def tiny_page_style() -> PageStyle:
    """The free-layout look of the mono schedule (DejaVu Sans Mono, 256-px reference page)."""
    return PageStyle(width=256, height=256, margin=4, font_family=TINY_MODEL_FONT, font_size=10, line_spacing=1.15)


class OpticalMemory:
    """Conversation / document memory with visual decay under ``budget_tokens``.

    ``reader``: None (the bundled tiny OCR model, loaded on first recall), an ``optictx.ocr.OCR`` (any
    backend), or any callable ``image -> str | object with .text``. ``page_style`` gives the look (font
    family, line spacing, colours, margin as a fraction of its width); levels set page size and font size.
    """

    def __init__(self, budget_tokens: int = 2000, recent_text_tokens: int = 500,
                 schedule: DecaySchedule | None = None, reader: Reader | None = None,
                 page_style: PageStyle | None = None, item_pages: int = 2, count: str = "vision_tokens"):
        for name, v, lo in (("budget_tokens", budget_tokens, 1), ("recent_text_tokens", recent_text_tokens, 0),
                            ("item_pages", item_pages, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if count not in COUNTS:
            raise ConfigError(f"count must be one of {COUNTS}, got {count!r}")
        self.budget_tokens, self.recent_text_tokens, self.item_pages, self.count = (
            budget_tokens, recent_text_tokens, item_pages, count)
        self.schedule = schedule or DecaySchedule.tiny()
        self.page_style = page_style or tiny_page_style()
        self.reader = reader
        self.entries: list[Entry] = []
        self._starts: list[int] = [0]  # item boundaries (greedy, so stable as entries are appended)
        self._scanned = 0
        self._pages_cache: dict[tuple[str, int], int] = {}
        self._render_cache: dict[tuple[str, int], list[tuple[Image.Image, str]]] = {}
        self._decoded: dict[str, str] = {}

    # ----------------------------------------------------------------- adding
    @property
    def turns(self) -> int:
        return self.entries[-1].turn + 1 if self.entries else 0

    def add(self, role: str, text: str) -> None:
        """Append one turn. Decay is computed when the context is asked for, so adding is cheap."""
        if not isinstance(role, str) or not role.strip() or "\n" in role or ":" in role:
            raise ConfigError(f"role must be a non-empty one-line name without ':', got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise RenderError("empty text: a turn needs something to remember")
        self.entries.append(Entry(self.turns, role.strip(), text.strip()))

    def add_document(self, text: str, role: str = "document", chunk_tokens: int = 256) -> int:
        """Append a document as consecutive chunks of at most ``chunk_tokens`` tokens, one turn each (so its
        older parts fade first). Returns the number of chunks."""
        chunks = chunk_text(text, chunk_tokens)
        for c in chunks:
            self.add(role, c)
        return len(chunks)

    # ----------------------------------------------------------------- planning
    def style(self, level: int) -> PageStyle:
        """The page style a level renders with (its source level's, for a downsampling level)."""
        lv = self.schedule.levels[self.schedule.source(level)]
        base = self.page_style
        font = base.font_family
        if font == TINY_MODEL_FONT:
            from optictx.data.ocr_pages import tiny_model_font

            font = tiny_model_font()
        margin = max(2, round(lv.side * base.margin / base.width))
        return base.with_(width=lv.side, height=lv.side, margin=margin, font_size=lv.font_size, font_family=font)

    def _grid(self, level: int) -> bool:
        return self.schedule.levels[self.schedule.source(level)].font_size == GRID

    def _n_pages(self, text: str, digest: str, source: int) -> int:
        key = (digest, source)
        if key not in self._pages_cache:
            if self._grid(source):
                from optictx.data.ocr_pages import grid_lines, grid_shape

                side = self.schedule.levels[source].side
                self._pages_cache[key] = max(1, -(-len(grid_lines(text, side)) // grid_shape(side)[1]))
            else:
                self._pages_cache[key] = count_pages(text, self.style(source))
        return self._pages_cache[key]

    def _window_start(self, budget: int) -> int:
        """Index of the first entry kept as text: the newest entries within min(recent, budget) tokens."""
        cap, used, start = min(self.recent_text_tokens, budget), 0, len(self.entries)
        while start > 0 and used + self.entries[start - 1].tokens <= cap:
            start -= 1
            used += self.entries[start].tokens
        return start

    def _items(self, n: int) -> list[Item]:
        """Greedy groups of ``entries[:n]``, each filling at most ``item_pages`` pages at the last level."""
        last_src = self.schedule.source(len(self.schedule.levels) - 1)
        for i in range(self._scanned, n):
            start = self._starts[-1]
            if i > start:
                trial = Item(-1, tuple(self.entries[start:i + 1]))
                if self._n_pages(trial.text, trial.digest, last_src) > self.item_pages:
                    self._starts.append(i)
        self._scanned = max(self._scanned, n)
        bounds = [s for s in self._starts if s < n] + [n]
        return [Item(k, tuple(self.entries[a:b])) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def _pages(self, item: Item, level: int) -> list[tuple[Image.Image, str]]:
        """(image, ground-truth text) per page of an item at a level, rendered or downsampled, cached."""
        key = (item.digest, level)
        if key not in self._render_cache:
            src = self.schedule.source(level)
            if src != level:
                side = self.schedule.levels[level].side
                pages = [(im.resize((side, side), Image.Resampling.LANCZOS), t) for im, t in self._pages(item, src)]
            elif self._grid(level):
                from optictx.data.ocr_pages import render_grid_pages

                side = self.schedule.levels[level].side
                pages = [(p.image, p.text) for p in render_grid_pages(item.text, side, max(1, side // 64))]
            else:
                pages = [(p.image, p.text) for p in render_text(item.text, self.style(level))]
            self._render_cache[key] = pages
        return self._render_cache[key]

    def context(self, budget_tokens: int | None = None) -> Context:
        """The images and recent text an LLM would be fed under ``budget_tokens`` (default: the memory's),
        with a ledger whose every count comes from optictx.budget."""
        return self._context(budget_tokens)[0]

    def _context(self, budget_tokens: int | None) -> tuple[Context, list[Item]]:
        budget = self.budget_tokens if budget_tokens is None else budget_tokens
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ConfigError(f"budget_tokens must be an integer >= 1, got {budget!r}")
        start = self._window_start(budget)
        text = [TextPart(e.turn, e.role, e.text, e.tokens) for e in self.entries[start:]]
        recent = sum(t.tokens for t in text)
        items = self._items(start)
        sch, L, now = self.schedule, len(self.schedule.levels), self.turns - 1
        per_page = [sch.tokens_per_page(j, self.count) for j in range(L)]
        n_pages = [[self._n_pages(it.text, it.digest, sch.source(j)) for j in range(L)] for it in items]
        ages = [now - it.entries[-1].turn for it in items]
        costs = [[n_pages[i][j] * per_page[j] for j in range(L)] for i in range(len(items))]
        levels, scale = plan_levels(ages, costs, sch, budget - recent)
        images, rows = [], []
        for it, age, lvl in zip(items, ages, levels):
            row = LedgerRow(it.index, it.entries[0].turn, it.entries[-1].turn, age, lvl, None, None, 0, 0, 0, it.tokens)
            if lvl is not None:
                lv = sch.levels[lvl]
                for p, (im, gt) in enumerate(self._pages(it, lvl)):
                    b = ocr_budget(im.width, im.height, lv.mode)
                    images.append(ContextImage(im, it.index, p, lvl, lv.mode, sch.font_px(lvl), b.vision_tokens,
                                               b.decoder_slots, gt))
                    row.pages += 1
                    row.vision_tokens += b.vision_tokens
                    row.decoder_slots += b.decoder_slots
                row.mode, row.font_px = lv.mode, sch.font_px(lvl)
            rows.append(row)
        image_tokens = sum(getattr(r, self.count) for r in rows)
        ledger = Ledger(budget, self.count, recent, image_tokens, rows, scale, sch.describe(scale, self.count))
        return Context(images, text, ledger), items

    # ----------------------------------------------------------------- recall
    def _reader(self) -> Reader:
        if self.reader is None:  # the bundled tiny model, loaded on first use
            from optictx.ocr import OCR

            self.reader = OCR("tiny", prompt="free-ocr", max_new_tokens=1024)
        return self.reader

    def read_pages(self, images: Sequence[Image.Image], batch_size: int = 8) -> list[str]:
        """Decode page images with the reader, each distinct image once per memory (cached by pixels).
        A reader with a ``batch`` method (optictx.ocr.OCR) gets ``batch_size`` pages per call."""
        keys = [hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest() for im in images]
        todo = dict(zip(keys, images))
        todo = {k: im for k, im in todo.items() if k not in self._decoded}
        if todo:
            from tqdm import tqdm

            reader, pending = self._reader(), list(todo.items())
            batch = getattr(reader, "batch", None)
            step = batch_size if callable(batch) else 1
            with tqdm(total=len(pending), desc="reading memory pages", unit="page", disable=None) as bar:
                for i in range(0, len(pending), step):
                    chunk = pending[i:i + step]
                    outs = batch([im for _, im in chunk]) if callable(batch) else [reader(chunk[0][1])]
                    for (k, _), out in zip(chunk, outs):
                        self._decoded[k] = _as_text(out)
                    bar.update(len(chunk))
        return [self._decoded[k] for k in keys]

    def recall(self, query: str, k: int = 3, budget_tokens: int | None = None) -> list[Passage]:
        """The ``k`` passages best matching ``query`` among what the context holds: every image in it is
        decoded by the reader (cached per image), split into sentences and ranked with rapidfuzz together
        with the recent text. Newer passages win ties."""
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("recall needs a non-empty query")
        ctx = self.context(budget_tokens)
        found: list[Passage] = []
        by_item: dict[int, list[ContextImage]] = {}
        for ci in ctx.images:
            by_item.setdefault(ci.item, []).append(ci)
        rows = {r.item: r for r in ctx.ledger.rows}
        roles = sorted({e.role for e in self.entries})
        decoded_pages = iter(self.read_pages([ci.image for pages in by_item.values() for ci in pages]))
        for item, pages in by_item.items():
            decoded = " ".join(next(decoded_pages) for _ in pages)
            r = rows[item]
            found += [Passage(s, 0.0, "image", r.first_turn, r.last_turn, item, r.level)
                      for s in split_passages(decoded, roles)]
        for t in ctx.text:
            found += [Passage(s, 0.0, "text", t.turn, t.turn) for s in split_passages(f"{t.role}: {t.text}", roles)]
        q = query_keywords(query)
        for p in found:
            p.score = match_score(q, p.text)
        found.sort(key=lambda p: (-p.score, -p.last_turn))
        return found[:k]

    # ----------------------------------------------------------------- persistence
    def config_json(self) -> dict:
        style = asdict(self.page_style)
        style["fg"], style["bg"] = list(style["fg"]), list(style["bg"])
        return {"budget_tokens": self.budget_tokens, "recent_text_tokens": self.recent_text_tokens,
                "item_pages": self.item_pages, "count": self.count, "schedule": self.schedule.to_json(),
                "page_style": style}

    def save(self, folder: Union[str, Path]) -> Path:
        """Write page PNGs (content-addressed names, each via tmp + os.replace), then the manifest last
        (tmp + fsync + os.replace), then delete files the new manifest no longer names. A crash at any
        point leaves a folder whose manifest names only complete files: the previous or the new memory."""
        folder = Path(folder)
        (folder / "pages").mkdir(parents=True, exist_ok=True)
        ctx, items = self._context(None)
        pages = []
        for ci in ctx.images:
            data = png_bytes(ci.image)
            sha = hashlib.sha256(data).hexdigest()
            name = f"pages/i{ci.item:05d}-L{ci.level}-p{ci.page:03d}-{sha[:16]}.png"
            if not (folder / name).is_file() or file_sha256(folder / name) != sha:
                atomic_write(folder / name, data, sync_dir=False)
            pages.append({"item": ci.item, "digest": items[ci.item].digest, "level": ci.level, "page": ci.page,
                          "file": name, "sha256": sha, "text": ci.text})
        fsync_dir(folder / "pages")  # every page is durable before the manifest names it
        manifest = {"format": FORMAT, "version": VERSION, "config": self.config_json(),
                    "entries": [{"turn": e.turn, "role": e.role, "text": e.text} for e in self.entries],
                    "pages": pages}
        atomic_write(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
        keep = {p["file"] for p in pages}  # now unreferenced: old pages and temp files of crashed saves
        for f in [*(folder / "pages").iterdir(), *folder.glob(".manifest.json.*.tmp")]:
            if f.parent == folder or f"pages/{f.name}" not in keep:
                f.unlink(missing_ok=True)
        return folder / "manifest.json"

    @classmethod
    def load(cls, folder: Union[str, Path], reader: Reader | None = None) -> "OpticalMemory":
        """Read a saved memory; its page images come from the PNGs (checked against their sha256)."""
        folder = Path(folder)
        path = folder / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MemoryStoreError(f"no optical memory at {folder} (no manifest.json); create one with "
                                   f"`optictx memory add FILE --dir {folder}`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MemoryStoreError(f"{path} is unreadable ({e}); restore it from a backup") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise MemoryStoreError(f"{path} is not an {FORMAT} v{VERSION} manifest")
        try:
            cfg = manifest["config"]
            style = dict(cfg["page_style"], fg=tuple(cfg["page_style"]["fg"]), bg=tuple(cfg["page_style"]["bg"]))
            mem = cls(cfg["budget_tokens"], cfg["recent_text_tokens"], DecaySchedule(**cfg["schedule"]), reader,
                      PageStyle(**style), cfg["item_pages"], cfg["count"])
            mem.entries = [Entry(int(e["turn"]), str(e["role"]), str(e["text"])) for e in manifest["entries"]]
            loaded: dict[tuple[str, int], list] = {}
            owner: dict[tuple[str, int], int] = {}  # items with identical text share pages: keep one copy
            for p in manifest["pages"]:
                key = (p["digest"], int(p["level"]))
                if owner.setdefault(key, int(p["item"])) == int(p["item"]):
                    loaded.setdefault(key, []).append(p)
        except (KeyError, TypeError, ValueError) as e:
            raise MemoryStoreError(f"{path} is malformed ({type(e).__name__}: {e})") from None
        for key, pages in loaded.items():
            mem._render_cache[key] = [(_load_png(folder, p), p["text"]) for p in sorted(pages, key=lambda p: p["page"])]
        return mem


# --------------------------------------------------------------------------- helpers
def chunk_text(text: str, chunk_tokens: int) -> list[str]:
    """Split a document at paragraph, then sentence, then word boundaries into chunks of at most
    ``chunk_tokens`` DeepSeek tokens (pieces are packed greedily, in order)."""
    from optictx.render.fit import truncate_to_tokens

    if not isinstance(chunk_tokens, int) or chunk_tokens < 8:
        raise ConfigError(f"chunk_tokens must be an integer >= 8, got {chunk_tokens!r}")
    if not isinstance(text, str) or not text.strip():
        raise RenderError("empty document: there is nothing to remember")
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        for sent in re.split(r"(?<=[.!?])\s+", para.strip()):
            while sent and text_tokens(sent) > chunk_tokens:
                head = truncate_to_tokens(sent, chunk_tokens, text_tokens)
                pieces.append(head)
                sent = sent[len(head):].strip()
            if sent:
                pieces.append(sent)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and text_tokens(chunks[-1] + " " + piece) <= chunk_tokens:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return chunks


def split_passages(text: str, roles: Sequence[str] = (), max_chars: int = 300) -> list[str]:
    """Sentences of a decoded text, line wraps undone (the reader returns visual lines); a turn's
    ``role:`` prefix also starts a passage, since a turn need not end with punctuation."""
    flat = " ".join(text.split())
    bounds = r"(?<=[.!?])\s+"
    if roles:
        bounds += "|\\s+(?=(?:" + "|".join(re.escape(r) for r in roles) + "): )"
    out = []
    for s in re.split(bounds, flat):
        while len(s) > max_chars:
            cut = s.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(s[:cut])
            s = s[cut:].strip()
        if s:
            out.append(s)
    return out


_QUESTION_WORDS = frozenset("what which who whom whose where when how is was are were did does do tell me please "
                            "remind recall".split())


def query_keywords(query: str) -> str:
    """The query without its leading question scaffolding ("what is", "remind me"): statements say
    "the code for locker 17 is 4831", questions "what is the code for locker 17?"."""
    from rapidfuzz import utils

    words = utils.default_process(query).split()
    while len(words) > 1 and words[0] in _QUESTION_WORDS:
        words.pop(0)
    return " ".join(words)


def match_score(keywords: str, passage: str) -> float:
    """Best alignment of the keywords inside the passage (rapidfuzz partial_ratio; robust to OCR typos).
    A passage shorter than the keywords cannot contain them, so it is scored by plain ratio instead."""
    from rapidfuzz import fuzz, utils

    p = utils.default_process(passage)
    return float(fuzz.partial_ratio(keywords, p) if len(p) >= len(keywords) else fuzz.ratio(keywords, p))


def _as_text(out: Any) -> str:
    text = out if isinstance(out, str) else getattr(out, "text", None)
    if not isinstance(text, str):
        raise ConfigError(f"the reader returned {type(out).__name__}; it must return a str or an "
                          f"object with a .text str (an optictx.ocr PageResult)")
    return text


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




def _load_png(folder: Path, page: dict) -> Image.Image:
    path = folder / page["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MemoryStoreError(f"page {path} named by the manifest is unreadable ({e})") from None
    if hashlib.sha256(data).hexdigest() != page["sha256"]:
        raise MemoryStoreError(f"page {path} does not match its sha256 in the manifest (corrupted or edited)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise MemoryStoreError(f"page {path} is not a readable PNG ({e})") from None
