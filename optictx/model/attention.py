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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# --------------------------------------------------------------------------- RoPE
_ROPE_TABLES: dict[tuple[int, float, str], tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(dim: int, theta: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of shape [>=length, dim] in the Llama layout (frequencies repeated twice).

    Kept in a module-level cache rather than a buffer: every layer shares one table, it is never part of a
    state dict, and a model built on the ``meta`` device gets a real table on first use instead of a
    meta buffer that loading would never fill. The table grows by doubling when positions run past it.
    """
    key = (dim, float(theta), str(device))
    cached = _ROPE_TABLES.get(key)
    if cached is not None and cached[0].shape[0] >= length:
        return cached
    size = max(1024, 1 << max(0, length - 1).bit_length())
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    _ROPE_TABLES[key] = (emb.cos(), emb.sin())
    return _ROPE_TABLES[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by the angles of ``position_ids [B, T]`` (NeoX/Llama rotate-half)."""
    cos, sin = rope_table(x.shape[-1], theta, int(position_ids.max()) + 1, x.device)
    cos = cos[position_ids].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
    sin = sin[position_ids].unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


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

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, position_ids, self.rope_theta)
        k = apply_rope(k, position_ids, self.rope_theta)
        if cache is not None:
            past = cache.layers[layer_idx]
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
            cache.layers[layer_idx] = (k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = attention_bias_mask(t, k.shape[2], attention_mask, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
