"""The assembled visual-primitives model: sizes, image splicing, training step, cached decoding for MLA,
CSA and MHA decoders, KV entries per image, and the V4-Flash-shaped config on the meta device."""
import dataclasses

import pytest
import torch

from optictx.config import primitives_tiny, v4_flash_shaped
from optictx.errors import ConfigError, GenerationError
from optictx.model.reasoner import PrimitivesModel

IMG = 3  # primitives_tiny().image_token_id


def _small(**kw):
    base = dict(vision_width=32, vision_layers=1, vision_heads=2, vocab_size=64, hidden_size=48,
                num_hidden_layers=4, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=12,
                qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=4, num_experts_per_tok=2, compress_ratios=(0, 4, 8, 4), sliding_window=6,
                index_n_heads=2, index_head_dim=8, index_topk=3)
    return dataclasses.replace(primitives_tiny(), **(base | kw))


def _prompt(n_image_tokens: int, text=(5, 6, 7, 8, 9)) -> torch.Tensor:
    return torch.tensor([[0] + [IMG] * n_image_tokens + list(text)])


def test_primitives_tiny_size_and_forward_with_loss():
    torch.manual_seed(0)
    model = PrimitivesModel(primitives_tiny())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"primitives_tiny parameters: {n_params:,}")
    assert 5_000_000 <= n_params <= 20_000_000
    ids = _prompt(36)  # 252 px -> 18x18 patches -> 6x6 = 36 tokens
    labels = ids.masked_fill(ids == IMG, -100)
    out = model(ids, [torch.randn(3, 252, 252)], labels=labels)
    assert out.logits.shape == (1, ids.shape[1], 4096)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    for p in (model.vision.vit.patch_embed.weight, model.vision.merger.fc1.weight, model.layers[1].self_attn.wkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the image path trains end to end


@pytest.mark.parametrize("attention", ["csa", "mla", "mha"])
def test_cached_decoding_equals_one_full_pass(attention):
    torch.manual_seed(1)
    model = PrimitivesModel(_small(attention=attention)).eval()
    image = torch.randn(3, 84, 126)  # 2x3 = 6 tokens
    ids = torch.cat([_prompt(6), torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17, 18]])], dim=1)
    with torch.no_grad():
        full = model(ids, [image]).logits
        cache, prompt_len = model.new_cache(), 12
        steps = [model(ids[:, :prompt_len], [image], cache=cache).logits]
        for i in range(prompt_len, ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], cache=cache).logits)
    assert cache.seen == ids.shape[1]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("attention,pad", [("mla", 3), ("csa", 4)])
def test_left_padded_batch_decodes_like_each_prompt_alone(attention, pad):
    """Batched generation: a row left-padded by `pad` tokens (CSA: a whole block) gives the logits it gives alone."""
    torch.manual_seed(3)
    model = PrimitivesModel(_small(attention=attention, compress_ratios=(0, 4, 4, 4))).eval()
    img_a, img_b = torch.randn(3, 84, 126), torch.randn(3, 84, 84)  # 6 and 4 tokens
    long_ids = torch.cat([_prompt(6), torch.tensor([[20, 21, 22, 23]])], dim=1)  # 16 tokens
    short_ids = _prompt(4, text=tuple(range(30, 41 - pad)))  # 16 - pad tokens
    steps = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])

    def run(ids, images, tokens, mask=None):
        cache, outs = model.new_cache(), []
        with torch.no_grad():
            outs.append(model(ids, images, cache=cache, attention_mask=mask).logits[:, -1])
            for i in range(tokens.shape[1]):
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)
                outs.append(model(tokens[:, i : i + 1], cache=cache, attention_mask=mask).logits[:, -1])
        return torch.stack(outs, dim=1)

    alone_a = run(long_ids, [img_a], steps[:1])
    alone_b = run(short_ids, [img_b], steps[1:])
    batch = torch.cat([long_ids, torch.cat([torch.full((1, pad), 2), short_ids], dim=1)])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[1, :pad] = False
    both = run(batch, [img_a, img_b], steps, mask)
    assert (both[0] - alone_a[0]).abs().max() < 1e-4
    assert (both[1] - alone_b[0]).abs().max() < 1e-4


