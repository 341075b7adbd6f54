"""DeepSeek-V4 compressed sparse attention (CSA), heavily compressed attention (HCA) and window-only layers.

One layer = MQA where each token has a single key/value vector (K = V, ``head_dim`` wide, rope on its last
``qk_rope_head_dim`` channels), seen through one sparse gather per query (V4 ``sparse_attn``):

* a sliding window of the last ``sliding_window`` raw tokens (every layer);
* compressed entries, each pooling ``m = compress_ratios[layer]`` tokens with a learned, per-channel gated
  softmax (``Compressor``). Entry j covers slots [j·m, (j+1)·m) and is visible to the query at slot t iff
  ``j < (t+1) // m`` (its block has finished). m = 4 (CSA): blocks overlap the previous block and a
  ``LightningIndexer`` picks the top-k visible entries per query; m = 128 (HCA): no overlap, every visible
  entry is used; m = 0: window only;
* a per-head attention sink: a learned logit that only enlarges the softmax denominator (a query may
  attend to "nothing"; it also keeps rows with no visible key finite).

Blocks are aligned to absolute sequence slots (``cache.seen + i``), never to modality boundaries. Only
complete blocks are emitted; the unfinished block waits in the cache and decode finishes it, so cached
decoding equals one full pass. Memory never grows with T×T: queries are processed in chunks, each gathering
only its (window + top-k) keys, and the indexer scores one chunk of queries against the compressed keys.

Deliberately left out (numerics only, no change in what attends to what): FP8/FP4 quantisation simulation,
the indexer's Hadamard rotation (orthogonal on q and k alike, so q·k is unchanged in exact arithmetic) and
YaRN. The indexer gets no gradient through top-k (as in V4); train it with a KL to the main attention
(V3.2 §2.2) if needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optictx.config import PrimitivesConfig
from optictx.errors import ConfigError, GenerationError
from optictx.model.attention import RMSNorm
from optictx.model.cache import KVCache
from optictx.model.mla import apply_rope_interleaved, rope_angles

MASKED = -1e30  # finite "minus infinity": a block with no real token pools to a finite (ignored) entry
QUERY_CHUNK = 64  # queries per attention step: keys per chunk = chunk + window - 1 (+ top-k gathered)
INDEX_CHUNK = 128  # queries per indexer step: a [chunk·index heads, visible entries] score block


def rope_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rd: int, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last ``rd`` channels (V4 keeps position in the tail of each vector)."""
    return torch.cat([x[..., :-rd], apply_rope_interleaved(x[..., -rd:], cos, sin, inverse)], dim=-1)


def rope_last_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rd: int, inverse: bool = False) -> torch.Tensor:
    """``rope_last`` writing the rotated tail into ``x`` (a fresh tensor of the caller's) instead of copying
    every channel; the plain version under autograd."""
    if torch.is_grad_enabled() and x.requires_grad:
        return rope_last(x, cos, sin, rd, inverse)
    x[..., -rd:] = apply_rope_interleaved(x[..., -rd:], cos, sin, inverse)
    return x


# --------------------------------------------------------------------------- compressor
@dataclass
class CompressorState:
    """The unfinished block (raw kv/score, ``start % m`` tokens) and, when overlapping, the last full block."""

    pending_kv: torch.Tensor  # [B, r, coff·d]
    pending_score: torch.Tensor  # [B, r, coff·d], ape added, padding MASKED
    prev_kv: torch.Tensor | None = None  # [B, m, 2d] (overlap only)
    prev_score: torch.Tensor | None = None


