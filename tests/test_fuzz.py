"""Property tests on every parser that meets untrusted input, and on the image views for random sizes and modes.

Two kinds of property: totality (any input gives a result or the module's typed error, never another
exception) and invariants (coordinates in 0..999, counts equal to ``budget``, round trips, truncation
robustness). Complements the example-based tests in test_primitives / test_metrics / test_preprocess.
Examples are kept small so the file runs in seconds; ``OPTICTX_FUZZ_SCALE=50`` fuzzes 50x harder.
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import badinputs as bad
from optictx import errors as E
from optictx.budget import MODES, ocr_budget
from optictx.config import DeepseekOCRConfig, PrimitivesConfig
from optictx.eval.metrics import teds, teds_structure
from optictx.eval.omnidocbench import normalize_formula, score_page, split_prediction
from optictx.preprocess import load_image, prepare_views
from optictx.primitives import (Block, format_det, html_table_to_gfm, parse_grounding, parse_html, parse_primitives,
                                strip_grounding)

SCALE = float(os.environ.get("OPTICTX_FUZZ_SCALE", "1"))  # e.g. 50 for a long local fuzzing session
FAST = settings(max_examples=int(60 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=int(15 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])

# --------------------------------------------------------------------------- grounding language
TAGS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|box|>", "<|/box|>", "<|point|>", "<|/point|>"]
ANY_TAG = re.compile(r"<[|｜]/?(ref|det|box|point)[|｜]>")
FRAGMENTS = TAGS + [t.replace("|", "｜") for t in TAGS] + [
    "<|", "|>", "<|re", "f|>", "[[", "]]", "[", "]", ",", " ", "\n", "-", ".5", "1e9", "9" * 60, "image", "title"]
soup = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.integers(-3000, 3000).map(str), st.text(max_size=4)),
                max_size=50).map("".join)
safe_label = st.text(st.characters(blacklist_characters="<|｜", blacklist_categories=("Cs", "Cc")), min_size=1,
                     max_size=10).filter(lambda s: s.strip())
safe_content = st.text(st.characters(blacklist_characters="<[]", blacklist_categories=("Cs",)), max_size=20)
box = st.tuples(*[st.integers(0, 999)] * 4)


whole_tag_soup = st.lists(st.one_of(st.sampled_from([f for f in FRAGMENTS if f not in ("<|", "|>", "<|re", "f|>")]),
                                    st.integers(-3000, 3000).map(str),
                                    st.text(st.characters(blacklist_characters="<|｜"), max_size=4)),
                          max_size=50).map("".join)


@FAST
@given(whole_tag_soup)
def test_strip_grounding_leaves_no_tag_behind(text):
    """Cleaned markdown never shows a grounding token (inputs made of whole tags and tag-free text)."""
    for md in (strip_grounding(text), strip_grounding(text, images=True, gfm_tables=True)):
        assert ANY_TAG.search(md) is None, md


@FAST
@example("<|re<|/ref|>f|>")
@given(soup)
def test_strip_grounding_leaves_no_tag_behind_even_from_halves(text):
    assert ANY_TAG.search(strip_grounding(text)) is None


@FAST
@given(soup)
def test_labels_never_hold_tags(text):
    for b in parse_grounding(text):
        assert ANY_TAG.search(b.label) is None and ANY_TAG.search(b.content) is None
    for p in parse_primitives(text):
        assert p.label is None or ANY_TAG.search(p.label) is None


@FAST
@given(st.lists(st.tuples(safe_label, st.lists(box, min_size=1, max_size=3), safe_content), min_size=1, max_size=4),
       st.data())
def test_truncated_output_keeps_every_complete_block(items, data):
    """Model output cut anywhere (max_tokens) still parses; every block that ended before the cut is exact."""
    pieces = [format_det(lab, bx) + "\n" + content + "\n\n" for lab, bx, content in items]
    doc = "".join(pieces)
    cut = data.draw(st.integers(0, len(doc)), label="cut")
    got = parse_grounding(doc[:cut])
    ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
    complete = sum(e + len("<|ref|>") <= cut for e in ends[:-1]) + (cut == len(doc))
    want = [Block(lab.strip(), tuple((min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
                                     for b in bx), content.strip()) for lab, bx, content in items]
    assert got[:complete] == want[:complete]


# --------------------------------------------------------------------------- HTML tables and markdown
cell_text = st.text(st.characters(blacklist_characters="<>&|\\", blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                    max_size=6)
rows = st.lists(st.lists(cell_text, min_size=1, max_size=4), min_size=1, max_size=4)


def to_html(table: list[list[str]], header: bool = False) -> str:
    tag = lambda i: "th" if header and i == 0 else "td"  # noqa: E731
    return "<table>" + "".join("<tr>" + "".join(f"<{tag(i)}>{c}</{tag(i)}>" for c in r) + "</tr>"
                               for i, r in enumerate(table)) + "</table>"


html_soup = st.lists(st.sampled_from(["<table>", "</table>", "<tr>", "</tr>", "<td>", "</td>", "<th>", "<thead>",
                                      "</tbody>", "<td colspan='2'>", "<td rowspan=x>", "<b>", "</b>", "x", " ",
                                      "&amp;",
                                      "<!--", "-->", "<br>", "<", ">", "<td colspan=99999999>"]),
                     max_size=30).map("".join)


@FAST
@given(st.one_of(html_soup, st.text(max_size=40)))
def test_html_helpers_are_total(html):
    parse_html(html)
    gfm = html_table_to_gfm(html)
    assert gfm is None or isinstance(gfm, str)


@FAST
@given(rows, st.booleans())
def test_gfm_has_one_line_per_row_plus_rule(table, header):
    gfm = html_table_to_gfm(to_html(table, header))
    lines = gfm.split("\n")
    assert len(lines) == len(table) + 1 and all(line.startswith("|") and line.endswith("|") for line in lines)


@FAST
@given(rows, st.one_of(rows.map(to_html), html_soup))
def test_teds_bounds_and_identity(gt_rows, pred):
    gt = to_html(gt_rows)
    assert teds(gt, gt) == 1.0 and teds_structure(gt, gt) == 1.0
    for score in (teds(pred, gt), teds_structure(pred, gt)):
        assert 0.0 <= score <= 1.0


md_soup = st.lists(st.sampled_from(["# T", "text", "\n", "\n\n", "$$", "x^2", "\\[", "\\]", "| a | b |",
                                    "|---|---|", "```", "```python", "<table>", "<tr><td>1</td></tr>", "</table>",
                                    "![](a.png)", "____________", "      ", "中文"]), max_size=30).map("".join)


@FAST
@given(st.one_of(md_soup, st.text(max_size=60)))
def test_prediction_splitter_is_total(md):
    blocks = split_prediction(md)
    assert [b.position for b in blocks] == sorted(b.position for b in blocks)
    assert all(b.kind in ("text", "formula", "table") and b.content.strip() for b in blocks)
    assert all(b.content.startswith("<table") for b in blocks if b.kind == "table")
    normalize_formula(md)


category = st.sampled_from(["title", "text_block", "equation_isolated", "table", "header", "figure", "abandon"])


@FAST
@given(st.lists(st.tuples(category, st.one_of(st.none(), st.integers(0, 20)), st.text(max_size=12), st.booleans()),
                max_size=6), st.one_of(md_soup, st.text(max_size=40)))
def test_page_scores_stay_in_range(dets, md):
    layout = [{"category_type": c, "order": o, "ignore": ign, "anno_id": i, "text": t, "latex": t,
               "html": f"<table><tr><td>{t}</td></tr></table>"} for i, (c, o, t, ign) in enumerate(dets)]
    r = score_page({"layout_dets": layout, "page_info": {"image_path": "p.jpg"}}, md)
    for m in r.text + r.formula + r.table:
        assert 0 <= m.edit_num <= m.upper
    assert r.order_edit is None or 0.0 <= r.order_edit <= 1.0


# --------------------------------------------------------------------------- configs
INT_FIELDS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
              "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "kv_lora_rank"]
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=False),
                        st.text(max_size=5))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), c, max_size=3)),
                          max_leaves=8)
config_keys = st.sampled_from(INT_FIELDS + ["language_config", "vision_config", "projector_config", "tile_tag",
                                            "candidate_resolutions", "use_mla", "torch_dtype", "architectures"])


@FAST
@given(st.dictionaries(st.sampled_from(INT_FIELDS), st.integers(1, 4096), max_size=5))
def test_config_from_well_typed_dict_is_total_and_round_trips(fields):
    try:
        cfg = DeepseekOCRConfig.from_dict(fields)
    except E.ConfigError as e:
        assert str(e)
        return
    assert DeepseekOCRConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@FAST
@example({"num_attention_heads": 0})
@example({"hidden_size": "1280"})
@example({"language_config": [1, 2]})
@given(st.dictionaries(config_keys, json_value, max_size=4))
def test_config_from_any_json_is_total(d):
    try:
        DeepseekOCRConfig.from_dict(d)
    except E.ConfigError:
        pass


@FAST
@given(st.dictionaries(st.text(max_size=12), json_value, max_size=5))
def test_primitives_config_from_any_json_is_total(d):
    try:
        PrimitivesConfig.from_dict(d)
    except E.ConfigError:
        pass


# --------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def tokenizer():
    from optictx.tokenizer import train_bpe

    return train_bpe(["Convert the document to markdown.", "Free OCR.", "hello world"] * 5, vocab_size=300)


prompt_piece = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8).filter(lambda s: "<image>" not in s)


@FAST
@given(st.one_of(st.sampled_from(["markdown", "ocr", "free-ocr", "figure", "describe", "locate", " OCR "]),
                 st.text(max_size=20), prompt_piece.map(lambda s: s + "<image>")),
       st.one_of(st.none(), st.text(max_size=8)))
def test_prompt_text_is_total(name, target):
    from optictx.prompts import prompt_text

    try:
        text = prompt_text(name, target)
    except E.GenerationError as e:
        assert str(e)
        return
    assert "<image>" in text


@FAST
@given(st.lists(prompt_piece, min_size=2, max_size=4), st.lists(st.integers(1, 300), min_size=1, max_size=3))
def test_prompt_layout_puts_exactly_the_slots(tokenizer, pieces, slots):
    from optictx.prompts import build_prompt

    tok = tokenizer
    text = "<image>".join(pieces)
    n_tags = len(pieces) - 1
    if n_tags != len(slots) or not text.strip() or text.strip().count("<image>") != n_tags:
        with pytest.raises(E.GenerationError):
            build_prompt(tok, text, slots)
        return
    p = build_prompt(tok, text, slots)
    assert len(p.input_ids) == len(p.images_seq_mask) and p.input_ids[0] == tok.bos_id
    assert sum(p.images_seq_mask) == sum(slots) == p.input_ids.count(tok.image_token_id)
    assert all((i == tok.image_token_id) == m for i, m in zip(p.input_ids, p.images_seq_mask))


# --------------------------------------------------------------------------- images
MODES_ = list(MODES)
PIL_MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA", "F", "I"]


@SLOW
@given(st.integers(1, 2200), st.integers(1, 2200), st.sampled_from(MODES_), st.sampled_from(PIL_MODES))
@example(1, 2200, "gundam", "RGB")
@example(641, 641, "gundam", "P")
@example(640, 2200, "gundam-m", "I;16")
def test_views_match_budget_for_any_size_and_mode(w, h, mode, pil_mode):
    img = load_image(Image.new(pil_mode, (w, h)))
    v = prepare_views(img, mode)
    b = ocr_budget(w, h, mode)
    m = MODES[mode]
    assert v.grid == b.tiles and v.crops.shape[0] == b.n_tiles
    assert v.n_slots == b.decoder_slots and v.vision_tokens == b.vision_tokens
    assert tuple(v.global_view.shape) == (3, m.base_size, m.base_size)
    assert tuple(v.crops.shape[1:]) == (3, m.image_size, m.image_size)
    for t in (v.global_view, v.crops):
        assert bool(t.isfinite().all()) and (t.numel() == 0 or (t.min() >= -1 and t.max() <= 1))


SEEDS = {"png": lambda: bad.encode(bad.noise_image(24, 16)),
         "jpeg": lambda: bad.encode(bad.noise_image(24, 16), "JPEG"),
         "gif": bad.animated_gif, "tiff": bad.float_tiff, "webp": lambda: bad.encode(bad.noise_image(24, 16), "WEBP"),
         "bmp": lambda: bad.encode(bad.noise_image(24, 16), "BMP"), "png16": bad.gray16_png}


@st.composite
def mutated(draw, seeds: dict):
    """A valid file with a few bytes overwritten, a slice cut out or its tail dropped."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))]())
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["flip", "cut", "drop"]))
    if how == "cut":
        a = draw(st.integers(0, len(data) - 1))
        del data[a:a + draw(st.integers(1, 64))]
    elif how == "drop":
        del data[draw(st.integers(1, len(data))):]
    return bytes(data)