def test_756_image_fills_81_csa_entries_and_2_hca_entries():
    torch.manual_seed(2)
    model = PrimitivesModel(_small(compress_ratios=(0, 4, 128, 4))).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.full((1, 324), IMG), [torch.randn(3, 756, 756)], cache=cache)
    entries = [None if s.entries is None else s.entries.shape[1] for s in cache.layers]
    assert entries == [None, 81, 2, 81]  # window-only, CSA (324/4), HCA (324//128), CSA
    assert all(s.window.shape[1] == 6 for s in cache.layers)


def test_mla_cache_holds_latent_plus_rope_per_token():
    cfg = _small(attention="mla")
    model = PrimitivesModel(cfg).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(_prompt(6), [torch.randn(3, 84, 126)], cache=cache)
    t = 1 + 6 + 5
    assert cache.nbytes() == cfg.num_hidden_layers * t * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_slot_and_image_mismatches_raise():
    model = PrimitivesModel(_small()).eval()
    with pytest.raises(GenerationError, match="slot"):
        model(_prompt(5), [torch.randn(3, 84, 126)])  # 6 tokens, 5 slots
    with pytest.raises(GenerationError, match="slot"):
        model(_prompt(6))  # slots but no image
    cache = model.new_cache()
    model(torch.tensor([[0, 5]]), cache=cache)
    with pytest.raises(GenerationError, match="prompt"):
        model(torch.tensor([[6]]), [torch.randn(3, 84, 84)], cache=cache)
    with pytest.raises(ConfigError, match="compress_ratios"):
        PrimitivesModel(_small(compress_ratios=(0, 4)))
    with pytest.raises(ConfigError, match="attention"):
        PrimitivesModel(_small(attention="flash"))


# --------------------------------------------------------------------------- V4-Flash shape (meta device)
def _expected_params(cfg) -> int:
    """Parameter count from the config alone (an independent tally of every weight we build)."""
    d, h, hd, rd = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, 0
    qr, c = cfg.q_lora_rank, cfg.vision_width
    vit = 3 * 14 * 14 * c + c + cfg.vision_layers * (4 * c + 3 * c * c + 3 * c + c * c + c + 8 * c * c + 5 * c) + 2 * c
    merger = 2 * 9 * c + 9 * c * d + d + d * d + d + 32 * d + d
    total = vit + merger + 2 * cfg.vocab_size * d + d
    for i in range(cfg.num_hidden_layers):
        m = cfg.compress_ratios[i]
        attn = d * qr + qr + qr * h * hd + d * hd + hd + h
        attn += (h * hd // cfg.o_groups) * cfg.o_groups * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * d
        if m:
            coff = 2 if m == 4 else 1
            attn += 2 * d * coff * hd + m * coff * hd + hd
        if m == 4:
            di = cfg.index_head_dim
            attn += qr * cfg.index_n_heads * di + d * cfg.index_n_heads + 2 * d * 2 * di + 4 * 2 * di + di
        e = cfg.n_routed_experts
        ffn = e * d + e + e * 3 * d * cfg.moe_intermediate_size + 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts
        if i < cfg.first_k_dense_replace:
            ffn = 3 * d * cfg.intermediate_size
        total += attn + ffn + 2 * d
    return total + rd


def test_v4_flash_shaped_layers_build_on_meta_with_the_expected_shapes():
    cfg = dataclasses.replace(v4_flash_shaped(), num_hidden_layers=4, n_routed_experts=16)  # win, win, CSA, HCA
    with torch.device("meta"):
        model = PrimitivesModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(cfg)
    assert model.layers[2].self_attn.wo_a.weight.shape == (8 * 1024, 64 * 512 // 8)
    assert model.layers[2].self_attn.indexer.wq_b.weight.shape == (64 * 128, 1024)
    assert model.layers[3].self_attn.indexer is None and model.layers[3].self_attn.compressor.ape.shape == (128, 512)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.slow
def test_v4_flash_shaped_whole_model_on_meta():
    cfg = v4_flash_shaped()
    with torch.device("meta"):
        model = PrimitivesModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"v4_flash_shaped parameters (meta): {n_params:,}")
    assert n_params == _expected_params(cfg)
