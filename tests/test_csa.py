"""V4 compressed sparse attention: entry counts, pooling formula, causal visibility, decode == prefill,
HCA attends every visible entry, CSA attends the indexer's top-k, padding by whole blocks changes nothing."""
import dataclasses

import pytest
import torch

from optictx.config import primitives_tiny
from optictx.model import csa
from optictx.model.cache import KVCache
from optictx.model.csa import (
    CompressedSparseAttention,
    Compressor,
    csa_cache_numbers_per_token,
    entry_visibility,
    rope_last,
)
from optictx.model.mla import rope_angles


def _cfg(**kw):
    base = dict(hidden_size=48, num_attention_heads=2, q_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=4,
                sliding_window=5, index_n_heads=2, index_head_dim=8, index_topk=3)
    return dataclasses.replace(primitives_tiny(), **(base | kw))


def _layer(ratio: int, seed: int = 0, **kw) -> CompressedSparseAttention:
    torch.manual_seed(seed)
    layer = CompressedSparseAttention(_cfg(**kw), ratio)
    with torch.no_grad():  # non-zero ape / sink so the tests see them
        for m in layer.modules():
            if isinstance(m, Compressor):
                m.ape.normal_(0, 0.5)
        layer.attn_sink.normal_(0, 1)
    return layer


def _pos(b: int, t: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + t)[None].expand(b, t)


def _run(layer, x, chunks):
    """Run x through the layer in consecutive chunks with a cache; return outputs and the cache."""
    cache, outs, s = KVCache(num_layers=1), [], 0
    for c in chunks:
        outs.append(layer(x[:, s : s + c], _pos(x.shape[0], c, s), cache, 0))
        cache.seen += c
        s += c
    return torch.cat(outs, dim=1), cache


def test_324_image_tokens_give_81_entries_and_partial_blocks_wait():
    torch.manual_seed(0)
    x = torch.randn(1, 324, 48)  # 756 px -> 54x54 patches -> 18x18 = 324 merged tokens
    _, cache = _run(_layer(4), x, [324])
    state = cache.layers[0]
    assert state.entries.shape == (1, 81, 16)
    assert state.index_keys.shape == (1, 81, 8)
    assert state.compressor.pending_kv.shape[1] == 0
    _, cache = _run(_layer(128), x, [324])
    state = cache.layers[0]
    assert state.entries.shape[1] == 2  # 324 // 128
    assert state.compressor.pending_kv.shape[1] == 324 - 256  # the unfinished block waits for decode
    assert state.window.shape == (1, 5, 16)
    assert csa_cache_numbers_per_token(_cfg(), 4) == 16 / 4 + 8 / 4


def test_pooling_is_gated_softmax_over_overlapping_slots():
    torch.manual_seed(1)
    comp = Compressor(dim=6, ratio=4, head_dim=4, rope_dim=2, eps=1e-6, rope_theta=10000.0)
    with torch.no_grad():
        comp.ape.normal_()
    x = torch.randn(1, 8, 6)
    entries, _ = comp(x, _pos(1, 8), start=0)
    kv, score = comp.wkv(x)[0], comp.wgate(x)[0] + comp.ape.repeat(2, 1)
    d = 4
    # entry 0: only the B-half of block 0 (its "previous block" does not exist)
    e0 = (kv[:4, d:] * score[:4, d:].softmax(0)).sum(0)
    # entry 1: A-half of block 0 and B-half of block 1, softmax over the 8 slots per channel
    slots_kv = torch.cat([kv[:4, :d], kv[4:, d:]])
    slots_score = torch.cat([score[:4, :d], score[4:, d:]])
    e1 = (slots_kv * slots_score.softmax(0)).sum(0)
    pooled = torch.stack([e0, e1])[None]
    cos, sin = rope_angles(torch.tensor([[0, 4]]), 2, 10000.0)  # RoPE at each block's first position
    expected = rope_last(comp.norm(pooled), cos, sin, 2)
    assert torch.allclose(entries, expected, atol=1e-6)