@FAST
@given(mutated(SEEDS))
def test_load_image_on_damaged_files_is_total(data):
    try:
        img = load_image(data, max_pixels=4_000_000)
    except E.ImageError as e:
        assert str(e)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


# --------------------------------------------------------------------------- checkpoints and PDFs
@FAST
@given(st.one_of(mutated({"st": lambda: bad.safetensors_bytes(bad.honest_header(), b"\0" * 16)}),
                 st.builds(lambda h, tail: struct.pack("<Q", len(h)) + h + tail,
                           json_value.map(lambda v: json.dumps({"w": v}).encode()), st.binary(max_size=32))))
def test_safetensors_reader_is_total(data):
    from optictx.weights import load_state_dict

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        try:
            load_state_dict(path)
        except E.WeightsError as e:
            assert str(e)


@FAST
@given(mutated({"pdf": bad.reportlab_pdf}))
def test_pdf_open_is_total(data):
    from optictx.render.pdf import pdf_page_count

    try:
        assert pdf_page_count(data) >= 1
    except E.PDFError as e:
        assert str(e)


# --------------------------------------------------------------------------- rendering
render_text_st = st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd", "Po", "Zs", "Sm"),
                                       max_codepoint=0x4E2D), min_size=1, max_size=120)


@SLOW
@given(st.one_of(render_text_st, st.text(max_size=40)))
def test_render_keeps_every_character_or_refuses(text):
    """Every non-space character of the input is in the ground truth of the pages, in order; or the text
    is refused with a RenderError (empty, or a character no installed font has)."""
    from optictx.render import PageStyle, render_text

    try:
        pages = render_text(text, PageStyle(width=320, height=200, margin=10, font_size=14))
    except E.RenderError as e:
        assert str(e)
        return
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert squash("".join(p.text for p in pages)) == squash(text.replace("\t", " "))
    assume(pages)
    assert all(p.image.size == (320, 200) for p in pages)