class Compressor(nn.Module):
    """m consecutive tokens -> one entry: per-channel softmax over the block of ``wgate(x) + ape`` weighting
    ``wkv(x)``; then RMSNorm and RoPE at the block's first position.

    With overlap (m == 4) the projections are 2d wide: half A of the previous block's m tokens and half B of
    the current block's m tokens form 2m slots, so each entry summarises 8 tokens with stride 4.
    """

    def __init__(self, dim: int, ratio: int, head_dim: int, rope_dim: int, eps: float, rope_theta: float):
        super().__init__()
        self.ratio, self.head_dim, self.rope_dim, self.rope_theta = ratio, head_dim, rope_dim, rope_theta
        self.overlap = ratio == 4
        coff = 1 + self.overlap
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        start: int,
        token_valid: torch.Tensor | None = None,
        state: CompressorState | None = None,
    ) -> tuple[torch.Tensor, CompressorState]:
        """x [B, T, dim] at slots start.. -> (entries of the blocks completed here [B, n, d], new state)."""
        b, t, _ = x.shape
        m, d = self.ratio, self.head_dim
        slots = torch.arange(start, start + t, device=x.device)
        kv = self.wkv(x).float()
        score = self.wgate(x).float() + self.ape.float()[slots % m]
        if token_valid is not None:
            score = score.masked_fill(~token_valid[..., None], MASKED)
        if state is None:
            state = CompressorState(kv[:, :0], score[:, :0])
        r = state.pending_kv.shape[1]
        if r != start % m:
            raise GenerationError(
                f"compressor state holds {r} pending tokens but slot {start} needs {start % m}: "
                "advance cache.seen by exactly the tokens of each forward"
            )
        kv = torch.cat([state.pending_kv, kv], dim=1)
        score = torch.cat([state.pending_score, score], dim=1)
        n = kv.shape[1] // m
        blocks_kv, blocks_score = kv[:, : n * m].unflatten(1, (n, m)), score[:, : n * m].unflatten(1, (n, m))
        new_state = CompressorState(kv[:, n * m :], score[:, n * m :])
        if self.overlap:
            prev_kv = state.prev_kv if state.prev_kv is not None else kv.new_zeros(b, m, 2 * d)
            prev_score = state.prev_score if state.prev_score is not None else kv.new_full((b, m, 2 * d), MASKED)
            seq_kv = torch.cat([prev_kv[:, None], blocks_kv], dim=1)  # [B, n+1, m, 2d]
            seq_score = torch.cat([prev_score[:, None], blocks_score], dim=1)
            blocks_kv = torch.cat([seq_kv[:, :-1, :, :d], seq_kv[:, 1:, :, d:]], dim=2)  # [B, n, 2m, d]
            blocks_score = torch.cat([seq_score[:, :-1, :, :d], seq_score[:, 1:, :, d:]], dim=2)
            new_state.prev_kv, new_state.prev_score = seq_kv[:, -1], seq_score[:, -1]
        pooled = (blocks_kv * blocks_score.softmax(dim=2)).sum(dim=2)  # [B, n, d]
        entries = self.norm(pooled.to(x.dtype))
        # RoPE at the block's first position: the last token of every completed block is among the new ones.
        last = torch.arange(1, n + 1, device=x.device) * m - 1 - r
        cos, sin = rope_angles(position_ids.expand(b, t)[:, last] - (m - 1), self.rope_dim, self.rope_theta)
        return rope_last_(entries, cos, sin, self.rope_dim), new_state


