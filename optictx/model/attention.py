"""RMSNorm, rotate-half RoPE and plain multi-head attention (the DeepSeek-OCR decoder's ``use_mla: false`` path).

DeepSeek-OCR's decoder does not use MLA: with ``use_mla=false`` the official code falls back to transformers'
``LlamaAttention`` (reference §5.2), i.e. q/k/v/o projections without bias, NeoX/Llama ``rotate_half`` RoPE
over all head dims, causal SDPA. MLA lives in ``mla.py`` and compressed sparse attention in ``csa.py``; they
follow the same call protocol so one ``generate`` drives all three:

    attn(x [B,T,D], position_ids [B,T], cache: KVCache | None, layer_idx, attention_mask [B, T_kv] | None)

The attention module reads/replaces ``cache.layers[layer_idx]``; the model advances ``cache.seen`` once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import DeepseekV2Config
from optictx.model.cache import KVCache


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps)`` computed in fp32, cast back to the input dtype, then × weight.

    The cast happens *before* the weight multiply, as in the official DeepseekV2RMSNorm, so bf16 runs
    round at the same place as the reference.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            # no casts in fp32, so the fused op is the same arithmetic (bit-identical) in one dispatch
            return F.rms_norm(x, weight.shape, weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)


# --------------------------------------------------------------------------- RoPE
# (dim, theta, device) -> (cos, signed sin) fp32 [size, dim]
_ROPE_TABLES: dict[tuple[int, float, str], tuple[torch.Tensor, torch.Tensor]] = {}

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, signed sin) [B, 1, T, D] or [T, D], the activation dtype


def rope_table(dim: int, theta: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of shape [>=length, dim] in the Llama layout (frequencies repeated twice), with the
    first half of ``sin`` negated, so ``rotate_half(x) * sin == x.roll(dim/2) * signed_sin`` in one op.

    Kept in a module-level cache rather than a buffer: every layer shares one table, it is never part of a
    state dict, and a model built on the ``meta`` device gets a real table on first use instead of a
    meta buffer that loading would never fill. The table grows by doubling when positions run past it.
    """
    key = (dim, float(theta), str(device))
    cached = _ROPE_TABLES.get(key)
    if cached is not None and cached[0].shape[0] >= length:
        return cached
    size = max(1024, 1 << max(0, length - 1).bit_length())
    # a normal tensor even when first built under inference_mode: training later slices it and saves the
    # slice for backward, which an inference tensor refuses
    with torch.inference_mode(False), torch.no_grad():
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        freqs = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        sin[:, : dim // 2].neg_()  # negation is exact: (-x2)·s == x2·(-s) bit for bit
        _ROPE_TABLES[key] = (emb.cos(), sin)
    return _ROPE_TABLES[key]


def rope_at(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """``(cos, signed sin)`` [B, 1, T, D] for arbitrary ``position_ids [B, T]`` (e.g. left-padded rows)."""
    cos, sin = rope_table(dim, theta, int(position_ids.max()) + 1, position_ids.device)
    return cos[position_ids].unsqueeze(1).to(dtype), sin[position_ids].unsqueeze(1).to(dtype)


def rope_span(start: int, t: int, dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> Rope:
    """``(cos, signed sin)`` [T, D] (broadcasts over batch and heads) for positions ``start..start+t-1``: a
    table slice, no index op and no device sync (the decode step knows its position as a Python int)."""
    cos, sin = rope_table(dim, theta, start + t, device)
    return cos.narrow(0, start, t).to(dtype), sin.narrow(0, start, t).to(dtype)


def rope_rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Llama's ``x * cos + rotate_half(x) * sin`` (rotate_half(x) = [-x2, x1]) with the signed-sin table:
    the same products and sums, two ops fewer."""
    cos, sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by the angles of ``position_ids [B, T]`` (NeoX/Llama rotate-half)."""
    return rope_rotate(x, rope_at(position_ids, x.shape[-1], theta, x.dtype))


# --------------------------------------------------------------------------- masks
def attention_bias_mask(
    t_q: int, t_kv: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask [B|1, 1, t_q, t_kv] (True = may attend), or None when plain causal is enough.

    Queries are the last ``t_q`` of ``t_kv`` positions (earlier ones are cached), so query i sits at
    absolute position ``t_kv - t_q + i``. Padding keys (``attention_mask`` False) are hidden; every query
    may always see itself, so a padding query never has an all-False row (which would give NaN).
    """
    past = t_kv - t_q
    if attention_mask is None and (past == 0 or t_q == 1):
        return None  # SDPA's is_causal fast path; a single newest query sees every key anyway
    q_pos = torch.arange(past, t_kv, device=device)[:, None]
    k_pos = torch.arange(t_kv, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# --------------------------------------------------------------------------- KV growth
KV_CHUNK = 256  # spare positions reserved per growth: one copy of the cache every KV_CHUNK decode steps


def append_kv(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, new], dim=2)`` for [B, H, S, D] caches, without copying ``past`` on every step.

    Without autograd the result is a view ``buf[:, :, :S+t]`` of a buffer with spare room, so the next
    append writes only its own positions (a decode step no longer reads and rewrites the whole cache). The
    buffer records how far it is filled and only the view that ends there may write into it: a cache
    forked at an earlier length (a copied ``cache.layers`` entry) gets a buffer of its own instead of
    overwriting its sibling's positions. With autograd it is the plain ``cat`` (in-place writes would
    invalidate tensors saved for backward).
    """
    if torch.is_grad_enabled() and (new.requires_grad or (past is not None and past.requires_grad)):
        return new if past is None else torch.cat([past, new], dim=2)
    s, t = (0 if past is None else past.shape[2]), new.shape[2]
    buf = getattr(past, "_kv_buffer", None)
    if buf is None or buf._kv_fill != s or buf.shape[2] < s + t:
        grown = new.new_empty(*new.shape[:2], s + t + KV_CHUNK, new.shape[3])
        if s:
            grown.narrow(2, 0, s).copy_(past)
        buf = grown
    buf.narrow(2, s, t).copy_(new)
    buf._kv_fill = s + t
    out = buf.narrow(2, 0, s + t)
    out._kv_buffer = buf
    return out


class FusedWeights:
    """One GEMM for several linears that read the same input: a cached row-concatenation of their weights.

    Every output element is the same dot product as in the separate GEMMs; with MKL the result is
    bit-identical (tests/test_fast_paths.py checks it), except that a projection of <= 8 outputs may get
    another kernel and differ in the last bit. Only for gradient-free calls: the copy is rebuilt whenever a
    weight is replaced or changed in place (its data pointer or version counter moves), and it pins the
    weights it was built from, so a freed pointer cannot come back looking unchanged.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._pinned: tuple[torch.Tensor, ...] = ()
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
        params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        if any(p.is_inference() for p in params):  # no version counter to watch: concatenate every call
            return F.linear(x, *_concat(layers))
        key = tuple((p.data_ptr(), p._version) for p in params)
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference
                self._weight, self._bias = _concat(layers)
            self._key, self._pinned = key, tuple(p.detach() for p in params)
        return F.linear(x, self._weight, self._bias)


def _concat(layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([layer.weight for layer in layers])
    return weight, (torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None)


class MHAttention(nn.Module):
    """Multi-head attention with optional grouped KV heads; cache entry is ``(k, v)`` [B, H_kv, S, D]."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        bias = cfg.attention_bias
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self._fused = FusedWeights()  # inference-time q|k|v weight copy (not a parameter, not in state_dict)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """``rope``: the model's ``rope_span``/``rope_at`` for ``position_ids``, computed once for all layers."""
        b, t, _ = x.shape
        if rope is None:
            rope = rope_at(position_ids, self.head_dim, self.rope_theta, x.dtype)
        q, k, v = self._project(x, rope)
        if cache is not None:
            past_k, past_v = cache.layers[layer_idx] or (None, None)
            k, v = append_kv(past_k, k), append_kv(past_v, v)
            cache.layers[layer_idx] = (k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = attention_bias_mask(t, k.shape[2], attention_mask, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return _linear(self.o_proj, out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, H, T, D], rotated k and v [B, H_kv, T, D]. With autograd: three GEMMs, exactly the
        gradients of separate layers. Without: one GEMM over the fused weights, q and k rotated together."""
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if torch.is_grad_enabled():
            q, k, v = (_linear(layer, x).view(b, t, -1, d).transpose(1, 2)
                       for layer in (self.q_proj, self.k_proj, self.v_proj))
            return rope_rotate(q, rope), rope_rotate(k, rope), v
        qkv = self._fused(x, (self.q_proj, self.k_proj, self.v_proj)).view(b, t, h + 2 * hkv, d).transpose(1, 2)
        qk, v = qkv.split_with_sizes([h + hkv, hkv], dim=1)
        q, k = rope_rotate(qk, rope).split_with_sizes([h, hkv], dim=1)
        return q, k, v


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without the module dispatch (a decode step makes ~50 of these calls)."""
    return F.linear(x, layer.weight, layer.bias)
