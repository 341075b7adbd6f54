"""The data engine's one record (:class:`OCRSample`) and an on-the-fly ``IterableDataset`` over every source.

A sample is a pure function of ``(task, seed, index)`` plus the source's config: nothing is stored, a
training run regenerates exactly the same image and target from three values, and a run resumes by
starting at a sample index. Every sample carries its text-token count (DeepSeek tokenizer, the paper's
unit) and its vision-token count in a DeepSeek-OCR mode, so its compression ratio is known.

Sharding. Rank ``r`` of ``W`` reads indices ``start + r, start + r + W, ...``; inside a rank, DataLoader
worker ``w`` of ``K`` reads every K-th of those. The DataLoader returns its workers' outputs round robin,
so a rank sees its indices in increasing order whatever ``num_workers`` is, shards never overlap, and
resuming after ``n`` samples per rank is ``start + n * W``.
"""
from __future__ import annotations

import importlib
import itertools
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from optictx.budget import ocr_budget, text_tokens
from optictx.errors import ConfigError

DEFAULT_MODE = "tiny"
# task -> "module:function" with signature (seed, index, mode, config) -> OCRSample; imported on first use
# so a worker that never draws a chart never imports matplotlib, and chemistry needs RDKit only when drawn.
GENERATORS: dict[str, str] = {
    "document": "optictx.data.documents:document_sample",
    "chart": "optictx.data.ocr2:chart_sample",
    "formula": "optictx.data.ocr2:formula_sample",
    "chemistry": "optictx.data.ocr2:chemistry_sample",
    "geometry": "optictx.data.ocr2:geometry_sample",
}
TASKS = tuple(GENERATORS)


def default_tasks() -> tuple[str, ...]:
    """Every task whose dependencies are installed (chemistry needs the optional RDKit)."""
    import importlib.util

    return tuple(t for t in TASKS if t != "chemistry" or importlib.util.find_spec("rdkit") is not None)


@dataclass
class OCRSample:
    """One training example: the image, the prompt, the target the model writes, and its token accounting.

    ``text`` is the content on the image without grounding markup (what the text-token count measures);
    ``target`` is what the decoder is trained to write (may hold ``<|ref|>``/``<|det|>`` spans or HTML).
    ``meta`` holds JSON-able facts about how the sample was made (layout, language, text source, ...).
    """

    task: str
    image: Image.Image
    prompt: str
    target: str
    text: str
    seed: int
    index: int
    mode: str
    text_tokens: int
    vision_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """Text tokens per vision token (the paper's compression ratio)."""
        return self.text_tokens / self.vision_tokens

    def record(self) -> dict[str, Any]:
        """Everything but the image, as JSON-able values (for a JSONL manifest next to the PNG)."""
        return {"task": self.task, "seed": self.seed, "index": self.index, "prompt": self.prompt,
                "target": self.target, "text": self.text, "mode": self.mode, "width": self.image.width,
                "height": self.image.height, "text_tokens": self.text_tokens, "vision_tokens": self.vision_tokens,
                "compression": round(self.compression, 4), "meta": self.meta}


def make_sample(task: str, image: Image.Image, prompt: str, target: str, text: str, seed: int, index: int,
                mode: str, meta: dict[str, Any] | None = None) -> OCRSample:
    """Build a sample and count its tokens: the one place counts are computed, so every source agrees."""
    budget = ocr_budget(image.width, image.height, mode)
    return OCRSample(task, image, prompt, target, text, seed, index, budget.mode.name, text_tokens(text),
                     budget.vision_tokens, dict(meta or {}))


def sample_rng(seed: int, index: int, task: str) -> np.random.Generator:
    """The RNG of one sample: an independent stream per (seed, index, task), equal in every process.

    The task enters as a CRC of its name (``hash()`` is salted per process and would break determinism).
    """
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index), zlib.crc32(task.encode())])


def generator(task: str) -> Callable[..., OCRSample]:
    """The generator function of a task (imports its module on first use)."""
    if task not in GENERATORS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (or 'pdf' with pdf_dir)")
    module, name = GENERATORS[task].split(":")
    return getattr(importlib.import_module(module), name)


def generate(task: str, seed: int, index: int, mode: str = DEFAULT_MODE, config: Any = None) -> OCRSample:
    """One sample of a task; ``config`` is the task's config dataclass (None: its defaults)."""
    return generator(task)(seed, index, mode, config)


