"""Generation: cached == recomputed decoding for MHA/MLA/CSA, left-padded batches == single runs, streaming text
== full text (multi-byte safe), stop rules, sampling, and the two official n-gram guards on a model built to loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from optictx.config import ocr_tiny, primitives_tiny
from optictx.errors import GenerationError
from optictx.generate import (GenerationConfig, IncrementalDecoder, NGramIndex, WindowedNGramLogitsProcessor,
                              generate, left_pad, sample_next, stream, windowed_ngram_bans)
from optictx.model.decoder import DeepseekV2ForCausalLM
from optictx.model.vlm import DeepseekOCRForCausalLM
from optictx.tokenizer import train_bpe

V = 97
NO_EOS = dict(eos_token_id=None)


def _decoder(seed: int = 0, **kw) -> DeepseekV2ForCausalLM:
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2,
                n_shared_experts=1, torch_dtype="float32")
    torch.manual_seed(seed)
    return DeepseekV2ForCausalLM(dataclasses.replace(ocr_tiny().language_config, **(base | kw))).eval()


def _primitives(attention: str):
    reasoner = pytest.importorskip("optictx.model.reasoner")
    cfg = dataclasses.replace(
        primitives_tiny(), vision_width=32, vision_layers=1, vision_heads=2, vocab_size=V, hidden_size=48,
        num_hidden_layers=4, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=4,
        v_head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
        compress_ratios=(0, 4, 8, 4), sliding_window=6, index_n_heads=2, index_head_dim=8, index_topk=3,
        attention=attention)
    torch.manual_seed(3)
    return reasoner.PrimitivesModel(cfg).eval()


def _vlm():
    from optictx.train.ocr_run import apply_overrides

    cfg = ocr_tiny()
    apply_overrides(cfg, {
        "sam": {"width": 32, "layers": 2, "heads": 2, "global_attn_indexes": [1], "downsample_channels": [32, 64],
                "out_chans": 32},
        "clip": {"width": 64, "layers": 1, "heads": 2, "ffn_hidden_size": 128},
        "language": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 4,
                     "num_experts_per_tok": 2, "vocab_size": V}})
    torch.manual_seed(2)
    return DeepseekOCRForCausalLM(cfg, image_token_id=7).eval()


def _nano_views(seed: int):
    from PIL import Image

    from optictx.preprocess import prepare_views

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(64, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    return prepare_views(Image.fromarray(pixels), "nano")


# --------------------------------------------------------------------------- cached == recomputed
@pytest.mark.parametrize("kind", ["mha", "vlm", "mla", "csa"])
def test_cached_decode_equals_recomputed_decode_token_for_token(kind):
    prefill = {}
    if kind == "mha":
        model, prompt = _decoder(), [0, 5, 6, 7, 8, 9]
    elif kind == "vlm":
        model, views = _vlm(), _nano_views(0)
        prompt = [0] + [7] * views.n_slots + [11, 12, 13]
        prefill = {"images": [views]}
    else:  # MLA / CSA through the visual-primitives model: 84x126 px -> 2x3 = 6 image tokens
        model = _primitives(kind)
        prompt = [0] + [model.config.image_token_id] * 6 + [11, 12, 13]
        prefill = {"pixel_values": [torch.randn(3, 84, 126, generator=torch.Generator().manual_seed(0))]}
    # recomputing re-splices images wherever the image id appears, so the model must never emit it
    cfg = GenerationConfig(max_new_tokens=24, suppress_token_ids=frozenset({7, 3}), **NO_EOS)
    cached = generate(model, [prompt], cfg, prefill=prefill)
    recomputed = generate(model, [prompt], dataclasses.replace(cfg, use_cache=False), prefill=prefill)
    assert len(cached.token_ids[0]) == 24
    assert cached.token_ids == recomputed.token_ids
    assert cached.finish_reasons == ["length"]
    assert len(set(cached.token_ids[0])) > 3  # a real, varied decode, not a constant


def test_vlm_decode_depends_on_the_image():
    model = _vlm()
    outs = []
    for seed in (0, 1):
        views = _nano_views(seed)
        prompt = [0] + [7] * views.n_slots + [11, 12]
        outs.append(generate(model, [prompt], GenerationConfig(max_new_tokens=12, **NO_EOS),
                             prefill={"images": [views]}).token_ids[0])
    assert outs[0] != outs[1]


# --------------------------------------------------------------------------- batches
def test_left_padded_batch_equals_single_runs_and_finished_rows_leave():
    model = _decoder(seed=4)
    prompts = [[0, 21, 22], [0, 5, 6, 7, 8, 9, 10, 11], [0, 40, 41, 42, 43]]
    singles = [generate(model, [p], GenerationConfig(max_new_tokens=16, **NO_EOS)).token_ids[0] for p in prompts]
    # make row 0 stop early on "EOS": its single run's 4th token (absent from its first three)
    eos = next(t for t in singles[0][3:] if t not in singles[0][:3])
    cfg = GenerationConfig(max_new_tokens=16, eos_token_id=eos)
    want = [generate(model, [p], cfg).token_ids[0] for p in prompts]
    assert len(want[0]) < 16 and any(len(w) == 16 for w in want)  # rows really finish at different steps
    batch = generate(model, prompts, cfg)
    assert batch.token_ids == want
    assert batch.prompt_lengths == [3, 8, 5]
    assert [r == "eos" for r in batch.finish_reasons] == [len(w) < 16 for w in want]


def test_left_padded_vlm_batch_equals_single_runs():
    model = _vlm()
    views = [_nano_views(0), _nano_views(1)]
    prompts = [[0] + [7] * views[0].n_slots + [11, 12], [0, 30, 31, 32] + [7] * views[1].n_slots + [13]]
    cfg = GenerationConfig(max_new_tokens=10, **NO_EOS)
    singles = [generate(model, [p], cfg, prefill={"images": [v]}).token_ids[0] for p, v in zip(prompts, views)]
    ids, mask = left_pad(prompts, 2)
    seq_mask, _ = left_pad([[t == 7 for t in p] for p in prompts], False, torch.bool)
    batch = generate(model, ids, cfg, attention_mask=mask, prefill={"images": views, "images_seq_mask": seq_mask})
    assert batch.token_ids == singles


def test_left_padded_mla_batch_equals_single_runs():
    model = _primitives("mla")
    prompts = [[0, 21, 22], [0, 5, 6, 7, 8, 9, 10]]
    cfg = GenerationConfig(max_new_tokens=10, **NO_EOS)
    singles = [generate(model, [p], cfg).token_ids[0] for p in prompts]
    assert generate(model, prompts, cfg).token_ids == singles


def test_bad_inputs_raise_generation_errors():
    model = _decoder()
    with pytest.raises(GenerationError, match="left"):
        generate(model, torch.tensor([[0, 5, 2]]), attention_mask=torch.tensor([[True, True, False]]))
    with pytest.raises(GenerationError, match="at least one token"):
        generate(model, [[0, 1], []])
    with pytest.raises(GenerationError, match="context"):
        generate(_decoder(max_position_embeddings=8), [list(range(8))])
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(model, [[0, 5]], GenerationConfig(stop_strings=("x",)))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(ngram_size=30, window_size=20), dict(max_new_tokens=-1)):
        with pytest.raises(GenerationError):
            GenerationConfig(**bad)


def test_generation_stops_at_the_context_length():
    model = _decoder(max_position_embeddings=12)
    out = generate(model, [[0, 5, 6, 7, 8]], GenerationConfig(max_new_tokens=100, **NO_EOS))
    assert len(out.token_ids[0]) == 7 and out.finish_reasons == ["length"]


# --------------------------------------------------------------------------- text and streaming
TEXTS = ["The quick brown fox jumps over the lazy dog. Café 中文 naïve résumé — ok", "Hello <td>1</td> world 123"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS * 40, vocab_size=V + 300, min_frequency=1)


def _byte_level_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2 byte-to-unicode alphabet), so characters span several tokens."""
    table = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in table}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [tok.token_id(chars[b]) for b in text.encode("utf-8")]