def entry_visibility(n_entries: int, query_slots: torch.Tensor, ratio: int) -> torch.Tensor:
    """Bool [T, N]: the query at slot t may use entry j iff j < (t+1) // m (the block has finished)."""
    j = torch.arange(n_entries, device=query_slots.device)
    return j[None, :] < ((query_slots + 1) // ratio)[:, None]


def entry_validity(attention_mask: torch.Tensor, n_entries: int, ratio: int, overlap: bool) -> torch.Tensor:
    """Bool [B, N]: an entry is real iff one of the tokens it pools is real (padding-only blocks are hidden)."""
    b = attention_mask.shape[0]
    own = attention_mask[:, : n_entries * ratio].bool().view(b, n_entries, ratio).any(-1)
    if overlap:  # entry j also pools the A-half of block j-1
        own = own | torch.cat([own.new_zeros(b, 1), own[:, :-1]], dim=1)
    return own


@dataclass
class Visibility:
    """Which compressed entries the queries at slots ``start..`` may use: causal rule & padding validity."""

    start: int
    ratio: int
    valid: torch.Tensor | None  # [B, N] or None (all real)

    def horizon(self, e: int) -> int:
        """Entries any of the first ``e`` queries can see (a prefix: later entries are never visible)."""
        return (self.start + e) // self.ratio

    def mask(self, s: int, e: int, lo: int, n: int, device: torch.device) -> torch.Tensor:
        """Bool [B|1, e-s, n-lo]: may query s.. of this call use entry lo..n-1?"""
        vis = entry_visibility(n, torch.arange(self.start + s, self.start + e, device=device), self.ratio)
        vis = vis[None, :, lo:]
        return vis if self.valid is None else vis & self.valid[:, None, lo:n]

    def hide_(self, scores: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Set scores [B, c, (H,) n] of invisible entries to -inf, in place. Without padding only the causal
        tail needs it: entries below (start+s+1)//m are visible to every query of the chunk."""
        n = scores.shape[-1]
        lo = 0 if self.valid is not None else min(n, (self.start + s + 1) // self.ratio)
        if lo < n:
            bias = neg_inf_where(~self.mask(s, e, lo, n, scores.device))
            scores[..., lo:].add_(bias[:, :, None, :] if scores.dim() == 4 else bias)
        return scores


# --------------------------------------------------------------------------- lightning indexer
class LightningIndexer(nn.Module):
    """score[t, j] = Σ_h w[t,h] · ReLU(q[t,h] · k[j]) over compressed index keys; top-k visible entries.

    Queries come from the main attention's query latent (``q_lora_rank``, or x when it is 0); keys come from
    the indexer's own overlapping compressor of ``index_head_dim`` channels.
    """

    def __init__(self, cfg: PrimitivesConfig, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim, self.rope_theta = cfg.qk_rope_head_dim, cfg.compress_rope_theta
        q_in = cfg.q_lora_rank or cfg.hidden_size
        self.wq_b = nn.Linear(q_in, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, ratio, self.head_dim, self.rope_dim, cfg.rms_norm_eps,
                                     self.rope_theta)
        self.scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def select(
        self, x: torch.Tensor, qr: torch.Tensor, position_ids: torch.Tensor, keys: torch.Tensor, vis: Visibility
    ) -> torch.Tensor:
        """Top-k entry indices [B, T, min(k, N)] per query; -1 where fewer than k entries are visible.

        A chunk of queries that sees at most k entries selects all of them (ascending), unscored: exactly
        the top-k set, at no cost. Short contexts and their decode steps never run the indexer's GEMM.
        """
        b, t, _ = x.shape
        k = min(self.topk, keys.shape[1])
        out = torch.full((b, t, k), -1, dtype=torch.long, device=x.device)
        if vis.horizon(t) <= k:
            return self._all_visible(out, vis, 0, t)
        cos, sin = rope_angles(position_ids.expand(b, t), self.rope_dim, self.rope_theta)
        q = rope_last_(self.wq_b(qr).view(b, t, self.n_heads, self.head_dim), cos, sin, self.rope_dim)
        w = self.weights_proj(x).float() * self.scale  # [B, T, H_I]
        for s in range(0, t, INDEX_CHUNK):
            e = min(t, s + INDEX_CHUNK)
            n = vis.horizon(e)  # score only the prefix some query of the chunk can see
            if n <= k:
                self._all_visible(out, vis, s, e)
                continue
            qc = q[:, s:e].reshape(b, -1, self.head_dim)  # [B, c·H_I, d]: one GEMM against the keys
            logits = (qc @ keys[:, :n].transpose(1, 2)).float().relu_().view(b, e - s, self.n_heads, n)
            score = vis.hide_((w[:, s:e, None, :] @ logits).squeeze(2), s, e)  # Σ_h w·ReLU(q·k): [B, c, n]
            top = score.topk(k, dim=-1, sorted=False)
            out[:, s:e] = torch.where(top.values > float("-inf"), top.indices, -1)
        return out

    @staticmethod
    def _all_visible(out: torch.Tensor, vis: Visibility, s: int, e: int) -> torch.Tensor:
        """Queries s..e-1 see at most ``out.shape[-1]`` entries: select every visible one (-1 elsewhere)."""
        n = min(vis.horizon(e), out.shape[-1])
        if n:
            index = torch.arange(n, device=out.device)
            out[:, s:e, :n] = torch.where(vis.mask(s, e, 0, n, out.device), index, -1)
        return out


# --------------------------------------------------------------------------- sparse attention core
def sparse_attention(
    q: torch.Tensor,
    raw: torch.Tensor,
    raw_valid: torch.Tensor | None,
    window: int,
    sink: torch.Tensor,
    scale: float,
    entries: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    vis: Visibility | None = None,
) -> torch.Tensor:
    """One softmax per query over its window tokens, its compressed entries and the sink (dropped).

    q [B, T, H, D]; raw [B, P+T, D] raw kv with query i at raw index P+i (K = V, shared by all heads);
    raw_valid [B, P+T] (padding) or None. Entries [B, N, D]: CSA gathers ``selected`` [B, T, K] (-1 = skip);
    HCA (``selected`` None) attends every entry ``vis`` allows. Queries run in chunks; the window of a chunk
    is one contiguous slice of ``raw`` (a banded GEMM), so nothing T×T is ever built.
    """
    b, t, h, d = q.shape
    n_past = raw.shape[1] - t
    flat = entries.reshape(-1, d) if entries is not None else None
    row_offset = torch.arange(b, device=q.device)[:, None, None] * (entries.shape[1] if entries is not None else 0)
    out = []
    for s in range(0, t, QUERY_CHUNK):
        e = min(t, s + QUERY_CHUNK)
        qc = q[:, s:e] * scale  # scores come out scaled; the sink logit stays unscaled (as V4)
        lo, hi = max(0, n_past + s - window + 1), n_past + e
        keys = raw[:, lo:hi]  # the chunk's window: one contiguous slice
        i = torch.arange(n_past + s, hi, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        allowed = ((j <= i) & (j > i - window))[None]  # [1, c, L]
        if raw_valid is not None:
            allowed = allowed & raw_valid[:, None, lo:hi]
        scores = _scores_shared(qc, keys).add_(neg_inf_where(~allowed)[:, :, None])
        parts = [(scores, keys)]
        if entries is not None and selected is not None:  # CSA: gather the top-k entries of each query
            sel = selected[:, s:e]
            picked = flat.index_select(0, (sel.clamp(min=0) + row_offset).flatten()).view(*sel.shape, d)
            sc = torch.matmul(qc, picked.transpose(-1, -2)).float()  # [B, c, H, K]
            parts.append((sc.add_(neg_inf_where(sel < 0)[:, :, None]), picked))
        elif entries is not None and vis is not None:  # HCA: every visible entry (a short prefix)
            picked = entries[:, : vis.horizon(e)]
            parts.append((vis.hide_(_scores_shared(qc, picked), s, e), picked))
        out.append(_softmax_attend(parts, sink, raw.dtype))
    return torch.cat(out, dim=1)


def neg_inf_where(hidden: torch.Tensor) -> torch.Tensor:
    """fp32 0 where visible, -inf where ``hidden``. Adding it masks scores exactly (x + 0 == x); on the CPU a
    broadcast add is several times cheaper than a broadcast ``masked_fill_``."""
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


def _scores_shared(qc: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """fp32 scores [B, c, H, L] of queries [B, c, H, D] against keys [B, L, D] shared by every query and
    head: one GEMM over (c·H) rows."""
    b, c, h, d = qc.shape
    return torch.matmul(qc.reshape(b, c * h, d), keys.transpose(1, 2)).float().view(b, c, h, -1)


def _softmax_attend(parts, sink: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ_parts softmax(scores ∪ {sink}) @ values, without concatenating the parts: one shared max, one
    summed denominator; the sink only enlarges the denominator. In-place exp when no gradient is needed.
    Values are [B, L, D] shared by the chunk's queries (window, HCA) or [B, c, K, D] per query (CSA)."""
    parts = [(sc, v) for sc, v in parts if sc.shape[-1]]
    m = sink.float().view(1, 1, -1).expand(parts[0][0].shape[:-1])
    for sc, _ in parts:
        m = torch.maximum(m, sc.amax(-1))
    denom = (sink.float().view(1, 1, -1) - m).exp()
    o = 0.0
    for sc, v in parts:
        if torch.is_grad_enabled() and sc.requires_grad:
            p = torch.exp(sc - m[..., None])  # amax above saved sc for backward
        else:
            p = sc.sub_(m[..., None]).exp_()
        denom = denom + p.sum(-1)
        p = p.to(dtype)
        if v.dim() == 3:  # shared values: one GEMM over (c·H) rows
            b, c, h, n = p.shape
            o = o + torch.matmul(p.reshape(b, c * h, n), v).view(b, c, h, -1)
        else:
            o = o + torch.matmul(p, v)
    return o / denom[..., None].to(dtype)


# --------------------------------------------------------------------------- the layer
@dataclass
class CSAState:
    """Cache of one CSA/HCA/window layer: raw window, compressed entries, the compressors' unfinished blocks."""

    window: torch.Tensor  # [B, <=W, D] last raw kv vectors
    entries: torch.Tensor | None = None  # [B, N, D]
    compressor: CompressorState | None = None
    index_keys: torch.Tensor | None = None  # [B, N, index_head_dim]
    index_compressor: CompressorState | None = None


class CompressedSparseAttention(nn.Module):
    """V4 attention layer; ``compress_ratio`` 0 = window only, 4 = CSA (overlap + indexer), other = HCA."""

    def __init__(self, cfg: PrimitivesConfig, compress_ratio: int):
        super().__init__()
        dim, h = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.ratio, self.window = h, compress_ratio, cfg.sliding_window
        self.head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.rope_dim, self.eps, self.q_lora_rank = cfg.qk_rope_head_dim, cfg.rms_norm_eps, cfg.q_lora_rank
        self.rope_theta = cfg.compress_rope_theta if compress_ratio else cfg.rope_theta
        if compress_ratio < 0 or self.window < 1:
            raise ConfigError("compress_ratios must be >= 0 and sliding_window >= 1")
        if self.q_lora_rank:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, self.eps)
            self.wq_b = nn.Linear(self.q_lora_rank, h * self.head_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, h * self.head_dim, bias=False)
        self.wkv = nn.Linear(dim, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        self.attn_sink = nn.Parameter(torch.zeros(h))
        self.o_groups, self.o_lora_rank = cfg.o_groups, cfg.o_lora_rank
        if self.o_lora_rank:
            if (h * self.head_dim) % self.o_groups:
                raise ConfigError(f"o_groups {self.o_groups} must divide heads × head_dim {h * self.head_dim}")
            self.wo_a = nn.Linear(h * self.head_dim // self.o_groups, self.o_groups * self.o_lora_rank, bias=False)
            self.wo_b = nn.Linear(self.o_groups * self.o_lora_rank, dim, bias=False)
        else:
            self.wo = nn.Linear(h * self.head_dim, dim, bias=False)
        self.softmax_scale = self.head_dim**-0.5
        self.compressor = (
            Compressor(dim, compress_ratio, self.head_dim, self.rope_dim, self.eps, self.rope_theta)
            if compress_ratio else None
        )
        self.indexer = LightningIndexer(cfg, compress_ratio) if compress_ratio == 4 else None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        start = cache.seen if cache is not None else 0
        state: CSAState | None = cache.layers[layer_idx] if cache is not None else None
        position_ids = position_ids.expand(b, t)
        cos, sin = rope_angles(position_ids, self.rope_dim, self.rope_theta)
        qr = self.q_norm(self.wq_a(x)) if self.q_lora_rank else x
        q = (self.wq_b(qr) if self.q_lora_rank else self.wq(qr)).view(b, t, self.n_heads, self.head_dim)
        inv_rms = torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + self.eps).to(q.dtype)  # weightless norm
        q = q * inv_rms if torch.is_grad_enabled() else q.mul_(inv_rms)  # q is ours: no 2nd full-size copy
        q = rope_last_(q, cos, sin, self.rope_dim)
        kv = rope_last_(self.kv_norm(self.wkv(x)), cos, sin, self.rope_dim)

        raw = kv if state is None else torch.cat([state.window, kv], dim=1)
        raw_valid = None
        if attention_mask is not None:  # padding tokens are hidden inside the window
            raw_valid = attention_mask[:, start + t - raw.shape[1] :].bool()
        new_state = CSAState(window=raw[:, -self.window :])
        entries = selected = vis = None
        if self.ratio:
            entries, selected, vis = self._compressed(x, qr, position_ids, start, attention_mask, state, new_state)
        o = sparse_attention(q, raw, raw_valid, self.window, self.attn_sink, self.softmax_scale,
                             entries, selected, vis)
        o = rope_last_(o, cos, sin, self.rope_dim, inverse=True)  # values carried rotated rope channels
        if cache is not None:
            cache.layers[layer_idx] = new_state
        return self._out(o)

    def _compressed(self, x, qr, position_ids, start, attention_mask, state, new_state):
        """Extend the compressed entries (and index keys); return (entries, CSA top-k or None, visibility)."""
        token_valid = attention_mask[:, start:].bool() if attention_mask is not None else None
        entries, new_state.compressor = self.compressor(
            x, position_ids, start, token_valid, state.compressor if state else None
        )
        if state is not None and state.entries is not None:
            entries = torch.cat([state.entries, entries], dim=1)
        new_state.entries = entries
        n = entries.shape[1]
        valid = entry_validity(attention_mask, n, self.ratio, self.compressor.overlap) if attention_mask is not None else None
        vis = Visibility(start, self.ratio, valid)
        if self.indexer is None:  # HCA: every visible entry
            return entries, None, vis
        with torch.no_grad():  # top-k passes no gradient (V4 trains the indexer with its own KL loss)
            keys, new_state.index_compressor = self.indexer.compressor(
                x, position_ids, start, token_valid, state.index_compressor if state else None
            )
            if state is not None and state.index_keys is not None:
                keys = torch.cat([state.index_keys, keys], dim=1)
            new_state.index_keys = keys
            selected = self.indexer.select(x, qr, position_ids, keys, vis)
        return entries, selected, vis

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, t = o.shape[:2]
        if not self.o_lora_rank:
            return self.wo(o.reshape(b, t, -1))
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        o = torch.einsum("btgd,grd->btgr", o.reshape(b, t, self.o_groups, -1), wo_a)
        return self.wo_b(o.flatten(2))


def csa_cache_numbers_per_token(cfg: PrimitivesConfig, ratio: int) -> float:
    """Cached numbers per token (long-context limit, window excluded): d/m main + d_I/m index keys for CSA."""
    if not ratio:
        return 0.0
    d = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return d / ratio + (cfg.index_head_dim / ratio if ratio == 4 else 0.0)
