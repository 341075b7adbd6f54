"""MLA: the absorbed path equals the naive path, decoding with the compact cache equals one full pass."""
import dataclasses

import pytest
import torch

from optictx.config import primitives_tiny
from optictx.model.cache import KVCache
from optictx.model.mla import MLA, apply_rope_interleaved, mla_cache_numbers_per_token, rope_angles


def _cfg(q_lora_rank: int = 0):
    return dataclasses.replace(primitives_tiny(), hidden_size=64, num_attention_heads=4, q_lora_rank=q_lora_rank,
                               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _pos(b: int, t: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + t)[None].expand(b, t)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_absorbed_equals_naive_prefill(q_lora_rank):
    torch.manual_seed(0)
    cfg = _cfg(q_lora_rank)
    attn = MLA(cfg)
    x = torch.randn(2, 11, cfg.hidden_size)
    attn.attn_impl = "naive"
    naive = attn(x, _pos(2, 11))
    attn.attn_impl = "absorb"
    absorbed = attn(x, _pos(2, 11))
    assert (naive - absorbed).abs().max() < 1e-5
    assert naive.abs().mean() > 1e-2  # not trivially zero


def test_absorbed_decode_equals_naive_full_pass_and_cache_is_compact():
    torch.manual_seed(1)
    cfg = _cfg(24)
    attn = MLA(cfg)  # auto: naive prefill, absorbed decode
    b, t_prompt, t_new = 2, 7, 5
    x = torch.randn(b, t_prompt + t_new, cfg.hidden_size)
    attn.attn_impl = "naive"
    full = attn(x, _pos(b, t_prompt + t_new))
    attn.attn_impl = "auto"
    cache = KVCache(num_layers=1)
    outs = [attn(x[:, :t_prompt], _pos(b, t_prompt), cache, 0)]
    cache.seen += t_prompt
    for i in range(t_prompt, t_prompt + t_new):
        outs.append(attn(x[:, i : i + 1], _pos(b, 1, i), cache, 0))
        cache.seen += 1
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-5
    state = cache.layers[0]
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert mla_cache_numbers_per_token(cfg) == per_token == 40
    assert state.latent.shape == (b, t_prompt + t_new, cfg.kv_lora_rank)
    assert state.k_pe.shape == (b, t_prompt + t_new, cfg.qk_rope_head_dim)
    assert cache.nbytes() == b * (t_prompt + t_new) * per_token * 4


def test_padding_mask_hides_left_pads():
    """A left-padded row gives the same last-token output as the same prompt alone."""
    torch.manual_seed(2)
    cfg = _cfg()
    attn = MLA(cfg)
    x = torch.randn(1, 6, cfg.hidden_size)
    alone = attn(x, _pos(1, 6))
    padded = torch.cat([torch.randn(1, 3, cfg.hidden_size), x], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    out = attn(padded, pos, attention_mask=mask)
    assert (out[:, 3:] - alone).abs().max() < 1e-5


def test_interleaved_rope_rotates_pairs_and_inverts():
    x = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])  # [B=1, T=1, d=4]
    cos, sin = rope_angles(torch.tensor([[1]]), 4, theta=1.0)  # angles 1 and 1 (theta 1 -> inv_freq 1)
    y = apply_rope_interleaved(x, cos, sin)
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    assert torch.allclose(y, torch.tensor([[[c, s, -2 * s, 2 * c]]]))
    assert torch.allclose(apply_rope_interleaved(y, cos, sin, inverse=True), x, atol=1e-6)