def test_incremental_decoder_never_splits_a_character(tok):
    text = "Café 中文 naïve"
    ids = _byte_level_ids(tok, text)
    assert None not in ids and len(ids) == len(text.encode())
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.finish())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    first_zh = len("Café ".encode())
    assert deltas[first_zh] == deltas[first_zh + 1] == "" and deltas[first_zh + 2] == "中"


def test_stream_concatenation_equals_full_output(tok):
    model = _decoder(seed=5, vocab_size=tok.vocab_size)
    prompt = [tok.bos_id] + tok.encode("Café 中文")
    cfg = GenerationConfig(max_new_tokens=60, **NO_EOS)
    full = generate(model, [prompt], cfg, tokenizer=tok)
    s = stream(model, prompt, tok, cfg)
    deltas = list(s)
    assert len(deltas) > 10
    assert "".join(deltas) == full.texts[0] == s.output.texts[0] == tok.decode(full.token_ids[0])
    assert s.output.token_ids == full.token_ids


def test_stop_string_cuts_text_and_stream_never_shows_it(tok):
    model = _decoder(seed=5, vocab_size=tok.vocab_size)
    prompt = [tok.bos_id] + tok.encode("Hello")
    base = generate(model, [prompt], GenerationConfig(max_new_tokens=60, **NO_EOS), tokenizer=tok).texts[0]
    stop = base[20:23]
    assert len(stop) == 3
    cfg = GenerationConfig(max_new_tokens=60, stop_strings=(stop,), **NO_EOS)
    out = generate(model, [prompt], cfg, tokenizer=tok)
    assert out.texts[0] == base[:base.find(stop)]
    assert out.finish_reasons == ["stop"] and len(out.token_ids[0]) < 60
    assert "".join(stream(model, prompt, tok, cfg)) == out.texts[0]