def _weights(tasks: Mapping[str, float] | Sequence[str] | str) -> dict[str, float]:
    items = {tasks: 1.0} if isinstance(tasks, str) else dict(tasks) if isinstance(tasks, Mapping) \
        else {t: 1.0 for t in tasks}
    if not items or any(not isinstance(w, (int, float)) or w < 0 for w in items.values()) or sum(items.values()) <= 0:
        raise ConfigError(f"task weights must be non-negative numbers with a positive sum, got {items!r}")
    return {t: float(w) for t, w in items.items() if w > 0}


def shard_indices(start: int, stop: int | None, rank: int, world: int, worker: int, workers: int) -> Iterator[int]:
    """The sample indices one DataLoader worker of one rank produces (see the module doc)."""
    if not (0 <= rank < world and 0 <= worker < workers) or start < 0:
        raise ConfigError(f"bad shard: rank {rank}/{world}, worker {worker}/{workers}, start {start}")
    first, step = start + rank + worker * world, world * workers
    return iter(range(first, stop, step)) if stop is not None else itertools.count(first, step)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class OCRDataset(IterableDataset):
    """Samples of a task mixture, rendered on the fly in DataLoader worker processes.

    ``tasks``: a task name, a list (equal weights) or ``{task: weight}`` (None: :func:`default_tasks`);
    ``"pdf"`` reads pairs exported by ``optictx data pdf`` from ``pdf_dir``. Index ``i`` draws its task from
    ``(seed, i)``, then the task's generator makes the sample from ``(seed, i)``: a fixed seed is a fixed
    dataset. ``start``/``stop`` bound the global indices (``stop=None``: endless); ``rank``/``world_size``
    default to torch.distributed. ``configs`` maps a task to its config dataclass.
    """

    def __init__(self, tasks: Mapping[str, float] | Sequence[str] | str | None = None, seed: int = 0, start: int = 0,
                 stop: int | None = None, mode: str = DEFAULT_MODE, *, rank: int | None = None,
                 world_size: int | None = None, configs: Mapping[str, Any] | None = None,
                 pdf_dir: str | None = None):
        super().__init__()
        self.weights = _weights(default_tasks() if tasks is None else tasks)
        unknown = [t for t in self.weights if t not in GENERATORS and t != "pdf"]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)} or 'pdf'")
        if "pdf" in self.weights and pdf_dir is None:
            raise ConfigError("task 'pdf' needs pdf_dir: a folder written by `optictx data pdf`")
        ocr_budget(64, 64, mode)  # refuse an unknown mode now, not inside a worker
        self.seed, self.start, self.stop, self.mode = seed, start, stop, mode
        self.rank, self.world_size = rank, world_size
        self.configs = dict(configs or {})
        self.pdf_dir = pdf_dir
        self._pdf = None  # opened lazily, once per worker process
        self._names, cum = list(self.weights), np.cumsum(list(self.weights.values()))
        self._cum = cum / cum[-1]

    def task_of(self, index: int) -> str:
        """The task of global sample ``index`` (drawn from its own RNG stream, independent of the sample's)."""
        u = sample_rng(self.seed, index, "mixture").random()
        return self._names[min(int(np.searchsorted(self._cum, u, side="right")), len(self._names) - 1)]

    def sample(self, index: int) -> OCRSample:
        task = self.task_of(index)
        if task == "pdf":
            if self._pdf is None:
                from optictx.data.pdf_pairs import PdfPairStore

                self._pdf = PdfPairStore(self.pdf_dir)
            return self._pdf.sample(self.seed, index, self.mode)
        return generate(task, self.seed, index, self.mode, self.configs.get(task))

    def __getitem__(self, index: int) -> OCRSample:  # random access for previews and tests
        return self.sample(index)

    def indices(self) -> Iterator[int]:
        """The indices this process (rank and DataLoader worker) produces."""
        dr, dw = _dist_rank_world()
        rank = dr if self.rank is None else self.rank
        world = dw if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return shard_indices(self.start, self.stop, rank, world, worker, workers)

    def __iter__(self) -> Iterator[OCRSample]:
        for i in self.indices():
            yield self.sample(i)


def collate_samples(batch: list[OCRSample]) -> list[OCRSample]:
    """DataLoader ``collate_fn`` that keeps samples as they are (images stay PIL; the model's
    preprocessing turns them into tensors in the training task)."""
    return list(batch)
