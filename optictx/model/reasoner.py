"""The visual-primitives model: ViT + 3×3 merge -> image tokens spliced at ``<image>`` placeholders ->
decoder layers (MLA, V4 CSA/HCA/window, or MHA) with V3 MoE -> RMSNorm -> lm_head.

Attention per layer follows ``cfg.attention``: "mla" (V3, every layer), "csa" (V4: layer i uses
``compress_ratios[i]``; 0 window only, 4 CSA, other HCA; entries past ``num_hidden_layers`` are V4's MTP
slot and ignored) or "mha" (plain attention, the baseline). Layers below ``first_k_dense_replace`` use a
dense SwiGLU MLP, the others the V3 MoE of ``moe.py``. Every attention module follows the one cache
protocol, so ``generate`` drives this model like the DeepSeek-OCR one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from optictx.config import DeepseekV2Config, PrimitivesConfig
from optictx.errors import ConfigError, GenerationError
from optictx.model.attention import MHAttention, RMSNorm
from optictx.model.cache import KVCache
from optictx.model.csa import CompressedSparseAttention
from optictx.model.decoder import CausalLMOutput, causal_lm_loss, default_position_ids, lm_head_logits
from optictx.model.mla import MLA
from optictx.model.moe import MLP, MoE
from optictx.model.vit import PrimitivesVisionEncoder
from optictx.model.vlm import splice_images


def decoder_config(cfg: PrimitivesConfig) -> DeepseekV2Config:
    """The DeepseekV2Config view of the language side, for the shared MoE/MLP/MHA modules."""
    return DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.scoring_func,
        routed_scaling_factor=cfg.routed_scaling_factor, topk_method=cfg.topk_method, n_group=cfg.n_group,
        topk_group=cfg.topk_group, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, torch_dtype="float32",
    )


def validate(cfg: PrimitivesConfig) -> None:
    """Raise ConfigError for a config that cannot build (before any tensor is allocated)."""
    if cfg.attention not in ("mla", "csa", "mha"):
        raise ConfigError(f"attention {cfg.attention!r} is not supported; use 'mla', 'csa' or 'mha'")
    if cfg.attention == "csa" and len(cfg.compress_ratios) < cfg.num_hidden_layers:
        raise ConfigError(
            f"compress_ratios has {len(cfg.compress_ratios)} entries for {cfg.num_hidden_layers} layers"
        )
    if cfg.attention == "mla" and not cfg.kv_lora_rank:
        raise ConfigError("attention='mla' needs kv_lora_rank > 0")
    if cfg.qk_rope_head_dim % 2 or cfg.qk_rope_head_dim <= 0:
        raise ConfigError(f"qk_rope_head_dim must be a positive even number, got {cfg.qk_rope_head_dim}")
    if not 0 <= cfg.image_token_id < cfg.vocab_size:
        raise ConfigError(f"image_token_id {cfg.image_token_id} is outside the vocabulary ({cfg.vocab_size})")
    decoder_config(cfg).validate()


class PrimitivesBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm(x))``; ``x += ffn(norm(x))``."""

    def __init__(self, cfg: PrimitivesConfig, layer_idx: int):
        super().__init__()
        dcfg = decoder_config(cfg)
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.attention == "mla":
            self.self_attn: nn.Module = MLA(cfg)
        elif cfg.attention == "csa":
            self.self_attn = CompressedSparseAttention(cfg, cfg.compress_ratios[layer_idx])
        else:
            self.self_attn = MHAttention(dcfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(dcfg) if dcfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, position_ids, cache=None, attention_mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), position_ids, cache, self.layer_idx, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class PrimitivesModel(nn.Module):
    """forward(input_ids, pixel_values, cache, attention_mask, labels) -> CausalLMOutput(logits, loss)."""

    def __init__(self, cfg: PrimitivesConfig):
        super().__init__()
        validate(cfg)
        self.config = cfg
        self.vision = PrimitivesVisionEncoder(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PrimitivesBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache(num_layers=len(self.layers))

    def encode_images(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each [3, H, W] image (multiple-of-42 sides) -> its [N_i, hidden] tokens, in sequence order."""
        return self.vision(pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: Sequence[torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Images fill the ``<image>`` slots of ``input_ids`` in order (row 0's first); ``attention_mask``
        [B, cached + new] is True on real tokens; ``labels`` at t+1 are predicted from t (-100 = skip).
        """
        b, t = input_ids.shape
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise GenerationError(
                f"attention_mask must be [batch, cached + new] = [{b}, {past + t}], got {list(attention_mask.shape)}"
            )
        h = self.embed_tokens(input_ids)
        images = list(pixel_values) if pixel_values is not None else []
        if past == 0:  # images enter with the prompt; afterwards they live in the cache
            h = splice_images(h, self.encode_images(images) if images else [], input_ids == self.config.image_token_id)
        elif images:
            raise GenerationError("pass pixel_values with the prompt (the first call), not while decoding")
        if position_ids is None:
            position_ids = default_position_ids(t, past, attention_mask, h.device)
        for layer in self.layers:
            h = layer(h, position_ids, cache, attention_mask)
        if cache is not None:
            cache.seen += t
        logits = lm_head_logits(self.lm_head, self.norm(h), 0 if labels is not None else logits_to_keep)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)
