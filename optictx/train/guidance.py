"""Guided attention: tell one head of a decoder layer where to look, from labels the data already has.

Used by the OCR model (the slot holding the next character) and the visual-primitives model (the image token
under the box or point being written). The log-attention is recomputed from the layer's input inside a
forward pre-hook, where a sharded layer's weights are whole.
"""
from __future__ import annotations

import torch
from torch import nn

from optictx.errors import ConfigError
from optictx.model.attention import MHAttention, apply_rope
from optictx.model.csa import CompressedSparseAttention, rope_angles, rope_last


def head_attention_logprobs(attn: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, heads: int = 1
                            ) -> torch.Tensor:
    """Causal log-attention [B, heads, T, T] of the first `heads` heads of an MHAttention module, recomputed
    from its input."""
    b, t, _ = x.shape
    d = attn.head_dim
    q = apply_rope(attn.q_proj(x)[..., :heads * d].view(b, t, heads, d).transpose(1, 2), position_ids,
                   attn.rope_theta)
    k = apply_rope(attn.k_proj(x)[..., :heads * d].view(b, t, heads, d).transpose(1, 2), position_ids,
                   attn.rope_theta)
    scores = (q @ k.transpose(-1, -2)).float() / d**0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).log_softmax(-1)


def guided_attention_loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log attention mass on the target key at every guided query (``targets`` [B, T]: the key's position,
    -1 = free), averaged over those queries and the heads of ``logp`` [B, H, T, T].

    A query whose target the layer cannot see (a key that slid out of a V4 layer's raw window: the image is
    then read through the compressed entries) is left free; its -inf would make the loss infinite."""
    index = targets.clamp(min=0)[:, None, :, None].expand(-1, logp.shape[1], -1, 1)
    picked = logp.gather(-1, index).squeeze(-1).transpose(1, 2)  # [B, T, H]
    mask = (targets >= 0) & torch.isfinite(picked).all(-1)
    if not mask.any():  # a zero that stays in the graph (DDP wants every parameter used)
        return picked.nan_to_num(neginf=0.0).sum() * 0
    return -picked[mask].mean()


def window_head_logprobs(attn: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, heads: int = 1
                         ) -> torch.Tensor:
    """Causal log-attention [B, heads, T, T] of the first ``heads`` heads of a V4 attention layer over its raw
    (uncompressed) keys, recomputed from the layer's input.

    It leaves out the compressed entries and the sink that share the layer's softmax, so it is the
    attention *among raw tokens*: while a sequence is shorter than the window every image token is a raw key,
    which is what guidance needs (past it, ``guided_attention_loss`` leaves the query free). An MHA layer is
    read with ``head_attention_logprobs`` (all of its keys are raw).
    """
    if not isinstance(attn, CompressedSparseAttention):
        if isinstance(attn, MHAttention):
            return head_attention_logprobs(attn, x, position_ids, heads)
        raise ConfigError(f"guided attention reads CSA or MHA layers, not {type(attn).__name__}")
    b, t, _ = x.shape
    position_ids = position_ids.expand(b, t)
    cos, sin = rope_angles(position_ids, attn.rope_dim, attn.rope_theta)
    qr = attn.q_norm(attn.wq_a(x)) if attn.q_lora_rank else x
    q = (attn.wq_b(qr) if attn.q_lora_rank else attn.wq(qr)).view(b, t, attn.n_heads, attn.head_dim)[:, :, :heads]
    q = q * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + attn.eps).to(q.dtype)
    q = rope_last(q, cos, sin, attn.rope_dim)
    kv = rope_last(attn.kv_norm(attn.wkv(x)), cos, sin, attn.rope_dim)  # [B, T, D], shared by the heads
    scores = torch.einsum("bqhd,bkd->bhqk", q, kv).float() * attn.softmax_scale
    i = torch.arange(t, device=x.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - attn.window)
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
