"""Generation for every decoder in the zoo: prefill, KV-cache decode, sampling, stop rules, streaming, batching.

Any model with the one call protocol works (``DeepseekOCRForCausalLM``, ``DeepseekV2ForCausalLM``,
``PrimitivesModel``)::

    model(input_ids=[B, T], cache=KVCache, attention_mask=[B, cached + T] | None, logits_to_keep=1, **prefill)

where ``prefill`` (e.g. ``images=``/``images_seq_mask=`` or ``pixel_values=``) is passed on the first call
only: after it the image embeddings live in the cache. The cache itself is opaque (MHA keys/values, MLA
latents, CSA windows and compressed entries), so one loop drives them all.

The anti-loop guards are the two official ones (reference deepseek-ocr.md §7.1, §7.4):

* ``no_repeat_ngram_size`` — Hugging Face's: an n-gram may not occur twice in the whole sequence, prompt
  included (``infer()`` uses 20, 35 in eval mode). Kept as an incremental index: O(1) per token.
* ``ngram_size``/``window_size``/``whitelist_token_ids`` — the official vLLM ``NoRepeatNGramLogitsProcessor``:
  only generated tokens count, only n-grams starting in the last ``window_size`` of them, and whitelisted
  tokens (``<td>``, ``</td>``) are never banned so tables can repeat their tags (30/90 image, 20/50 PDF).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from optictx.errors import GenerationError
from optictx.model.cache import KVCache

TD_TOKENS = ("<td>", "</td>")  # the official whitelist: table cells legitimately repeat


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` is greedy (the official setting)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # seeds a private torch.Generator: sampling never touches the global RNG
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int = 2
    stop_strings: tuple[str, ...] = ()  # needs a tokenizer; the text is cut before the stop string
    no_repeat_ngram_size: int = 0  # HF guard over the whole sequence (0 = off)
    ngram_size: int = 0  # vLLM windowed guard (0 = off)
    window_size: int = 100
    whitelist_token_ids: frozenset[int] = frozenset()
    suppress_token_ids: frozenset[int] = frozenset()  # never generated (e.g. <image>: slots come from the prompt)
    use_cache: bool = True  # False recomputes the whole sequence every step (the baseline; tests, benchmarks)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (self.ngram_size >= 0, "ngram_size must be >= 0"),
            (self.ngram_size == 0 or self.window_size >= self.ngram_size,
             f"window_size {self.window_size} must be >= ngram_size {self.ngram_size}"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    @property
    def eos_ids(self) -> frozenset[int]:
        e = self.eos_token_id
        return frozenset() if e is None else frozenset([e] if isinstance(e, int) else e)


@dataclass
class GenerationOutput:
    """Per row: new token ids (EOS excluded), text (when a tokenizer was given) and why it stopped."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_lengths: list[int]
    texts: list[str] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


# --------------------------------------------------------------------------- anti-loop guards
def windowed_ngram_bans(output_ids: Sequence[int], ngram_size: int, window_size: int,
                        whitelist: frozenset[int] | set[int] = frozenset()) -> set[int]:
    """Tokens the official vLLM processor bans after ``output_ids`` (generated tokens only).

    The prefix is the last n-1 tokens; every n-gram that starts in the last ``window_size`` tokens and
    begins with that prefix bans its final token, unless whitelisted.
    """
    n, length = ngram_size, len(output_ids)
    if n <= 0 or length < n:
        return set()
    if n == 1:  # unigram: every token of the window (the vLLM code's empty prefix matches everything)
        return set(output_ids[max(0, length - window_size):]) - set(whitelist)
    prefix = list(output_ids[length - n + 1:])
    last = prefix[-1]
    banned = set()
    for i in range(max(0, length - window_size), length - n + 1):
        # cheap filter on the prefix's last token before the slice compare
        if output_ids[i + n - 2] == last and list(output_ids[i:i + n - 1]) == prefix:
            banned.add(output_ids[i + n - 1])
    return banned - set(whitelist)


class WindowedNGramLogitsProcessor:
    """Drop-in for the official ``NoRepeatNGramLogitsProcessor(ngram_size, window_size, whitelist_token_ids)``.

    ``processor(output_ids, logits[V]) -> logits`` with banned tokens at -inf (vLLM V0 signature), so the
    same object can be handed to a vLLM engine or used on its own.
    """

    def __init__(self, ngram_size: int, window_size: int = 100, whitelist_token_ids: Sequence[int] = ()):
        if ngram_size <= 0 or window_size <= 0:
            raise GenerationError(f"ngram_size ({ngram_size}) and window_size ({window_size}) must be positive")
        self.ngram_size, self.window_size = ngram_size, window_size
        self.whitelist_token_ids = frozenset(whitelist_token_ids)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        banned = windowed_ngram_bans(output_ids, self.ngram_size, self.window_size, self.whitelist_token_ids)
        if not banned:
            return logits
        logits = logits.clone()
        logits[..., sorted(banned)] = float("-inf")
        return logits


class NGramIndex:
    """HF ``no_repeat_ngram_size`` over a growing sequence, kept incrementally.

    ``index[(t1..t_{n-1})]`` holds every token that has followed that (n-1)-gram; the next token may not
    complete an n-gram already seen. Updating costs O(n) per token instead of HF's O(length) rescan.
    """

    def __init__(self, n: int, tokens: Sequence[int] = ()):
        if n <= 0:
            raise GenerationError(f"no_repeat_ngram_size must be positive, got {n}")
        self.n = n
        self.seq: list[int] = []
        self.index: dict[tuple[int, ...], set[int]] = {}
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        self.seq.append(token)
        if len(self.seq) >= self.n:
            key = tuple(self.seq[len(self.seq) - self.n:-1])
            self.index.setdefault(key, set()).add(token)

    def banned(self) -> set[int]:
        if len(self.seq) < self.n - 1:
            return set()
        key = tuple(self.seq[len(self.seq) - self.n + 1:]) if self.n > 1 else ()
        return self.index.get(key, set())


# --------------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits [B, V]``: argmax when ``temperature == 0``, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- text
class IncrementalDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte character or a BPE merge.

    The vLLM/TGI scheme: decode a short tail (from ``prefix`` to the end) and emit only what extends the
    decode of ``prefix..read``; a tail ending in U+FFFD is an unfinished UTF-8 sequence and waits. Stop
    strings are matched on the full text and the last ``len(stop) - 1`` characters are held back, so a
    delta never shows the beginning of a stop string that is then cut.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = ()):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.emitted = 0
        self.stops = tuple(stop_strings)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.stopped = False

    def _piece(self, final: bool) -> str:
        if getattr(self.tok, "needs_full_context", False):
            # grid tags (optictx.grid_tokenizer): a slice lacks its position marker, so decode it all; a
            # character placed before the end (out of reading order) is not shown until the final text
            full = self.tok.decode(self.ids)
            return full[len(self.text):] if full.startswith(self.text) else ""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def push(self, token: int) -> str:
        """Add a token; returns the text delta that is safe to show (maybe empty). Sets ``stopped``."""
        self.ids.append(token)
        old = len(self.text)
        self.text += self._piece(final=False)
        for s in self.stops:
            at = self.text.find(s, max(0, old - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self._emit(self.stopped)

    def finish(self) -> str:
        """Flush everything held back (the sequence ended)."""
        if not self.stopped:
            self.text += self._piece(final=True)
            if getattr(self.tok, "needs_full_context", False):  # out-of-order grid characters land here
                self.text = self.tok.decode(self.ids)
                self.emitted = min(self.emitted, len(self.text))
        return self._emit(True)

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


# --------------------------------------------------------------------------- inputs
def left_pad(seqs: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype = torch.long
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows -> ([B, T] left-padded with ``value``, attention mask [B, T] True on real entries)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise GenerationError("every prompt needs at least one token")
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), value, dtype=dtype)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, t - len(s):] = torch.as_tensor(list(s), dtype=dtype)
        mask[i, t - len(s):] = True
    return out, mask