# --------------------------------------------------------------------------- sampling
def test_top_p_keeps_the_nucleus_and_seeds_reproduce():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, temperature=1.0, top_p=0.6, generator=g)
    counts = torch.bincount(picks, minlength=3).tolist()
    assert counts[2] == 0  # 0.5 < 0.6, so token 1 is needed; token 2 is outside the nucleus
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    assert sample_next(logits[:1], temperature=0.0).item() == 0

    model = _decoder()
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7, **NO_EOS)
    a, b = (generate(model, [[0, 5, 6]], cfg).token_ids for _ in range(2))
    c = generate(model, [[0, 5, 6]], dataclasses.replace(cfg, seed=8)).token_ids
    greedy = generate(model, [[0, 5, 6]], GenerationConfig(max_new_tokens=20, **NO_EOS)).token_ids
    tiny_p = generate(model, [[0, 5, 6]], dataclasses.replace(cfg, top_p=1e-6)).token_ids
    assert a == b and a != c and a != greedy
    assert tiny_p == greedy


# --------------------------------------------------------------------------- n-gram guards
def _hf_bans(seq: list[int], n: int) -> set[int]:
    """Hugging Face's no_repeat_ngram rule, written directly: every n-gram of seq whose head is the tail."""
    if len(seq) < n - 1:
        return set()
    tail = seq[len(seq) - n + 1:] if n > 1 else []
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail}


def test_ngram_index_equals_the_hf_rule():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5):
        seq = torch.randint(0, 4, (200,), generator=g).tolist()
        idx = NGramIndex(n, seq[:10])
        for t in range(10, len(seq)):
            assert idx.banned() == _hf_bans(seq[:t], n)
            idx.push(seq[t])


