"""Dynamic batching: pages from concurrent requests are collected for a few milliseconds and decoded as one
left-padded batch (one prefill, one decode loop), with each row's text deltas sent back to its request.

Why: decoding is memory-bound, so one step over 8 rows costs little more than one step over 1 row; a
server that runs requests one by one leaves most of that on the table. The batcher is a single worker
thread (the model is not re-entrant) fed by a bounded queue; a full queue is refused at once (HTTP 429)
instead of letting latency grow without limit.

The engine is the part that knows the model: :class:`TorchEngine` here (our ``OCR`` pipeline) or
``optictx.backends.vllm_backend.VLLMEngine``. Both take a list of :class:`Work` and return one
``PageResult`` (or a typed error) per row.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from optictx.errors import GenerationError, OptictxError


class QueueFullError(OptictxError):
    """The server already holds as many pages as its queue allows; retry later."""

    http_status = 429


class RequestTimeoutError(OptictxError):
    """The request did not finish within the server's request timeout."""

    http_status = 504


class CancelledError(OptictxError):
    """The client went away or timed out before its page was decoded."""

    http_status = 499


@dataclass(frozen=True)
class Sampling:
    """Decoding settings that must be shared by every row of a batch (rows are grouped by this)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Work:
    """One page to decode: the engine's prepared inputs, the row's own token budget and its delta sink."""

    job: Any
    max_new_tokens: int
    sampling: Sampling = Sampling()
    emit: Callable[[str], None] = lambda delta: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Engine(Protocol):
    """What the server needs from a backend."""

    model_id: str
    backend: str
    modes: list[str]
    default_mode: str
    default_prompt: str
    default_max_new_tokens: int

    def prepare(self, image: Any, *, mode: str | None, prompt: str | None, target: str | None,
                page: int | None) -> Any:
        """Load/preprocess one page (any thread); raise a typed error for bad input."""

    def run(self, works: Sequence[Work]) -> list[Any]:
        """Decode the rows together; one ``PageResult`` or ``OptictxError`` per row, in order."""

    def job_info(self, job: Any) -> tuple[tuple[int, int], Any]:
        """((width, height) of the original page, the ``budget.Mode`` it is read in)."""


# --------------------------------------------------------------------------- the batcher
class DynamicBatcher:
    """A bounded queue and one worker thread that runs up to ``max_batch`` pages per engine call.

    ``max_wait_ms`` is how long the worker waits after the oldest queued page for more to arrive;
    ``max_batch=1`` turns batching off (pages run one by one, in arrival order).
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0 or max_wait_ms < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 0, max_wait_ms >= 0")
        self.engine = engine
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._queue: deque[Work] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running = 0
        self.batches = 0  # engine calls so far
        self.rows = 0  # pages decoded so far
        self.max_batch_rows = 0  # the largest batch seen (tests and /health show batching happened)

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="optictx-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for w in pending:
            _fail(w, CancelledError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- producers
    def submit(self, works: Sequence[Work]) -> None:
        """Queue all of ``works`` or none of them (a PDF's pages are accepted together or refused)."""
        with self._cond:
            if self._stopping:
                raise CancelledError("the server is shutting down")
            if len(self._queue) + len(works) > self.max_queue:
                raise QueueFullError(
                    f"the server queue is full ({len(self._queue)} of {self.max_queue} pages waiting, "
                    f"{len(works)} more asked); retry in a moment"
                )
            now = time.monotonic()
            for w in works:
                w.queued_at = now
                self._queue.append(w)
            self._cond.notify_all()

    # -- the worker
    def _take(self) -> list[Work] | None:
        """Block for the next batch: as soon as ``max_batch`` pages wait, or ``max_wait`` after the oldest."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                deadline = self._queue[0].queued_at + self.max_wait_s
                while len(self._queue) < self.max_batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                live = [w for w in batch if not _drop_cancelled(w)]
                if live:
                    self.running = len(live)
                    return live

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                for group in _group(batch):
                    self._run(group)
            finally:
                self.running = 0

    def _run(self, works: list[Work]) -> None:
        self.batches += 1
        self.rows += len(works)
        self.max_batch_rows = max(self.max_batch_rows, len(works))
        try:
            results = self.engine.run(works)
        except OptictxError as e:
            results = [e] * len(works)
        except Exception as e:  # a bug must fail these requests, never kill the worker
            results = [RuntimeError(f"{type(e).__name__}: {e}")] * len(works)
        for w, r in zip(works, results):
            _settle(w, r)


def _group(batch: list[Work]) -> list[list[Work]]:
    """Rows that can share one decode loop: same sampling settings, arrival order kept."""
    groups: dict[Sampling, list[Work]] = {}
    for w in batch:
        groups.setdefault(w.sampling, []).append(w)
    return list(groups.values())


def _settle(w: Work, outcome: Any) -> None:
    """Resolve a row's future; a request that gave up (timeout) may have cancelled it already."""
    try:
        if isinstance(outcome, BaseException):
            w.future.set_exception(outcome)
        else:
            w.future.set_result(outcome)
    except InvalidStateError:
        pass


def _fail(w: Work, error: BaseException) -> None:
    _settle(w, error)


def _drop_cancelled(w: Work) -> bool:
    if w.cancelled.is_set():
        _fail(w, CancelledError("cancelled before it ran"))
        return True
    return False


# --------------------------------------------------------------------------- the torch engine
class TorchEngine:
    """Our ``OCR`` pipeline behind the batcher: any mode per request, rows of one batch decoded together.

    Rows keep their own ``max_new_tokens``: the batch decodes up to the largest, a row that reaches its own
    budget stops emitting and is finished with ``finish_reason="length"``, exactly as if it had run alone.
    When every row is finished or cancelled the loop is closed early.
    """

    backend = "torch"

    def __init__(self, ocr, model_id: str | None = None):
        from optictx.budget import MODES

        self.ocr = ocr
        self.model_id = model_id or (ocr.model_path.name if getattr(ocr, "model_path", None) else "optictx")
        self.default_mode = ocr.mode.name
        self.default_prompt = ocr.prompt
        self.default_max_new_tokens = ocr.generation.max_new_tokens
        self.modes = list(MODES)
        self._per_mode = {ocr.mode.name: ocr}
        self._lock = threading.Lock()

    def _for_mode(self, mode: str | None):
        """An ``OCR`` sharing the model and settings, for ``mode`` (views and results depend on the mode)."""
        from optictx.budget import get_mode
        from optictx.ocr import OCR

        name = get_mode(mode).name if mode else self.default_mode
        with self._lock:
            if name not in self._per_mode:
                o = OCR.from_model(self.ocr.model, self.ocr.tokenizer, mode=name, prompt=self.ocr.prompt,
                                   max_pixels=self.ocr.max_pixels)
                o.generation = self.ocr.generation
                o.model_path = getattr(self.ocr, "model_path", None)
                self._per_mode[name] = o
            return self._per_mode[name]

    def prepare(self, image: Any, *, mode: str | None = None, prompt: str | None = None,
                target: str | None = None, page: int | None = None) -> tuple[Any, Any]:
        from optictx.generate import context_length

        ocr = self._for_mode(mode)
        job = ocr.prepare(image, prompt, target, page, keep_image=False)
        limit = context_length(ocr.model)
        if limit is not None and len(job.prompt) >= limit:
            raise GenerationError(f"the prompt has {len(job.prompt)} tokens (image slots included) but the model's "
                                  f"context is {limit}; use a smaller mode")
        return ocr, job

    def warmup(self) -> None:
        """One 2-token page: loads lazy imports, the DeepSeek tokenizer used for text-token counts, kernels."""
        from PIL import Image

        work = Work(job=self.prepare(Image.new("RGB", (64, 64), "white")), max_new_tokens=2)
        (result,) = self.run([work])
        if isinstance(result, BaseException):
            raise result

    def job_info(self, job: tuple[Any, Any]) -> tuple[tuple[int, int], Any]:
        return job[1].size, job[1].views.mode

    def run(self, works: Sequence[Work]) -> list[Any]:
        from optictx.generate import GenerationOutput, iter_steps, left_pad

        base = self.ocr
        jobs = [w.job[1] for w in works]
        s = works[0].sampling
        budget = [w.max_new_tokens for w in works]
        cfg = dataclasses.replace(base.generation, max_new_tokens=max(budget), temperature=s.temperature,
                                  top_p=s.top_p, seed=s.seed,
                                  eos_token_id=None if s.ignore_eos else base.generation.eos_token_id)
        eos = cfg.eos_ids
        ids, mask = left_pad([j.prompt.input_ids for j in jobs], cfg.pad_token_id)
        n = len(works)
        tokens: list[list[int]] = [[] for _ in range(n)]
        texts, finish = [""] * n, [""] * n
        t0 = time.perf_counter()
        t_first = None
        steps = iter_steps(base.model, ids, cfg, tokenizer=base.tokenizer, attention_mask=mask,
                           prefill=base.prefill_inputs(jobs))
        try:
            for events in steps:
                t_first = t_first or time.perf_counter()
                for row, tok, delta in events:
                    if finish[row]:
                        continue  # past its own budget: the batch runs on for others
                    if tok in eos:
                        finish[row] = "eos"
                    else:
                        tokens[row].append(tok)
                    if delta:
                        texts[row] += delta
                        works[row].emit(delta)
                    if not finish[row] and len(tokens[row]) >= budget[row]:
                        finish[row] = "length"
                        self._flush(works[row], tokens[row], texts, row)
                if all(finish[i] or works[i].cancelled.is_set() for i in range(n)):
                    break
        finally:
            steps.close()
        t_end = time.perf_counter()
        t_first = t_first or t_end
        out = GenerationOutput(token_ids=tokens, finish_reasons=[f or "length" for f in finish],
                               prompt_lengths=[len(j.prompt) for j in jobs], texts=texts,
                               prefill_s=t_first - t0, decode_s=t_end - t_first)
        results: list[Any] = []
        for i, w in enumerate(works):
            if w.cancelled.is_set() and not finish[i]:
                results.append(CancelledError("cancelled while decoding"))
            else:
                results.append(w.job[0].page_result(jobs[i], out, i))
        return results

    def _flush(self, work: Work, ids: list[int], texts: list[str], row: int) -> None:
        """A row cut at its own budget: emit what the incremental decoder still held back."""
        full = self.ocr.tokenizer.decode(ids)
        if full.startswith(texts[row]) and len(full) > len(texts[row]):
            rest = full[len(texts[row]):]
            texts[row] = full
            work.emit(rest)