def new_cache(model: torch.nn.Module) -> KVCache:
    """An empty cache with one slot per decoder layer of ``model``."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise GenerationError(f"{type(model).__name__} has no decoder layers to cache")
    return KVCache(num_layers=len(inner.layers))


def context_length(model: torch.nn.Module) -> int | None:
    """``max_position_embeddings`` of the decoder, if the config says (None = unbounded)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "language_config", cfg)
    return getattr(cfg, "max_position_embeddings", None)


def _logits(out: Any) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out)[:, -1]


# --------------------------------------------------------------------------- the loop
@dataclass
class _Row:
    index: int  # row in the caller's batch
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    hf_guard: NGramIndex | None = None
    text: IncrementalDecoder | None = None
    finish: str = ""


Step = list[tuple[int, int, str]]  # (row, token, text delta) for each row that advanced this step


def _prepare(input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None,
             cfg: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor):
        input_ids, attention_mask = left_pad(input_ids, cfg.pad_token_id)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be [batch, length] with length >= 1, got {list(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                                  f"{list(input_ids.shape)}")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal path is faster
        elif not bool(attention_mask[:, -1].all()):
            raise GenerationError("padding must be on the left (the last column must be real tokens)")
    return input_ids, attention_mask


def _max_new(model: torch.nn.Module, prompt_len: int, cfg: GenerationConfig) -> int:
    limit = context_length(model)
    if limit is None:
        return cfg.max_new_tokens
    if prompt_len >= limit:
        raise GenerationError(f"the prompt has {prompt_len} tokens but the model's context is {limit}; "
                              "use a smaller mode (fewer image slots) or a shorter prompt")
    return min(cfg.max_new_tokens, limit - prompt_len)


@torch.inference_mode()
def iter_steps(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
               config: GenerationConfig | None = None, *, tokenizer: Any = None,
               attention_mask: torch.Tensor | None = None, prefill: dict[str, Any] | None = None
               ) -> Generator[Step, None, GenerationOutput]:
    """The decode loop as a generator of per-step events; its return value is the ``GenerationOutput``.

    Finished rows leave the batch (their cache rows are dropped), so a batch costs what its live rows cost.
    """
    cfg = config or GenerationConfig()
    if cfg.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer")
    ids, mask = _prepare(input_ids, attention_mask, cfg)
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    prefill = prefill or {}
    rows = [_Row(b, ids[b][mask[b]].tolist() if mask is not None else ids[b].tolist()) for b in range(len(ids))]
    for r in rows:
        r.hf_guard = NGramIndex(cfg.no_repeat_ngram_size, r.prompt) if cfg.no_repeat_ngram_size else None
        r.text = IncrementalDecoder(tokenizer, cfg.stop_strings) if tokenizer is not None else None
    budget = _max_new(model, ids.shape[1], cfg)
    eos = cfg.eos_ids
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None

    t0 = time.perf_counter()
    cache = new_cache(model) if cfg.use_cache else None
    live = rows if budget > 0 else []
    seq = ids  # the full sequence, used only when recomputing (use_cache=False)
    logits = _logits(model(input_ids=ids, cache=cache, attention_mask=mask, logits_to_keep=1, **prefill)) \
        if live else None
    prefill_s, t1 = time.perf_counter() - t0, time.perf_counter()
    for step in range(budget):
        _ban(logits, live, cfg)
        tokens = sample_next(logits, cfg.temperature, cfg.top_p, generator)
        events, keep = [], []
        for i, (r, tok) in enumerate(zip(live, tokens.tolist())):
            if tok in eos:
                r.finish = "eos"
                events.append((r.index, tok, r.text.finish() if r.text else ""))
                continue
            r.out.append(tok)
            if r.hf_guard is not None:
                r.hf_guard.push(tok)
            delta = r.text.push(tok) if r.text else ""
            if r.text is not None and r.text.stopped:
                r.finish = "stop"
            elif step == budget - 1:
                r.finish = "length"
                delta += r.text.finish() if r.text else ""
            else:
                keep.append(i)
            events.append((r.index, tok, delta))
        yield events
        if not keep:
            break
        index = torch.tensor(keep, device=device)
        full = len(keep) == len(live)
        live = [live[i] for i in keep]
        nxt = tokens[index][:, None] if not full else tokens[:, None]
        if mask is not None:
            mask = torch.cat([mask if full else mask[index], mask.new_ones(len(keep), 1)], dim=1)
        if cfg.use_cache:
            if not full:
                cache.reorder(index)
            logits = _logits(model(input_ids=nxt, cache=cache, attention_mask=mask, logits_to_keep=1))
        else:
            seq = torch.cat([seq if full else seq[index], nxt], dim=1)
            logits = _logits(model(input_ids=seq, attention_mask=mask, logits_to_keep=1,
                                   **_rows_prefill(prefill, [r.index for r in live], len(rows), seq.shape[1])))
    return GenerationOutput(
        token_ids=[r.out for r in rows],
        finish_reasons=[r.finish or "length" for r in rows],
        prompt_lengths=[len(r.prompt) for r in rows],
        texts=[r.text.text for r in rows] if tokenizer is not None else None,
        prefill_s=prefill_s, decode_s=time.perf_counter() - t1,
    )


def _rows_prefill(prefill: dict[str, Any], live: list[int], n_rows: int, length: int) -> dict[str, Any]:
    """Prefill inputs for the recompute baseline: only full batches are supported (images are per row)."""
    if prefill and len(live) != n_rows:
        raise GenerationError("use_cache=False with images needs every row to run to the same length")
    m = prefill.get("images_seq_mask")
    if m is not None and m.shape[1] < length:  # generated tokens are never image slots, whatever their id
        return prefill | {"images_seq_mask": torch.cat([m, m.new_zeros(m.shape[0], length - m.shape[1])], 1)}
    return prefill


def _ban(logits: torch.Tensor, live: list[_Row], cfg: GenerationConfig) -> None:
    """Set suppressed and n-gram-banned tokens to -inf, in one indexed write for the whole batch."""
    if cfg.suppress_token_ids:
        logits[:, sorted(cfg.suppress_token_ids)] = float("-inf")
    if not (cfg.no_repeat_ngram_size or cfg.ngram_size):
        return
    rows, cols = [], []
    for i, r in enumerate(live):
        banned = set(r.hf_guard.banned()) if r.hf_guard is not None else set()
        if cfg.ngram_size:
            banned |= windowed_ngram_bans(r.out, cfg.ngram_size, cfg.window_size, cfg.whitelist_token_ids)
        rows += [i] * len(banned)
        cols += banned
    if rows:
        logits[rows, cols] = float("-inf")


# --------------------------------------------------------------------------- front doors
def generate(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
             config: GenerationConfig | None = None, *, tokenizer: Any = None,
             attention_mask: torch.Tensor | None = None, prefill: dict[str, Any] | None = None) -> GenerationOutput:
    """Run to completion. Ragged ``input_ids`` (lists) are left-padded; a tensor may come with its mask."""
    steps = iter_steps(model, input_ids, config, tokenizer=tokenizer, attention_mask=attention_mask, prefill=prefill)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class TextStream:
    """Iterator of text deltas for a single prompt; ``output`` holds the ``GenerationOutput`` once exhausted.

    ``"".join(stream) == stream.output.texts[0]`` always holds.
    """

    def __init__(self, steps: Generator[Step, None, GenerationOutput]):
        self._steps = steps
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                events = next(self._steps)
            except StopIteration as done:
                self.output = done.value
                return
            delta = "".join(d for _, _, d in events)
            if delta:
                yield delta


def stream(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], tokenizer: Any,
           config: GenerationConfig | None = None, *, prefill: dict[str, Any] | None = None) -> TextStream:
    """Stream the text of one prompt (``input_ids`` [T] or [1, T]) delta by delta."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise GenerationError(f"stream() takes one prompt, got a batch of {ids.shape[0]}; use generate()")
    return TextStream(iter_steps(model, ids, config, tokenizer=tokenizer, prefill=prefill))