markdown_soup = st.lists(st.sampled_from(["# Title", "## Sub", "text words", "**bold**", "`code`", "\n", "\n\n",
                                         "- item", "1. one", "> quote", "```", "```py", "| a | b |", "|---|---|",
                                         "| 1 |", "---", "    indented", "[link](u)", "中文", "مرحبا", "\t"]),
                        min_size=1, max_size=25).map("".join)


@SLOW
@given(markdown_soup)
def test_markdown_render_is_total_and_boxes_stay_on_the_page(md):
    from optictx.render import PageStyle
    from optictx.render.markdown import parse_markdown, render_markdown

    parse_markdown(md)
    style = PageStyle(width=360, height=260, margin=12, font_size=14)
    try:
        pages = render_markdown(md, style)
    except E.RenderError as e:
        assert str(e)
        return
    for page in pages:
        for b in page.blocks + page.lines:
            x1, y1, x2, y2 = b.box_px
            assert 0 <= x1 <= x2 <= style.width and 0 <= y1 <= y2 <= style.height, b
            assert all(0 <= v <= 999 for v in b.box_999)


# --------------------------------------------------------------------------- the atheris target stays runnable
@functools.lru_cache(maxsize=1)
def _atheris_target():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "fuzz" / "atheris_grounding.py"
    spec = importlib.util.spec_from_file_location("atheris_grounding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@FAST
@given(soup)
def test_atheris_invariants_hold_on_random_output(text):
    _atheris_target().check_one(text)


def test_atheris_seeds_pass_and_are_written(tmp_path):
    target = _atheris_target()
    for s in target.seeds():
        target.check_one(s)
    target.main(["atheris_grounding.py", "--seeds", str(tmp_path)])
    files = sorted(tmp_path.iterdir())
    assert len(files) == len(target.seeds())
    assert files[0].read_bytes()[1:].decode("utf-16-le") == target.seeds()[0]

