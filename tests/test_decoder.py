"""Decoder: RMSNorm, RoPE layout, MHA vs naive attention, KV-cache decoding and left padding equal full runs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from optictx.config import DeepseekV2Config, ocr_tiny
from optictx.errors import ConfigError, GenerationError
from optictx.model.attention import MHAttention, RMSNorm, apply_rope
from optictx.model.cache import KVCache
from optictx.model.decoder import DeepseekV2ForCausalLM, causal_lm_loss
from optictx.model.moe import MLP, MoE


def _cfg(**kw) -> DeepseekV2Config:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2,
                n_shared_experts=1, torch_dtype="float32")
    return dataclasses.replace(ocr_tiny().language_config, **(base | kw))


def _model(seed: int = 0, **kw) -> DeepseekV2ForCausalLM:
    torch.manual_seed(seed)
    m = DeepseekV2ForCausalLM(_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial norms so a wrong cast or axis shows up
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.uniform_(0.5, 1.5)
    return m


def test_rmsnorm_formula_and_fp32_compute():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8]])
    rms = math.sqrt(sum(v * v for v in range(1, 9)) / 8 + 1e-6)
    torch.testing.assert_close(norm(x), x / rms * torch.arange(1.0, 9.0))
    torch.manual_seed(0)
    # bf16 model: normalise in fp32, cast to bf16, *then* multiply by the bf16 weight (official order)
    norm = norm.to(torch.bfloat16)
    xb = (torch.randn(4, 8) * 30).bfloat16()
    x32 = xb.float()
    want = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    weight_first = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).bfloat16()
    assert not torch.equal(out, weight_first)


def test_rope_is_llama_rotate_half_layout():
    """Dim i pairs with dim i + D/2 and rotates by pos * theta^(-2i/D) (NeoX layout, not interleaved pairs)."""
    d, theta, pos = 8, 10000.0, 5
    x = torch.randn(1, 1, 1, d)
    got = apply_rope(x, torch.tensor([[pos]]), theta)[0, 0, 0]
    half = d // 2
    for i in range(half):
        ang = pos * theta ** (-2 * i / d)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + half]
        assert got[i].item() == pytest.approx((a * math.cos(ang) - b * math.sin(ang)).item(), abs=1e-5)
        assert got[i + half].item() == pytest.approx((b * math.cos(ang) + a * math.sin(ang)).item(), abs=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(pq, pk):
        return (apply_rope(q, torch.tensor([[pq]]), 1e4) * apply_rope(k, torch.tensor([[pk]]), 1e4)).sum().item()
    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)
    # positions beyond the first table size grow it
    assert torch.isfinite(apply_rope(q, torch.tensor([[5000]]), 1e4)).all()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mha_matches_naive_causal_attention(kv_heads):
    torch.manual_seed(1)
    cfg = _cfg(num_key_value_heads=kv_heads)
    attn = MHAttention(cfg)
    b, t, h, d = 2, 6, cfg.num_attention_heads, cfg.head_dim
    x = torch.randn(b, t, cfg.hidden_size)
    pos = torch.arange(t)[None].expand(b, t)
    q = apply_rope(attn.q_proj(x).view(b, t, h, d).transpose(1, 2), pos, cfg.rope_theta)
    k = apply_rope(attn.k_proj(x).view(b, t, kv_heads, d).transpose(1, 2), pos, cfg.rope_theta)
    v = attn.v_proj(x).view(b, t, kv_heads, d).transpose(1, 2)
    k, v = k.repeat_interleave(h // kv_heads, 1), v.repeat_interleave(h // kv_heads, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, pos), want, atol=1e-5, rtol=1e-5)


def test_layers_are_dense_then_moe_with_official_names():
    m = _model()
    assert isinstance(m.model.layers[0].mlp, MLP)
    assert all(isinstance(layer.mlp, MoE) for layer in m.model.layers[1:])
    keys = set(m.state_dict())
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.2.mlp.experts.5.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"):
        assert k in keys, k
    assert not any(k.endswith(".bias") for k in keys)


def test_cached_decoding_equals_full_forward():
    m = _model(2)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(len(m.model.layers))
        steps = [m(ids[:, :5], cache=cache).logits]
        for t in range(5, 11):
            steps.append(m(ids[:, t : t + 1], cache=cache).logits)
    assert cache.seen == 11
    assert cache.layers[0][0].shape == (2, 4, 11, 12)
    assert full.dtype == torch.float32
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_single_rows():
    m = _model(3)
    rows = [torch.randint(3, 97, (n,)) for n in (7, 4, 2)]
    width = 7
    ids = torch.full((3, width), 2)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    with torch.no_grad():
        batch = m(ids, attention_mask=mask).logits
        # prefill then 3 greedy-free steps with fixed tokens, batched with padding
        cache = KVCache(len(m.model.layers))
        m(ids, cache=cache, attention_mask=mask)
        nxt = torch.randint(3, 97, (3, 3))
        step_logits = []
        for s in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
            step_logits.append(m(nxt[:, s : s + 1], cache=cache, attention_mask=mask).logits[:, -1])
        for i, r in enumerate(rows):
            alone = m(torch.cat([r, nxt[i]])[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(r):], alone[: len(r)], atol=1e-5, rtol=1e-5)
            for s in range(3):
                torch.testing.assert_close(step_logits[s][i], alone[len(r) + s], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batch).all()  # padding queries never see an all-masked row


def test_logits_to_keep_and_loss():
    m = _model(4)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        full = m(ids).logits
        last = m(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:])
    labels = ids.clone()
    labels[0, :3] = -100
    out = m(ids, labels=labels)
    # hand-computed: positions t predict t+1, ignored labels skipped, mean over the 2*5-2 supervised ones
    lp = full.log_softmax(-1)
    terms = [-lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    assert len(terms) == 8
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    assert causal_lm_loss(full, torch.full_like(ids, -100)).item() == 0.0


def test_training_step_reaches_every_layer():
    m = _model(5).train()
    ids = torch.randint(0, 97, (2, 8))
    m(ids, labels=ids).loss.backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.model.layers[2].mlp.gate.weight.grad.abs().sum() > 0
    assert m.model.embed_tokens.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_typed_errors():
    m = _model()
    with pytest.raises(GenerationError, match="attention_mask"):
        m(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(GenerationError, match="exactly one"):
        m.model()
    with pytest.raises(ConfigError, match="use_mla"):
        DeepseekV2ForCausalLM(_cfg(use_mla=True, kv_lora_rank=16))