def test_windowed_processor_matches_the_official_rule_and_whitelist():
    out = [5, 6, 7, 9, 5, 6, 7, 8, 5, 6]
    assert windowed_ngram_bans(out, 3, 100) == {7}
    assert windowed_ngram_bans(out, 3, 6) == {7}  # the (5, 6, 7) starting at index 4 is inside the window
    assert windowed_ngram_bans(out, 3, 5) == set()  # ... and now outside it
    assert windowed_ngram_bans(out, 3, 100, {7}) == set()
    logits = torch.zeros(10)
    banned = WindowedNGramLogitsProcessor(2, 100, whitelist_token_ids=[9])(out, logits)
    assert torch.isinf(banned[7]) and banned.isinf().sum() == 1  # after 6: 7 seen, 9 is not a follower
    assert not logits.isinf().any()  # the input is not modified


def _loop_model(cycle: dict[int, int], fallback: int) -> DeepseekV2ForCausalLM:
    """A decoder whose next token depends only on the last one: best ``cycle[t]``, second best ``fallback``.

    Attention and FFN outputs are zeroed, so the final hidden state is the (one-hot) embedding of the last token.
    """
    model = _decoder(seed=0, vocab_size=32, hidden_size=48)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(32, 48))
        head = torch.zeros(32, 48)
        for t in range(32):
            head[fallback, t] = 5.0
            head[cycle.get(t, fallback), t] = 10.0
        model.lm_head.weight.copy_(head)
    return model


def _assert_no_windowed_repeat(out: list[int], n: int, window: int, whitelist=frozenset()):
    """The official rule, checked step by step on the finished output."""
    for j in range(n - 1, len(out)):
        prefix = out[j - n + 1:j]
        for i in range(max(0, j - window), j - n + 1):
            if out[i:i + n - 1] == prefix:
                assert out[i + n - 1] != out[j] or out[j] in whitelist, (j, out)


def test_each_ngram_guard_stops_a_looping_model():
    eos = 1
    model = _loop_model({10: 11, 11: 12, 12: 13, 13: 10}, fallback=eos)
    prompt = [0, 10]
    free = generate(model, [prompt], GenerationConfig(max_new_tokens=64, eos_token_id=eos))
    assert free.finish_reasons == ["length"] and free.token_ids[0][:8] == [11, 12, 13, 10, 11, 12, 13, 10]

    hf = generate(model, [prompt], GenerationConfig(max_new_tokens=64, eos_token_id=eos, no_repeat_ngram_size=3))
    assert hf.finish_reasons == ["eos"]
    # (10, 11) + 12 would repeat the 3-gram that starts in the prompt: the HF guard counts the prompt
    assert hf.token_ids[0] == [11, 12, 13, 10, 11]
    seq = prompt + hf.token_ids[0]
    assert len({tuple(seq[i:i + 3]) for i in range(len(seq) - 2)}) == len(seq) - 2

    vllm = generate(model, [prompt], GenerationConfig(max_new_tokens=64, eos_token_id=eos, ngram_size=3,
                                                      window_size=90))
    assert vllm.finish_reasons == ["eos"]
    # only generated tokens count, so (10, 11, 12) is new here; (11, 12) + 13 repeats the first 3-gram
    assert vllm.token_ids[0] == [11, 12, 13, 10, 11, 12]
    _assert_no_windowed_repeat(vllm.token_ids[0], 3, 90)


def test_windowed_guard_lets_whitelisted_table_tags_repeat():
    eos, td, td_end = 1, 20, 21
    model = _loop_model({td: td_end, td_end: td}, fallback=eos)
    cfg = GenerationConfig(max_new_tokens=40, eos_token_id=eos, ngram_size=3, window_size=90)
    banned_run = generate(model, [[0, td]], cfg)
    assert banned_run.finish_reasons == ["eos"] and banned_run.token_ids[0] == [td_end, td, td_end, td]
    allowed = generate(model, [[0, td]], dataclasses.replace(cfg, whitelist_token_ids=frozenset({td, td_end})))
    assert allowed.finish_reasons == ["length"]
    assert allowed.token_ids[0] == [td_end, td] * 20
    _assert_no_windowed_repeat(allowed.token_ids[0], 3, 90, whitelist={td, td_end})
