"""Inference fast paths give bit-identical results to the plain computations they replace.

RoPE with the signed-sin table, the growable KV buffer, the fused q|k|v GEMM and the single-token MoE path
exist only for speed (benchmarks/generate.py); these tests hold each one to ``torch.equal`` against the
straightforward formula, and check the cache-invalidation and aliasing rules they rely on.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from optictx.config import ocr_tiny
from optictx.model.attention import KV_CHUNK, FusedWeights, MHAttention, append_kv, apply_rope, rope_at, rope_span
from optictx.model.moe import MoE


def _llama_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face Llama: cos/sin of pos·inv_freq repeated twice, ``x·cos + rotate_half(x)·sin``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos()[:, None] + torch.cat([-x2, x1], dim=-1) * emb.sin()[:, None]


def test_rope_is_bitwise_the_llama_formula_and_span_equals_lookup():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 11, 300, 2000]])
    assert torch.equal(apply_rope(x, pos, 1e4), _llama_rope(x, pos, 1e4))
    span, lookup = rope_span(40, 5, 16, 1e4, x.device, x.dtype), rope_at(torch.arange(40, 45)[None], 16, 1e4, x.dtype)
    assert all(torch.equal(a, b[0, 0]) for a, b in zip(span, lookup))


def test_fp32_rmsnorm_is_bitwise_the_official_formula():
    from optictx.model.attention import RMSNorm

    torch.manual_seed(8)
    for dim in (7, 48, 256):
        norm = RMSNorm(dim)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, 5, dim) * torch.rand(3, 5, 1) * 10
        want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        assert torch.equal(norm(x), want)


def test_append_kv_equals_cat_and_a_fork_never_overwrites_its_sibling():
    torch.manual_seed(1)
    past = torch.randn(2, 3, 4, 8)
    grown, want = None, past
    for step in range(KV_CHUNK + 3):  # crosses one buffer growth
        new = torch.randn(2, 3, 1 + step % 2, 8)
        grown, want = append_kv(past if grown is None else grown, new), torch.cat([want, new], dim=2)
    assert torch.equal(grown, want)
    a, b = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 2, 8)
    left, right = append_kv(grown, a), append_kv(grown, b)  # two continuations of one cache
    assert torch.equal(left, torch.cat([want, a], dim=2))
    assert torch.equal(right, torch.cat([want, b], dim=2))
    assert torch.equal(grown, want)


def test_append_kv_under_autograd_is_a_plain_differentiable_cat():
    past = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = append_kv(past, torch.randn(1, 2, 1, 4))
    assert not hasattr(out, "_kv_buffer")
    out.sum().backward()
    assert torch.equal(past.grad, torch.ones_like(past))


def test_fused_weights_are_bitwise_separate_gemms_and_follow_weight_changes():
    torch.manual_seed(2)
    layers = (nn.Linear(24, 32), nn.Linear(24, 16), nn.Linear(24, 16))
    fused = FusedWeights()
    for rows in (1, 7):
        x = torch.randn(rows, 24)
        with torch.no_grad():
            assert torch.equal(fused(x, layers), torch.cat([layer(x) for layer in layers], dim=-1))
    x = torch.randn(3, 24)
    with torch.no_grad():
        layers[1].weight.mul_(2.0)  # in place: version counter moves
        assert torch.equal(fused(x, layers), torch.cat([layer(x) for layer in layers], dim=-1))
        layers[2].weight = nn.Parameter(torch.randn(16, 24))  # replaced: data pointer moves
        assert torch.equal(fused(x, layers), torch.cat([layer(x) for layer in layers], dim=-1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_inference_path_equals_training_path_bitwise(kv_heads):
    torch.manual_seed(3)
    cfg = dataclasses.replace(ocr_tiny().language_config, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=kv_heads)
    attn = MHAttention(cfg)
    x = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None]
    with_grad = attn(x, pos)  # three GEMMs, autograd on
    assert with_grad.requires_grad
    with torch.no_grad():
        assert torch.equal(attn(x, pos), with_grad)  # one fused GEMM


MOE_GATES = {
    "softmax_v2": dict(),
    "sigmoid_bias_groups": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                routed_scaling_factor=2.5, n_group=4, topk_group=2),
}


@pytest.mark.parametrize("name", sorted(MOE_GATES))
def test_single_token_moe_is_bitwise_the_sorted_dispatch(name):
    torch.manual_seed(4)
    cfg = dataclasses.replace(ocr_tiny().language_config, hidden_size=32, moe_intermediate_size=16,
                              n_routed_experts=8, num_experts_per_tok=3, **MOE_GATES[name])
    moe = MoE(cfg).eval()
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.copy_(torch.randn(8))
    for _ in range(5):
        x = torch.randn(1, 1, 32)
        with torch.no_grad():
            got = moe(x)
            flat = x.view(1, 32)
            weights, indices, _ = moe.gate(flat)
            counts = torch.bincount(indices.view(-1), minlength=8)
            want = moe._dispatch(flat, weights, indices, counts) + moe.shared_experts(flat)
        assert torch.equal(got.view(1, 32), want)
        assert torch.equal(moe.last_stats.expert_counts, counts)


def test_single_token_moe_keeps_router_gradients_in_eval_mode():
    torch.manual_seed(5)
    moe = MoE(dataclasses.replace(ocr_tiny().language_config, hidden_size=32, moe_intermediate_size=16)).eval()
    moe(torch.randn(1, 32)).square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def _csa_layer(ratio: int, topk: int = 3):
    from optictx.config import primitives_tiny
    from optictx.model.csa import CompressedSparseAttention

    torch.manual_seed(6)
    cfg = dataclasses.replace(primitives_tiny(), hidden_size=48, num_attention_heads=2, q_lora_rank=16,
                              qk_nope_head_dim=12, qk_rope_head_dim=4, sliding_window=5, index_n_heads=2,
                              index_head_dim=8, index_topk=topk)
    return CompressedSparseAttention(cfg, ratio)


def test_in_place_rope_and_additive_masks_are_bitwise_the_plain_forms():
    from optictx.model.csa import neg_inf_where, rope_last, rope_last_
    from optictx.model.mla import rope_angles

    torch.manual_seed(7)
    x = torch.randn(2, 9, 3, 16)
    cos, sin = rope_angles(torch.arange(9)[None].expand(2, 9), 4, 1e4)
    for inverse in (False, True):
        assert torch.equal(rope_last_(x.clone(), cos, sin, 4, inverse), rope_last(x, cos, sin, 4, inverse))
    hidden = torch.rand(2, 9, 1, 16) < 0.3
    assert torch.equal(x + neg_inf_where(hidden), x.masked_fill(hidden, float("-inf")))


def test_indexer_selects_every_visible_entry_when_they_fit_in_top_k():
    from optictx.model.csa import Visibility

    layer = _csa_layer(4, topk=8)
    x = torch.randn(1, 30, 48)  # 7 entries <= top-8: the indexer never scores
    pos = torch.arange(30)[None]
    with torch.no_grad():
        keys, _ = layer.indexer.compressor(x, pos, 0)
        chosen = layer.indexer.select(x, layer.q_norm(layer.wq_a(x)), pos, keys, Visibility(0, 4, None))
    for t in range(30):
        assert sorted(j for j in chosen[0, t].tolist() if j >= 0) == list(range((t + 1) // 4))