@pytest.fixture(params=[3, 128], ids=["query-chunk-3", "query-chunk-128"])
def query_chunk(request, monkeypatch):
    """Run a test with tiny query chunks too, so chunk edges fall inside windows and blocks."""
    monkeypatch.setattr(csa, "QUERY_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("ratio", [0, 4, 8])
def test_decode_and_chunked_prefill_equal_one_pass(ratio, query_chunk):
    torch.manual_seed(2)
    layer = _layer(ratio)
    x = torch.randn(2, 23, 48)
    full, _ = _run(layer, x, [23])
    decoded, _ = _run(layer, x, [9] + [1] * 14)
    chunked, _ = _run(layer, x, [3, 6, 1, 7, 6])
    assert (decoded - full).abs().max() < 1e-5
    assert (chunked - full).abs().max() < 1e-5
    uncached = layer(x, _pos(2, 23))
    assert (uncached - full).abs().max() < 1e-6


@pytest.mark.parametrize("ratio", [0, 4, 8])
def test_perturbing_a_future_token_never_changes_earlier_outputs(ratio, query_chunk):
    torch.manual_seed(3)
    layer = _layer(ratio)
    x = torch.randn(1, 24, 48)
    base = layer(x, _pos(1, 24))
    for t in (5, 11, 16, 23):
        y = x.clone()
        y[:, t] += 3.0
        out = layer(y, _pos(1, 24))
        assert (out[:, :t] - base[:, :t]).abs().max() == 0
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_visibility_rule():
    vis = entry_visibility(5, torch.arange(12), ratio=4)
    for t in range(12):
        for j in range(5):
            assert bool(vis[t, j]) == (j < (t + 1) // 4)


def _reference(layer: CompressedSparseAttention, x: torch.Tensor, chosen_entries) -> torch.Tensor:
    """Per-query loop: softmax over {window tokens} ∪ chosen_entries(t) plus the sink, MQA with K = V."""
    b, t, _ = x.shape
    pos = _pos(b, t)
    cos, sin = rope_angles(pos, layer.rope_dim, layer.rope_theta)
    qr = layer.q_norm(layer.wq_a(x))
    q = layer.wq_b(qr).view(b, t, layer.n_heads, layer.head_dim)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + layer.eps)
    q = rope_last(q, cos, sin, layer.rope_dim)
    kv = rope_last(layer.kv_norm(layer.wkv(x)), cos, sin, layer.rope_dim)
    entries, _ = layer.compressor(x, pos, 0)
    out = torch.zeros(b, t, layer.n_heads, layer.head_dim)
    for i in range(t):
        keys = [kv[:, j] for j in range(max(0, i - layer.window + 1), i + 1)]
        keys += [entries[:, j] for j in chosen_entries(i)]
        k = torch.stack(keys, dim=1)  # [B, K, D]
        s = torch.einsum("bhd,bkd->bhk", q[:, i], k) * layer.softmax_scale
        s = torch.cat([s, layer.attn_sink.view(1, -1, 1).expand(b, -1, 1)], dim=-1)
        out[:, i] = torch.einsum("bhk,bkd->bhd", s.softmax(-1)[..., :-1], k)
    out = rope_last(out, cos, sin, layer.rope_dim, inverse=True)
    return layer._out(out)


def test_hca_attends_every_visible_entry(query_chunk):
    torch.manual_seed(4)
    layer = _layer(3)  # non-overlapping, no indexer
    assert layer.indexer is None
    x = torch.randn(1, 20, 48, requires_grad=True)
    expected = _reference(layer, x, lambda i: range((i + 1) // 3))
    out = layer(x, _pos(1, 20))
    assert (out - expected).abs().max() < 1e-5
    probe = torch.randn_like(out)  # gradients (training) agree with the per-query reference too
    (g_ref,) = torch.autograd.grad((expected * probe).sum(), x)
    (g_out,) = torch.autograd.grad((out * probe).sum(), x)
    assert (g_out - g_ref).abs().max() < 1e-5 and g_ref.abs().max() > 1e-3


SEED_NO_TIES = 0


@torch.no_grad()
def test_csa_attends_the_indexer_top_k(query_chunk):
    layer = _layer(4, seed=SEED_NO_TIES, index_n_heads=4)
    x = torch.randn(1, 26, 48)
    pos = _pos(1, 26)
    ix = layer.indexer
    keys, _ = ix.compressor(x, pos, 0)
    cos, sin = rope_angles(pos, ix.rope_dim, ix.rope_theta)
    q = rope_last(ix.wq_b(layer.q_norm(layer.wq_a(x))).view(1, 26, ix.n_heads, ix.head_dim), cos, sin, ix.rope_dim)
    w = ix.weights_proj(x) * ix.scale

    def top(i):
        visible = list(range((i + 1) // 4))
        score = {j: float((w[0, i] * (q[0, i] @ keys[0, j]).relu()).sum()) for j in visible}
        ranked = sorted(visible, key=lambda j: -score[j])
        if len(ranked) > ix.topk:  # the seed is chosen so that the cut is unambiguous (ReLU makes ties)
            assert score[ranked[ix.topk - 1]] > score[ranked[ix.topk]]
        return ranked[: ix.topk]

    assert max(len(top(i)) for i in range(26)) == 3 and len(top(25)) < (26 // 4)  # top-k really drops some
    expected = _reference(layer, x, top)
    assert (layer(x, _pos(1, 26)) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("ratio", [0, 4])
def test_left_padding_by_whole_blocks_changes_nothing(ratio, query_chunk):
    torch.manual_seed(6)
    layer = _layer(ratio, sliding_window=7)
    x = torch.randn(1, 13, 48)
    alone = layer(x, _pos(1, 13))
    padded = torch.cat([torch.randn(1, 4, 48), x], dim=1)
    mask = torch.tensor([[False] * 4 + [True] * 13])
    pos = torch.cat([torch.zeros(1, 4, dtype=torch.long), _pos(1, 13)], dim=1)
    out = layer(padded, pos, attention_mask=mask)
    assert (out[:, 4:] - alone).abs().max() < 1e-5


def test_grouped_low_rank_output_projection_and_meta_build():
    layer = _layer(4, o_groups=2, o_lora_rank=6)
    assert layer.wo_a.weight.shape == (2 * 6, 2 * 16 // 2)
    x = torch.randn(1, 9, 48)
    assert layer(x, _pos(1, 9)).shape == (1, 9, 48)
    with torch.device("meta"):
        big = CompressedSparseAttention(_cfg(hidden_size=4096, num_attention_heads=64, q_lora_rank=1024,
                                             qk_nope_head_dim=448, qk_rope_head_dim=64, o_groups=8,
                                             o_lora_rank=1024, index_n_heads=64, index_head_dim=128), 4)
    assert big.wo_a.weight.shape == (8 * 1024, 64 * 512 // 8)
    assert big.compressor.wkv.weight.shape == (2 * 512, 4096)
    assert big.indexer.wq_b.weight.shape == (64 * 128, 1024)


def test_cache_not_advanced_raises_generation_error():
    from optictx.errors import GenerationError

    layer = _layer(4)
    cache = KVCache(num_layers=1)
    layer(torch.randn(1, 6, 48), _pos(1, 6), cache, 0)  # 6 tokens: one block done, 2 pending
    with pytest.raises(GenerationError, match="cache.seen"):
        layer(torch.randn(1, 1, 48), _pos(1, 1, 6), cache, 0)  # seen was not advanced to 6
