"""The DeepSeek-V2-style language model of DeepSeek-OCR: embed -> N × (attention, dense MLP or MoE) -> norm -> head.

Key names are the official ones (``model.layers.L.self_attn.q_proj.weight`` ...). ``DeepseekV2Model``
builds its modules in ``_build_decoder`` rather than ``__init__`` so ``DeepseekOCRModel`` can mix it with
``DeepEncoder`` into one flat ``model.*`` namespace, exactly like the official checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import DeepseekV2Config
from optictx.errors import ConfigError, GenerationError
from optictx.model.attention import MHAttention, RMSNorm, Rope, rope_at, rope_span
from optictx.model.cache import KVCache
from optictx.model.moe import MLP, MoE


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x))``; ``x += ffn(norm(x))``, the FFN dense below first_k_dense_replace."""

    def __init__(self, cfg: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MHAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), position_ids, cache, self.layer_idx, attention_mask, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


def default_position_ids(t: int, past: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Positions of the ``t`` new tokens: ``past..past+t-1``, or, for left-padded rows, counted over real tokens.

    With padding, row b's first real token gets position 0 (its pads get 0 too; they are never attended),
    so a left-padded row sees the same RoPE angles as the same prompt run alone.
    """
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos[:, -t:].clamp(min=0).to(device)


class DeepseekV2Model(nn.Module):
    """Embeddings, decoder layers and the final norm; returns normed hidden states [B, T, D]."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self._build_decoder(cfg)

    def _build_decoder(self, cfg: DeepseekV2Config) -> None:
        """Create ``embed_tokens``, ``layers`` and ``norm`` (does not call nn.Module.__init__)."""
        cfg.validate()
        if cfg.use_mla:
            raise ConfigError("use_mla=true is not supported by the DeepSeek-OCR decoder (it uses plain MHA)")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` [B, past + T] (True = real token) covers cached and new positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise GenerationError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise GenerationError(
                f"attention_mask must be [batch, cached + new] = [{b}, {past + t}], got {list(attention_mask.shape)}"
            )
        attn = self.layers[0].self_attn  # every layer shares head_dim and theta: RoPE angles once per forward
        if position_ids is None and attention_mask is None:  # positions past..past+t-1: a table slice
            rope = rope_span(past, t, attn.head_dim, attn.rope_theta, h.device, h.dtype)
            position_ids = default_position_ids(t, past, None, h.device)
        else:
            if position_ids is None:
                position_ids = default_position_ids(t, past, attention_mask, h.device)
            rope = rope_at(position_ids, attn.head_dim, attn.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, position_ids, cache, attention_mask, rope)
        if cache is not None:
            cache.seen += t
        return self.norm(h)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # fp32 [B, T or logits_to_keep, vocab]
    loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t predict labels at t+1; ``ignore_index`` labels are skipped.

    A batch with no supervised token gives 0 (not NaN), so a fully masked micro-batch cannot poison training.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return total / (shift_labels != ignore_index).sum().clamp(min=1)


def lm_head_logits(lm_head: nn.Linear, hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Head over the last ``logits_to_keep`` positions (0 = all); fp32 logits as the official model."""
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return lm_head(hidden).float()


class DeepseekV2ForCausalLM(nn.Module):
    """Decoder + untied ``lm_head`` (Linear hidden -> vocab, no bias)."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        hidden = self.model(input_ids, inputs_embeds, position_ids, cache, attention_mask)
        logits = lm_head_logits(self.lm_head, hidden, 0 if labels is not None else logits_to_keep)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)
