"""DeepEncoder: official sizes and key names (meta device), attention math against direct references,
position-table resizing, and the slot layout (local, global, separator) on small configs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import (
    ClipConfig, DeepseekOCRConfig, DeepseekV2Config, ProjectorConfig, SamConfig, VisionConfig, deepseek_ocr,
    ocr_tiny,
)
from optictx.errors import ConfigError, ImageError
from optictx.model import sam as sam_mod
from optictx.model.clip import NoTPTransformerBlock, VitModel, resize_pos_embed
from optictx.model.deepencoder import DeepEncoder
from optictx.model.sam import Block, LayerNorm2d, get_rel_pos, resize_abs_pos, resize_rel_pos


def micro_config() -> DeepseekOCRConfig:
    """A DeepEncoder small enough to run many times per test: 128-px views -> 2x2 tokens (patch 16)."""
    return DeepseekOCRConfig(
        language_config=DeepseekV2Config(hidden_size=48, num_attention_heads=4, num_key_value_heads=4),
        vision_config=VisionConfig(
            image_size=128,
            sam=SamConfig(width=32, layers=3, heads=2, global_attn_indexes=(1,), downsample_channels=(24, 32),
                          image_size=128, window_size=3, out_chans=16),
            clip=ClipConfig(width=32, layers=2, heads=2, image_size=28, patch_size=14, ffn_hidden_size=64),
        ),
        projector_config=ProjectorConfig(input_dim=64, n_embed=48),
    )


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (the official init zeroes rel-pos and abs-pos, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def views(global_px: int, tile_px: int = 0, grid: tuple[int, int] = (1, 1), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] if tile_px else 0
    return SimpleNamespace(global_view=torch.randn(3, global_px, global_px, generator=g),
                           crops=torch.randn(n, 3, tile_px or 1, tile_px or 1, generator=g), grid=grid)


# --------------------------------------------------------------------------- official sizes and keys
@pytest.fixture(scope="module")
def official() -> DeepEncoder:
    with torch.device("meta"):
        return DeepEncoder(deepseek_ocr())


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_official_parameter_counts(official):
    assert n_params(official.sam_model) == 95_569_152
    assert n_params(official.vision_model) == 303_177_728
    assert n_params(official.projector) == 2_622_720
    assert official.image_newline.numel() + official.view_seperator.numel() == 2_560


def official_encoder_keys() -> dict[str, tuple[int, ...]]:
    """The SAM / CLIP / projector / separator part of the reference §8 listing (without the ``model.`` prefix)."""
    keys: dict[str, tuple[int, ...]] = {
        "image_newline": (1280,), "view_seperator": (1280,),
        "projector.layers.weight": (1280, 2048), "projector.layers.bias": (1280,),
        "sam_model.patch_embed.proj.weight": (768, 3, 16, 16), "sam_model.patch_embed.proj.bias": (768,),
        "sam_model.pos_embed": (1, 64, 64, 768),
        "sam_model.neck.0.weight": (256, 768, 1, 1), "sam_model.neck.1.weight": (256,),
        "sam_model.neck.1.bias": (256,), "sam_model.neck.2.weight": (256, 256, 3, 3),
        "sam_model.neck.3.weight": (256,), "sam_model.neck.3.bias": (256,),
        "sam_model.net_2.weight": (512, 256, 3, 3), "sam_model.net_3.weight": (1024, 512, 3, 3),
        "vision_model.embeddings.class_embedding": (1024,),
        "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (257, 1024),
        "vision_model.pre_layrnorm.weight": (1024,), "vision_model.pre_layrnorm.bias": (1024,),
    }
    for b in range(12):
        p = f"sam_model.blocks.{b}."
        rel = 127 if b in (2, 5, 8, 11) else 27
        keys |= {p + f"{n}.{t}": (768,) for n in ("norm1", "norm2") for t in ("weight", "bias")}
        keys |= {p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
                 p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
                 p + "attn.rel_pos_h": (rel, 64), p + "attn.rel_pos_w": (rel, 64),
                 p + "mlp.lin1.weight": (3072, 768), p + "mlp.lin1.bias": (3072,),
                 p + "mlp.lin2.weight": (768, 3072), p + "mlp.lin2.bias": (768,)}
    for layer in range(24):
        p = f"vision_model.transformer.layers.{layer}."
        keys |= {p + f"{n}.{t}": (1024,) for n in ("layer_norm1", "layer_norm2") for t in ("weight", "bias")}
        keys |= {p + "self_attn.qkv_proj.weight": (3072, 1024), p + "self_attn.qkv_proj.bias": (3072,),
                 p + "self_attn.out_proj.weight": (1024, 1024), p + "self_attn.out_proj.bias": (1024,),
                 p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
                 p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,)}
    return keys


def test_official_key_names_and_shapes(official):
    expected = official_encoder_keys()
    assert len(expected) == 179 + 293 + 4  # tensor counts of reference §8
    got = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert got == expected  # no missing, no extra (position_ids is a non-persistent buffer)
    assert "vision_model.embeddings.position_ids" in dict(official.named_buffers())


def test_build_encoder_creates_only_the_official_attributes():
    class Host(nn.Module):  # how the full model mixes the encoder in next to its decoder
        def __init__(self, cfg):
            nn.Module.__init__(self)
            self.layers = nn.ModuleList()
            DeepEncoder._build_encoder(self, cfg)

    host = Host(micro_config())
    own = set(host._modules) | set(host._parameters) | set(host._buffers)
    assert own == {"layers", "sam_model", "vision_model", "projector", "image_newline", "view_seperator"}
    assert {k.split(".")[0] for k in host.state_dict()} == own - {"layers"}


def test_separator_init_scale():
    torch.manual_seed(0)
    enc = DeepEncoder(ocr_tiny())
    assert enc.image_newline.shape == enc.view_seperator.shape == (256,)
    # randn / sqrt(n): the squared norm is ~1 (chi-square with n dof divided by n)
    assert 0.7 < enc.image_newline.pow(2).sum().item() < 1.3
    assert 0.7 < enc.view_seperator.pow(2).sum().item() < 1.3
    assert not torch.equal(enc.image_newline, enc.view_seperator)


def test_inconsistent_config_is_refused():
    cfg = micro_config()
    cfg.projector_config.input_dim = 63
    with pytest.raises(ConfigError, match="input_dim"):
        DeepEncoder(cfg)


# --------------------------------------------------------------------------- SAM attention
def reference_attention(x: torch.Tensor, attn: nn.Module, table_len: int) -> torch.Tensor:
    """Direct attention over one [h, w, C] grid: softmax(q.k * scale + q.Rh[i-k] + q.Rw[j-l]) v."""
    h, w, c = x.shape
    heads = attn.heads
    d = c // heads
    qkv = x.reshape(h * w, c) @ attn.qkv.weight.t() + attn.qkv.bias
    q, k, v = (t.reshape(h * w, heads, d).transpose(0, 1) for t in qkv.split(c, dim=-1))

    def table(rel, n):  # the tables stored for size S, linearly interpolated (in fp32) to 2n-1 rows
        if 2 * n - 1 == table_len:
            return rel
        return F.interpolate(rel.float().t()[None], size=2 * n - 1, mode="linear")[0].t().to(rel.dtype)

    th, tw = table(attn.rel_pos_h, h), table(attn.rel_pos_w, w)
    pos = [(i, j) for i in range(h) for j in range(w)]
    rh = torch.stack([torch.stack([th[qi - ki + h - 1] for (ki, _) in pos]) for (qi, _) in pos])  # [L, L, d]
    rw = torch.stack([torch.stack([tw[qj - kj + w - 1] for (_, kj) in pos]) for (_, qj) in pos])
    bias = torch.einsum("nqd,qkd->nqk", q, rh) + torch.einsum("nqd,qkd->nqk", q, rw)
    scores = q @ k.transpose(1, 2) * d**-0.5 + bias
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(h * w, c)
    return (out @ attn.proj.weight.t() + attn.proj.bias).reshape(h, w, c)


def test_window_attention_equals_direct_per_window_computation():
    """Grid 5x7 with window 3: padded to 6x9, padded tokens are zeros and unmasked, then cropped."""
    blk = randomize(Block(dim=8, heads=2, mlp_ratio=2.0, window=3, grid=16)).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    got = blk(x)
    y = F.pad(blk.norm1(x), (0, 0, 0, 2, 0, 1))  # zero padding after norm1
    attn = torch.zeros_like(y)
    with torch.no_grad():
        for b in range(2):
            for i in range(0, 6, 3):
                for j in range(0, 9, 3):
                    attn[b, i:i + 3, j:j + 3] = reference_attention(y[b, i:i + 3, j:j + 3], blk.attn, 5)
        mid = x + attn[:, :5, :7]
        want = mid + blk.mlp(blk.norm2(mid))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_global_attention_with_interpolated_rel_pos_equals_direct_computation():
    """A global block built for a 6x6 grid (tables of 11 rows) run on 4x4 tokens: tables resized to 7."""
    blk = randomize(Block(dim=8, heads=2, mlp_ratio=2.0, window=0, grid=6), seed=1).double()
    assert blk.attn.rel_pos_h.shape == (11, 4)
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        y = blk.norm1(x)
        torch.testing.assert_close(blk.attn(y)[0], reference_attention(y[0], blk.attn, 11), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pixels,length", [(640, 79), (1280, 159), (1024, 127)])
def test_rel_pos_tables_resized_to_two_max_minus_one(pixels, length):
    table = torch.randn(127, 64)  # a global-block table of the official model
    grid = pixels // 16
    rel = get_rel_pos(grid, grid, table)
    assert rel.shape == (grid, grid, 64)
    resized = resize_rel_pos(table, 2 * grid - 1)
    assert resized.shape == (length, 64)
    # the SAM rule for equal sizes: row i, column j reads entry i - j + grid - 1
    assert torch.equal(rel[0, grid - 1], resized[0]) and torch.equal(rel[grid - 1, 0], resized[length - 1])
    assert torch.equal(rel[3, 3], resized[grid - 1])
    if length == 127:
        assert resized is table


def test_sam_resizes_global_tables_only(monkeypatch):
    """Tiny SAM (table grid 16, window 8) on a 192-px view: global tables go 31 -> 23, window tables stay 15."""
    seen = []
    real = sam_mod.resize_rel_pos
    monkeypatch.setattr(sam_mod, "resize_rel_pos", lambda t, n: seen.append((t.shape[0], n)) or real(t, n))
    cfg = ocr_tiny().vision_config.sam
    out = sam_mod.ImageEncoderViT(cfg)(torch.randn(1, 3, 192, 192))
    assert out.shape == (1, cfg.downsample_channels[-1], 3, 3)
    n_global = len(cfg.global_attn_indexes)
    assert sorted(set(seen)) == [(15, 15), (31, 23)]
    assert seen.count((31, 23)) == 2 * n_global and seen.count((15, 15)) == 2 * (cfg.layers - n_global)


def test_abs_pos_resize_is_bicubic_antialiased_and_identity_at_native_size():
    pos = torch.randn(1, 8, 8, 4)
    assert resize_abs_pos(pos, (8, 8)) is pos
    small = resize_abs_pos(pos, (5, 5))
    assert small.shape == (1, 5, 5, 4)
    want = F.interpolate(pos.permute(0, 3, 1, 2), size=(5, 5), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(small, want.permute(0, 2, 3, 1))
    no_aa = F.interpolate(pos.permute(0, 3, 1, 2), size=(5, 5), mode="bicubic", align_corners=False)
    assert not torch.allclose(small, no_aa.permute(0, 2, 3, 1), atol=1e-3)  # antialias changes a downsample
    half = resize_abs_pos(pos.bfloat16(), (5, 5))
    assert half.dtype == torch.bfloat16


def test_layernorm2d_normalises_channels():
    ln = randomize(LayerNorm2d(6))
    x = torch.randn(2, 6, 3, 4)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), want)


# --------------------------------------------------------------------------- CLIP
def test_clip_block_matches_qkv_row_order_and_quick_gelu():
    cfg = ClipConfig(width=8, layers=1, heads=2, ffn_hidden_size=16)
    blk = randomize(NoTPTransformerBlock(cfg)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        h = blk.layer_norm1(x)
        w, b = blk.self_attn.qkv_proj.weight, blk.self_attn.qkv_proj.bias
        q, k, v = ((h @ w[i * 8:(i + 1) * 8].t() + b[i * 8:(i + 1) * 8]).view(2, 5, 2, 4).transpose(1, 2)
                   for i in range(3))  # rows [q; k; v]
        a = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v
        x1 = x + blk.self_attn.out_proj(a.transpose(1, 2).reshape(2, 5, 8))
        f = blk.mlp.fc1(blk.layer_norm2(x1))
        want = x1 + blk.mlp.fc2(f * torch.sigmoid(1.702 * f))
        torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-10)


def test_clip_pos_embed_keeps_cls_row_and_resizes_patch_rows():
    pos = torch.randn(1 + 16 * 16, 4)
    assert resize_pos_embed(pos, (16, 16)) is pos
    out = resize_pos_embed(pos, (10, 10))
    assert out.shape == (101, 4)
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 16, 16, 4).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(10, 10), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(out[1:], want.permute(0, 2, 3, 1).reshape(100, 4))


def test_clip_takes_sam_features_as_patch_embeddings():
    cfg = micro_config().vision_config.clip
    vit = randomize(VitModel(cfg))
    feats = torch.randn(3, cfg.width, 2, 2)
    out = vit(3, feats)
    assert out.shape == (3, 5, cfg.width)
    torch.testing.assert_close(vit(torch.zeros(3, 3, 32, 32), feats), out)  # pixels only give the batch size
    assert not torch.allclose(vit(3, feats.flip(0))[0], out[0])


# --------------------------------------------------------------------------- layout
def expected_slots(base: int, tile: int, grid: tuple[int, int], patch: int = 16) -> int:
    """Reference §3.2: h(h+1) + 1 [+ (nh*h2)(nw*h2 + 1)] with h = ceil((base // patch) / 4)."""
    h = -(-(base // patch) // 4)
    h2 = -(-(tile // patch) // 4)
    nw, nh = grid
    return h * (h + 1) + 1 + ((nh * h2) * (nw * h2 + 1) if tile else 0)


@pytest.fixture(scope="module")
def micro() -> DeepEncoder:
    return randomize(DeepEncoder(micro_config()), seed=3).eval()


@pytest.mark.parametrize("base,tile,grid", [(128, 0, (1, 1)), (192, 0, (1, 1)), (128, 64, (3, 2)),
                                            (128, 64, (2, 3)), (192, 128, (2, 1))])
def test_encode_slot_counts_and_layout(micro, base, tile, grid):
    v = views(base, tile, grid)
    (out,) = micro.encode([v])
    assert out.shape == (expected_slots(base, tile, grid), 48)
    h = base // 64
    nw, nh = grid
    with torch.no_grad():
        glob = micro.features(v.global_view[None])[0].view(h, h, 48)
        local_rows, local_cols = 0, 0
        if tile:
            h2 = tile // 64
            local_rows, local_cols = nh * h2, nw * h2 + 1
            tiles = micro.features(v.crops).view(nh, nw, h2, h2, 48)
            local = out[: local_rows * local_cols].view(local_rows, local_cols, 48)
            assert torch.equal(local[:, -1], micro.image_newline.expand(local_rows, 48))
            for t in range(nw * nh):  # tile t sits at row t // nw, column t % nw of the stitched grid
                r, c = divmod(t, nw)
                got = local[r * h2:(r + 1) * h2, c * h2:(c + 1) * h2]
                torch.testing.assert_close(got, tiles[r, c], rtol=1e-5, atol=1e-5)
        g = out[local_rows * local_cols: -1].view(h, h + 1, 48)
        assert torch.equal(g[:, -1], micro.image_newline.expand(h, 48))
        torch.testing.assert_close(g[:, :-1], glob, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[-1], micro.view_seperator)


def test_batched_encode_equals_one_image_at_a_time(micro):
    batch = [views(128, 64, (2, 2), seed=1), views(192, seed=2), views(128, seed=3), views(128, 64, (1, 3), seed=4)]
    calls = []
    hook = micro.sam_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        together = micro.encode(batch)
    hook.remove()
    assert sorted(calls) == [1, 3, 7]  # one SAM call per global size (128: 3, 192: 1) and one for all 7 crops
    with torch.no_grad():
        for v, out in zip(batch, together):
            torch.testing.assert_close(out, micro.encode([v])[0], rtol=1e-5, atol=1e-5)
    assert DeepEncoder.forward is DeepEncoder.encode


def test_large_batches_are_cut_to_bound_the_mask_memory(micro, monkeypatch):
    from optictx.model import deepencoder

    batch = [views(128, 64, (2, 2), seed=1), views(128, 64, (1, 3), seed=4)]
    with torch.no_grad():
        whole = micro.encode(batch)
    # a 128-px view: 2 heads x 64^2 fp32 entries = 32 KiB of mask; 64-px crops: 2 x 16^2 x 4 = 2 KiB
    monkeypatch.setattr(deepencoder, "MASK_BYTES_PER_CALL", 5 * 2048)
    calls = []
    hook = micro.sam_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        cut = micro.encode(batch)
    hook.remove()
    assert calls == [1, 1, 5, 2]
    for a, b in zip(whole, cut):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_runs_in_the_weights_dtype(micro):
    v = views(128, 64, (2, 1))
    with torch.no_grad():
        want = micro.encode([v])[0]
        half = DeepEncoder(micro_config())
        half.load_state_dict(micro.state_dict())
        out = half.to(torch.bfloat16).encode([v])[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.15)


def test_tiny_preset_shapes():
    enc = DeepEncoder(ocr_tiny()).eval()
    with torch.no_grad():
        (out,) = enc.encode([views(256, 128, (2, 2))])
    assert out.shape == (expected_slots(256, 128, (2, 2)), 256) == (4 * 5 + 1 + 4 * 5, 256)


def test_bad_inputs_raise_image_error(micro):
    with pytest.raises(ImageError, match=r"\[B, 3, H, W\]"):
        micro.features(torch.zeros(1, 1, 64, 64))
    bad = views(128, 64, (2, 2))
    bad.grid = (3, 2)
    with pytest.raises(ImageError, match="tile grid"):
        micro.encode([bad])
    with pytest.raises(ImageError, match="global_view"):
        micro.encode([SimpleNamespace(global_view=torch.zeros(1, 3, 64, 64), crops=torch.zeros(0, 3, 1, 1),
                                      grid=(1, 1))])


# --------------------------------------------------------------------------- against preprocess and budget
@pytest.fixture(scope="module")
def counting() -> DeepEncoder:
    """Window-only 1-block SAM: cost linear in pixels, so the official view sizes (up to 1280 px) stay fast."""
    cfg = micro_config()
    cfg.vision_config.sam.layers, cfg.vision_config.sam.global_attn_indexes = 1, ()
    cfg.vision_config.sam.window_size = 8
    return DeepEncoder(cfg).eval()


@pytest.mark.parametrize("mode,size,slots", [("tiny", (800, 600), 73), ("small", (800, 600), 111),
                                             ("base", (800, 600), 273), ("large", (800, 600), 421),
                                             ("gundam", (1000, 1000), 693), ("gundam", (1280, 720), 483),
                                             ("gundam", (600, 500), 273)])
def test_encode_fills_exactly_the_budgeted_slots(counting, mode, size, slots):
    from PIL import Image

    from optictx.budget import ocr_budget
    from optictx.preprocess import prepare_views

    v = prepare_views(Image.new("RGB", size, (200, 30, 90)), mode)
    with torch.no_grad():
        (out,) = counting.encode([v])
    assert out.shape[0] == v.n_slots == ocr_budget(*size, mode).decoder_slots == slots
