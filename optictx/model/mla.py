"""DeepSeek-V3 Multi-head Latent Attention (MLA) with the naive and the absorbed ("MQA mode") paths.

Every token is projected once to a small latent ``c`` (``kv_lora_rank``) plus one rope key ``k_pe`` shared by
all heads (``qk_rope_head_dim``); only these two are cached, so the cache costs ``kv_lora_rank +
qk_rope_head_dim`` numbers per token per layer (576 for V3) instead of ``H·(qk_head_dim + v_head_dim)``.

* naive path (training, prefill): up-project the latent with ``wkv_b`` into per-head ``k_nope``/``v`` and run
  ordinary attention (SDPA).
* absorbed path (decode): fold ``W_UK`` into the query and ``W_UV`` into the output, so scores and values are
  read straight out of the cached latent, as V3's ``attn_impl="absorb"``.

RoPE here is the *interleaved complex-pair* form of V3 (adjacent channels rotate together), not the
rotate-half form of ``attention.py``; a checkpoint ported between the two needs permuted weights.
YaRN and its ``mscale²`` softmax factor are left out: they only apply past ``original_seq_len``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import PrimitivesConfig
from optictx.model.attention import RMSNorm, attention_bias_mask
from optictx.model.cache import KVCache


# --------------------------------------------------------------------------- interleaved RoPE (V3 / V4)
def rope_angles(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` [..., dim/2] for any integer position tensor (batch rows may differ)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope_interleaved(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [B, T, (H,) d]`` by the angles in ``cos/sin [B, T, d/2]``.

    ``inverse`` rotates back (V4 un-rotates its attention output because its values carry rope dims).
    """
    if x.dim() == cos.dim() + 1:  # a heads axis sits between T and d
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- MLA
@dataclass
class MLAState:
    """What one MLA layer caches: the normalised latent and the rotated shared rope key of every token."""

    latent: torch.Tensor  # [B, S, kv_lora_rank]
    k_pe: torch.Tensor  # [B, S, qk_rope_head_dim]


class MLA(nn.Module):
    """V3 MLA. ``attn_impl``: "naive", "absorb", or "auto" (naive for training/prefill, absorb for decode)."""

    def __init__(self, cfg: PrimitivesConfig, attn_impl: str = "auto"):
        super().__init__()
        dim, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = self.nope + self.rope
        self.rope_theta = cfg.rope_theta
        self.attn_impl = attn_impl
        h = self.n_heads
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(dim, h * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, dim, bias=False)
        self.softmax_scale = self.qk_head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope_angles(position_ids.expand(b, t), self.rope, self.rope_theta)
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(b, t, self.n_heads, self.qk_head_dim).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope_interleaved(q_pe, cos, sin)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = apply_rope_interleaved(k_pe, cos, sin)
        if cache is not None:
            past = cache.layers[layer_idx]
            if past is not None:
                latent = torch.cat([past.latent, latent], dim=1)
                k_pe = torch.cat([past.k_pe, k_pe], dim=1)
            cache.layers[layer_idx] = MLAState(latent, k_pe)
        mask = attention_bias_mask(t, latent.shape[1], attention_mask, x.device)
        impl = self.attn_impl if self.attn_impl != "auto" else ("absorb" if t == 1 and latent.shape[1] > 1 else "naive")
        if impl == "absorb":
            out = self._absorbed(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask)
        return self.wo(out.reshape(b, t, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """"MHA mode": up-project the latent to per-head keys/values, then SDPA. Returns [B, T, H, v]."""
        b, s, _ = latent.shape
        kv = self.wkv_b(latent).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=self.softmax_scale,
        )
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """"MQA mode": the latent is one shared key/value for all heads; W_UK/W_UV are folded into q and out."""
        b, t, h, _ = q_nope.shape
        s = latent.shape[1]
        wkv_b = self.wkv_b.weight.view(h, self.nope + self.v_dim, self.kv_lora_rank)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, wkv_b[:, : self.nope])
        scores = torch.einsum("bthc,bsc->bhts", q_lat, latent) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = scores.float() * self.softmax_scale
        if mask is None:  # plain causal over the cached prefix
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(latent.dtype)
        out_lat = torch.einsum("bhts,bsc->bthc", probs, latent)
        return torch.einsum("bthc,hdc->bthd", out_lat, wkv_b[:, self.nope :])


def mla_cache_numbers_per_token(cfg: PrimitivesConfig) -> int:
    """Cached numbers per token per layer: latent + shared rope key (V3: 512 + 64 = 576)."""
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim
