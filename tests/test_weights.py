"""Checkpoint I/O: the official key listing on meta, save/load round trip, pickle and lying headers refused, hub ids."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from optictx.config import deepseek_ocr, ocr_tiny
from optictx.errors import ModelNotFoundError, WeightsError
from optictx.model.vlm import DeepseekOCRForCausalLM
from optictx.weights import (
    INDEX_FILE, SINGLE_FILE, check_keys, from_pretrained, load_state_dict, params_on_meta, read_header,
    resolve_model_path, save_pretrained,
)


# --------------------------------------------------------------------------- official listing (reference §8)
def official_decoder_keys() -> dict[str, tuple[int, ...]]:
    """Decoder keys and shapes exactly as listed in reference §8."""
    d, v, ffn, moe, shared = 1280, 129280, 6848, 896, 1792
    keys = {"lm_head.weight": (v, d), "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for layer in range(12):
        p = f"model.layers.{layer}."
        keys[p + "input_layernorm.weight"] = (d,)
        keys[p + "post_attention_layernorm.weight"] = (d,)
        for n in "qkvo":
            keys[p + f"self_attn.{n}_proj.weight"] = (d, d)
        if layer == 0:
            keys |= {p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                     p + "mlp.down_proj.weight": (d, ffn)}
            continue
        keys[p + "mlp.gate.weight"] = (64, d)
        for e in range(64):
            q = p + f"mlp.experts.{e}."
            keys |= {q + "gate_proj.weight": (moe, d), q + "up_proj.weight": (moe, d), q + "down_proj.weight": (d, moe)}
        q = p + "mlp.shared_experts."
        keys |= {q + "gate_proj.weight": (shared, d), q + "up_proj.weight": (shared, d),
                 q + "down_proj.weight": (d, shared)}
    return keys


def official_encoder_keys() -> dict[str, tuple[int, ...]]:
    """SAM, CLIP, projector and separator keys as listed in reference §8."""
    keys = {"model.image_newline": (1280,), "model.view_seperator": (1280,),
            "model.projector.layers.weight": (1280, 2048), "model.projector.layers.bias": (1280,)}
    s = "model.sam_model."
    keys |= {s + "patch_embed.proj.weight": (768, 3, 16, 16), s + "patch_embed.proj.bias": (768,),
             s + "pos_embed": (1, 64, 64, 768)}
    for b in range(12):
        p = f"{s}blocks.{b}."
        rel = 127 if b in (2, 5, 8, 11) else 27
        keys |= {p + "norm1.weight": (768,), p + "norm1.bias": (768,), p + "norm2.weight": (768,),
                 p + "norm2.bias": (768,), p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
                 p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,), p + "attn.rel_pos_h": (rel, 64),
                 p + "attn.rel_pos_w": (rel, 64), p + "mlp.lin1.weight": (3072, 768), p + "mlp.lin1.bias": (3072,),
                 p + "mlp.lin2.weight": (768, 3072), p + "mlp.lin2.bias": (768,)}
    keys |= {s + "neck.0.weight": (256, 768, 1, 1), s + "neck.1.weight": (256,), s + "neck.1.bias": (256,),
             s + "neck.2.weight": (256, 256, 3, 3), s + "neck.3.weight": (256,), s + "neck.3.bias": (256,),
             s + "net_2.weight": (512, 256, 3, 3), s + "net_3.weight": (1024, 512, 3, 3)}
    c = "model.vision_model."
    keys |= {c + "embeddings.class_embedding": (1024,), c + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
             c + "embeddings.position_embedding.weight": (257, 1024), c + "pre_layrnorm.weight": (1024,),
             c + "pre_layrnorm.bias": (1024,)}
    for layer in range(24):
        p = f"{c}transformer.layers.{layer}."
        keys |= {p + "layer_norm1.weight": (1024,), p + "layer_norm1.bias": (1024,),
                 p + "layer_norm2.weight": (1024,), p + "layer_norm2.bias": (1024,),
                 p + "self_attn.qkv_proj.weight": (3072, 1024), p + "self_attn.qkv_proj.bias": (3072,),
                 p + "self_attn.out_proj.weight": (1024, 1024), p + "self_attn.out_proj.bias": (1024,),
                 p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
                 p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,)}
    return keys


@pytest.fixture(scope="module")
def official_meta():
    with params_on_meta():  # parameters on meta (what from_pretrained builds), no memory, no init
        model = DeepseekOCRForCausalLM(deepseek_ocr())
    assert all(p.is_meta for p in model.parameters())
    return model


def test_official_config_on_meta_has_exact_count_and_keys(official_meta):
    sd = official_meta.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(sd) == 2710
    assert sum(p.numel() for p in official_meta.parameters()) == 3_336_106_240
    decoder = official_decoder_keys()
    assert len(decoder) == 2234
    assert {k: s for k, s in shapes.items() if k in decoder} == decoder
    lang = sum(sd[k].numel() for k in decoder)
    assert lang == 2_934_734_080
    expected = decoder | official_encoder_keys()
    assert len(expected) == 2710
    assert shapes == expected  # no extra, no missing, every shape right
    assert "model.vision_model.embeddings.position_ids" not in sd  # a non-persistent buffer, not in the file


# --------------------------------------------------------------------------- round trip on a tiny model
class Views:
    """Duck-typed ImageViews: what DeepEncoder.encode reads."""

    def __init__(self, global_view, crops, grid):
        self.global_view, self.crops, self.grid = global_view, crops, grid


def _tiny_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [Views(torch.rand(3, 256, 256, generator=g) * 2 - 1,
                   torch.rand(2, 3, 128, 128, generator=g) * 2 - 1, (2, 1))]
    with torch.no_grad():
        n = model.model.encode(views)[0].shape[0]
    ids = torch.cat([torch.tensor([0]), torch.full((n,), 7), torch.randint(10, 4000, (5,), generator=g)])[None]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 1 : n + 1] = True
    return ids, views, mask


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    cfg = ocr_tiny()
    model = DeepseekOCRForCausalLM(cfg).eval()
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["config.json", INDEX_FILE, SINGLE_FILE])
    header = read_header(out_dir / SINGLE_FILE)
    assert set(header) == set(model.state_dict())  # zero missing / unexpected, official names
    index = json.loads((out_dir / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(header) and set(index["weight_map"].values()) == {SINGLE_FILE}
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    config = json.loads((out_dir / "config.json").read_text())
    assert config["hidden_size"] == 256 and config["language_config"]["n_routed_experts"] == 8

    assert "image_token_id" not in config  # official id: the file stays like the official one

    loaded = from_pretrained(out_dir, dtype="fp32", device="cpu")
    assert not loaded.training
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids, views, mask = _tiny_inputs(model)
    with torch.no_grad():
        want = model(ids, images=views, images_seq_mask=mask).logits
        got = loaded(ids, images=views, images_seq_mask=mask).logits
    assert torch.equal(got, want)

    bf16 = DeepseekOCRForCausalLM.from_pretrained(out_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_sharded_index_and_lying_index(tmp_path):
    a = {"x": torch.arange(6.0).view(2, 3)}
    b = {"y": torch.ones(4, dtype=torch.int64)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    sd = load_state_dict(tmp_path, dtype=torch.bfloat16)
    assert sd["x"].dtype == torch.bfloat16 and sd["y"].dtype == torch.int64  # only floats are cast
    torch.testing.assert_close(sd["x"].float(), a["x"])
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(WeightsError, match="does not hold"):
        load_state_dict(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(WeightsError, match="missing"):
        load_state_dict(tmp_path)


def test_key_and_shape_mismatches_are_listed(tmp_path):
    torch.manual_seed(0)
    model = DeepseekOCRForCausalLM(ocr_tiny())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["model.layers.1.mlp.gate.weight"]
    sd["model.layers.1.mlp.gate.bias"] = torch.zeros(8)
    sd["lm_head.weight"] = torch.zeros(10, 256)
    save_file(sd, str(tmp_path / SINGLE_FILE))
    (tmp_path / "config.json").write_text(json.dumps(ocr_tiny().to_dict()))
    with pytest.raises(WeightsError) as e:
        from_pretrained(tmp_path, dtype="fp32", device="cpu")
    msg = str(e.value)
    assert "1 missing: model.layers.1.mlp.gate.weight" in msg
    assert "1 unexpected: model.layers.1.mlp.gate.bias" in msg
    assert "lm_head.weight file [10, 256] vs model [4096, 256]" in msg


def test_check_keys_truncates_long_lists():
    expected = {f"k{i:02d}": torch.Size([1]) for i in range(12)}
    with pytest.raises(WeightsError, match=r"12 missing: k00, k01, k02, k03, k04 \(\+7 more\)"):
        check_keys(expected, {}, "x")


# --------------------------------------------------------------------------- refused files
def test_pickle_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="refusing to load pickle"):
        load_state_dict(tmp_path)  # folder with only a .bin
    with pytest.raises(WeightsError, match="refusing to load pickle"):
        load_state_dict(tmp_path / "pytorch_model.bin")
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes((tmp_path / "pytorch_model.bin").read_bytes())  # zip magic under a safe name
    with pytest.raises(WeightsError, match="refusing to load pickle"):
        load_state_dict(disguised)
    import pickle
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    with pytest.raises(WeightsError, match="refusing to load pickle"):
        load_state_dict(raw)


def _write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


def test_lying_or_corrupt_headers_are_refused(tmp_path):
    ok = _write_raw(tmp_path / "ok.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                    struct.pack("<2f", 1.5, -2.0))
    assert load_state_dict(ok)["w"].tolist() == [1.5, -2.0]
    cases = {
        "big_shape": ({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}, b"\0" * 8, None,
                      "outside"),
        "shape_vs_bytes": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "lies"),
        "header_len": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40, "corrupt"),
        "bad_dtype": ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype"),
        "no_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks"),
    }
    for name, (header, data, hlen, match) in cases.items():
        path = _write_raw(tmp_path / f"{name}.safetensors", header, data, hlen)
        with pytest.raises(WeightsError, match=match):
            load_state_dict(path)
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(WeightsError, match="JSON"):
        load_state_dict(bad_json)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(WeightsError, match="not a safetensors"):
        read_header(tmp_path / "tiny.safetensors")


# --------------------------------------------------------------------------- resolving names
def test_offline_hub_id_names_the_cache_to_fill(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("deepseek-ai/DeepSeek-OCR")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "models--deepseek-ai--DeepSeek-OCR") in msg
    assert "hf download deepseek-ai/DeepSeek-OCR" in msg


def test_offline_hub_id_uses_a_filled_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-OCR"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert resolve_model_path("deepseek-ai/DeepSeek-OCR") == snap


def test_local_paths(tmp_path):
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(tmp_path / "f.safetensors")


def test_save_is_atomic_and_overwrites(tmp_path):
    torch.manual_seed(1)
    model = DeepseekOCRForCausalLM(ocr_tiny(), image_token_id=9)
    save_pretrained(model, model.config, tmp_path, dtype="bf16")
    first = (tmp_path / SINGLE_FILE).stat().st_size
    save_pretrained(model, model.config, tmp_path, dtype="fp32")
    assert (tmp_path / SINGLE_FILE).stat().st_size > first
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert from_pretrained(tmp_path, dtype="fp32", device="cpu").image_token_id == 9  # a tiny tokenizer's id
