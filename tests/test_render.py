"""optictx.render: ground truth that round-trips (ink inside boxes, text in order), pagination, errors,
scripts (RTL Arabic, CJK), render_to_fit, markdown blocks, the CLI, and (slow) Tesseract reading a page."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from optictx.errors import RenderError
from optictx.render import MODES, PageStyle, from_999, render_markdown, render_text, render_to_fit, to_999
from optictx.render.fonts import find_font, primary_font

PROSE = ("Optical compression renders long text as an image and reads it back. "
         "The encoder turns a page into a few hundred vision tokens; the decoder writes the text again, "
         "with punctuation (commas, colons: and semicolons;) and numbers like 3.14, 2024 and 1,000,000.\n\n"
         "A second paragraph keeps the blank line that separates it from the first one.")


def _has(candidates) -> bool:
    return find_font(candidates) is not None


needs_noto = pytest.mark.skipif(not _has([("NotoSans-Regular.ttf", 0)]), reason="fonts-noto-core not installed")
needs_arabic = pytest.mark.skipif(not _has([("NotoSansArabic-Regular.ttf", 0)]), reason="Noto Sans Arabic missing")
needs_cjk = pytest.mark.skipif(not _has([("NotoSansCJK-Regular.ttc", 2)]), reason="fonts-noto-cjk not installed")


def ink_of(image) -> np.ndarray:
    """Coverage per pixel (0 = paper) of a black-on-white page."""
    return 255 - np.asarray(image.convert("L"), dtype=np.int64)


def inside(boxes, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = True
    return mask


SMALL = PageStyle(width=480, height=360, margin=20, font_size=16)


@needs_noto
def test_line_boxes_hold_all_the_ink_and_word_boxes_sit_in_their_line():
    page = render_text(PROSE, SMALL)[0]
    ink = ink_of(page.image)
    assert ink.sum() > 0
    # every inked pixel lies in some line box; boxes are tight (each edge row/column has ink)
    assert ink[inside([ln.box_px for ln in page.lines], ink.shape)].sum() == ink.sum()
    for ln in page.lines:
        x1, y1, x2, y2 = ln.box_px
        crop = ink[y1:y2, x1:x2]
        assert crop[0].sum() and crop[-1].sum() and crop[:, 0].sum() and crop[:, -1].sum()
        assert ln.box_999 == to_999(ln.box_px, SMALL.width, SMALL.height)
    lines = iter(page.lines)
    line = next(lines)
    for w in page.words:  # words come line by line, each inside its line's box
        while w.text not in line.text.split():
            line = next(lines)
        assert line.box_px[0] <= w.box_px[0] and w.box_px[2] <= line.box_px[2]
        assert line.box_px[1] <= w.box_px[1] and w.box_px[3] <= line.box_px[3]


@needs_noto
def test_page_text_keeps_every_character_in_order_and_paragraph_breaks():
    pages = render_text(PROSE * 3, SMALL)
    drawn = "".join(p.text for p in pages)
    assert re.sub(r"\s", "", drawn) == re.sub(r"\s", "", PROSE * 3)
    first = pages[0]
    assert "\n\n" in first.text  # the paragraph break survives as a blank line
    assert [ln for ln in first.text.split("\n") if ln] == [ln.text for ln in first.lines]
    assert [b.label for b in first.blocks] == ["text"] * len(first.blocks) and len(first.blocks) >= 2


@needs_noto
def test_long_text_paginates_within_the_margins():
    style = PageStyle(width=320, height=240, margin=16, font_size=14)
    pages = render_text(PROSE * 6, style)
    assert len(pages) >= 3
    assert [p.index for p in pages] == list(range(len(pages)))
    for p in pages:
        for ln in p.lines:
            x1, y1, x2, y2 = ln.box_px
            assert style.margin <= x1 < x2 <= style.width - style.margin
            assert style.margin <= y1 < y2 <= style.height - style.margin
    only = render_text(PROSE * 6, style, max_pages=1)
    assert len(only) == 1 and only[0].text == pages[0].text


@needs_noto
def test_two_columns_fill_left_then_right():
    style = PageStyle(width=600, height=300, margin=20, font_size=14, columns=2, column_gap=20)
    page = render_text(PROSE * 3, style)[0]
    mid = style.width / 2
    sides = [ln.box_px[0] >= mid for ln in page.lines]
    assert sides == sorted(sides) and sides[0] is False and sides[-1] is True
    assert all(ln.box_px[2] <= mid - 10 for ln, right in zip(page.lines, sides) if not right)


@needs_noto
@pytest.mark.parametrize("text", ["", "   \n\t \n"])
def test_empty_text_is_an_error(text):
    with pytest.raises(RenderError, match="empty"):
        render_text(text, SMALL)


@needs_noto
def test_characters_no_font_has_raise_and_are_named():
    with pytest.raises(RenderError, match="U\\+0378") as err:
        render_text("fine text \u0378 then more", SMALL)
    assert "install" in str(err.value)
    with pytest.raises(RenderError, match="U\\+0007"):
        render_text("bell \x07", SMALL)


@needs_noto
def test_latin_greek_cyrillic_render_with_one_style():
    page = render_text("Hello Привет Γειά σου", SMALL)[0]
    assert [w.text for w in page.words] == ["Hello", "Привет", "Γειά", "σου"]
    xs = [w.box_px[0] for w in page.words]
    assert xs == sorted(xs)


@needs_noto
@needs_arabic
def test_arabic_is_shaped_right_to_left_and_set_flush_right():
    style = PageStyle(width=480, height=160, margin=20, font_size=20)
    page = render_text("مرحبا بالعالم", style)[0]
    first, second = page.words
    assert (first.text, second.text) == ("مرحبا", "بالعالم")
    assert first.box_px[0] > second.box_px[2]  # the first word is on the right
    assert style.width - style.margin - page.lines[0].box_px[2] <= 2
    # shaping joins letters: the word's ink is one connected run, narrower than isolated letters would be
    isolated = render_text(" ".join("مرحبا"), style)[0]
    assert first.box_px[2] - first.box_px[0] < isolated.lines[0].box_px[2] - isolated.lines[0].box_px[0]


@needs_noto
@needs_cjk
def test_cjk_wraps_between_characters_and_keeps_closing_punctuation():
    text = "光学压缩把长文本渲染成图像再读回来。这样可以节省上下文，" * 3
    style = PageStyle(width=300, height=400, margin=10, font_size=20, font_family="cjk")
    page = render_text(text, style)[0]
    assert len(page.lines) >= 3
    assert page.text.replace("\n", "") == text
    assert all(len(w.text) == 1 or w.text[1:] in "。，" for w in page.words)
    assert not any(ln.text.startswith(("。", "，")) for ln in page.lines)


@needs_noto
def test_render_to_fit_picks_the_largest_size_that_fits_one_page():
    text = PROSE * 2
    fit = render_to_fit(text, "tiny")
    assert (fit.mode, fit.vision_tokens, fit.page.image.size) == ("tiny", 64, (512, 512))
    style = PageStyle(width=512, height=512, margin=512 // 32)
    assert len(render_text(text, style.with_(font_size=fit.font_size))) == 1
    assert len(render_text(text, style.with_(font_size=fit.font_size + 1))) > 1
    assert render_to_fit(text, 100).mode == "small" and MODES["small"] == (640, 100)
    with pytest.raises(RenderError, match="does not fit"):
        render_to_fit(PROSE * 200, "tiny", min_font_size=8)
    with pytest.raises(RenderError, match="unknown mode"):
        render_to_fit(text, "huge")


@needs_noto
def test_render_to_fit_target_ratio_cuts_text_to_a_token_budget():
    def count(s: str) -> int:  # a stand-in tokenizer: one token per word
        return len(s.split())

    fit = render_to_fit(PROSE * 4, "tiny", target_ratio=0.5, count_tokens=count)
    assert count(fit.text) == 32 and (PROSE * 4).startswith(fit.text)


def test_999_grid_matches_the_official_mapping_back():
    assert to_999((0, 0, 640, 480), 640, 480) == (0, 0, 999, 999)
    for box in [(10, 20, 300, 400), (1, 1, 639, 479)]:
        back = from_999(to_999(box, 640, 480), 640, 480)
        assert all(abs(a - b) <= 1 for a, b in zip(box, back))


@needs_noto
def test_augmentation_is_seeded_and_boxes_follow_rotation():
    style = SMALL.with_(noise_std=8.0, blur_radius=0.6, max_rotation_deg=5.0, seed=7)
    a, b = render_text(PROSE, style)[0], render_text(PROSE, style)[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.lines == b.lines
    c = render_text(PROSE, style.with_(seed=8))[0]
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    plain = render_text(PROSE, SMALL)[0]
    assert [ln.text for ln in a.lines] == [ln.text for ln in plain.lines]
    assert a.lines[0].box_px != plain.lines[0].box_px
    # the rotated boxes still hold (nearly) all the ink: noise is symmetric, so threshold it away
    dark = (ink_of(a.image) > 96).astype(np.int64)
    assert dark[inside([ln.box_px for ln in a.lines], dark.shape)].sum() >= 0.98 * dark.sum()


@needs_noto
def test_colours_and_style_validation():
    page = render_text("Colour", SMALL.with_(fg=(200, 30, 30), bg=(10, 20, 30)))[0]
    arr = np.asarray(page.image)
    assert tuple(arr[0, 0]) == (10, 20, 30)
    x1, y1, x2, y2 = page.lines[0].box_px
    assert (arr[y1:y2, x1:x2, 0].max(), arr[y1:y2, x1:x2, 2].max()) == (200, 30)
    for bad in [dict(margin=200), dict(font_size=1), dict(fg=(0, 0)), dict(columns=0), dict(width=4)]:
        with pytest.raises(RenderError):
            SMALL.with_(**bad)
    with pytest.raises(RenderError, match="too large"):
        render_text("x", PageStyle(width=200, height=60, margin=10, font_size=60))


MARKDOWN = """# Report

Intro paragraph with **bold** text.

- apples
- pears
  - green pears

```python
def f(x):
    return 2 * x
```

| Fruit | Qty |
|-------|----:|
| apple | 3 |
| pear | 12 |
"""


@needs_noto
def test_markdown_blocks_labels_and_source_round_trip():
    page = render_markdown(MARKDOWN, PageStyle(width=640, height=720, margin=24, font_size=16))[0]
    assert page.text == MARKDOWN.strip()
    assert [b.label for b in page.blocks] == ["title", "text", "text", "text", "text", "code", "table"]
    assert page.blocks[0].text == "# Report"
    assert page.blocks[5].text == "```python\ndef f(x):\n    return 2 * x\n```"
    texts = [ln.text for ln in page.lines]
    assert "Intro paragraph with bold text." in texts and "• apples" in texts
    assert "    return 2 * x" in texts and {"Fruit", "Qty", "apple", "3", "pear", "12"} <= set(texts)
    ink = ink_of(page.image)
    table = page.blocks[6].box_px
    x1, y1, x2, y2 = table
    assert (ink[y1, x1:x2] == 255).all() and (ink[y1:y2, x1] == 255).all()  # the grid is drawn
    # all text ink is inside the line boxes (the grid and the code panel are not text)
    text_ink = ink.copy()
    for b in page.blocks[5:]:
        bx1, by1, bx2, by2 = b.box_px
        text_ink[by1:by2, bx1:bx2] = np.where(text_ink[by1:by2, bx1:bx2] > 40, text_ink[by1:by2, bx1:bx2], 0)
    lines_mask = inside([ln.box_px for ln in page.lines], ink.shape)
    grid = (ink == 255) & ~lines_mask
    assert text_ink[lines_mask].sum() + (text_ink * grid).sum() == text_ink.sum()


@needs_noto
def test_markdown_long_table_splits_with_the_header_repeated():
    rows = "\n".join(f"| item {i} | {i * 7} |" for i in range(40))
    md = f"| Name | Value |\n|---|---|\n{rows}\n"
    pages = render_markdown(md, PageStyle(width=400, height=400, margin=20, font_size=14))
    assert len(pages) >= 3
    for p in pages:
        assert p.text.startswith("| Name | Value |\n|---|---|\n") and p.blocks[0].label == "table"
        assert p.lines[0].text == "Name"
    body = [ln for p in pages for ln in p.text.split("\n")[2:]]
    assert body == rows.split("\n")
    with pytest.raises(RenderError, match="empty"):
        render_markdown("  \n", SMALL)


@needs_noto
def test_cli_writes_png_and_json_per_page(tmp_path):
    from PIL import Image

    from optictx.cli import main

    src = tmp_path / "in.txt"
    src.write_text(PROSE * 4, encoding="utf-8")
    assert main(["render", str(src), "--out", str(tmp_path / "out"), "--width", "400", "--height", "300",
                 "--margin", "16", "--font-size", "14"]) == 0
    jsons = sorted((tmp_path / "out").glob("page-*.json"))
    assert len(jsons) >= 2 and len(list((tmp_path / "out").glob("page-*.png"))) == len(jsons)
    record = json.loads(jsons[0].read_text(encoding="utf-8"))
    assert Image.open(jsons[0].with_suffix(".png")).size == (400, 300) == (record["width"], record["height"])
    assert record["lines"][0]["text"] in record["text"] and len(record["lines"][0]["box_999"]) == 4
    assert main(["render", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.slow
@needs_noto
@pytest.mark.skipif(shutil.which("tesseract") is None, reason="Debian tesseract-ocr not installed")
def test_tesseract_reads_a_rendered_12pt_page_at_144dpi():
    import pytesseract
    from rapidfuzz.distance import Levenshtein

    text = (PROSE.replace("\n\n", " ") + " ") * 5
    page = render_text(text, PageStyle.a4(dpi=144, font_pt=12), max_pages=1)[0]
    read = pytesseract.image_to_string(page.image, lang="eng", config="--psm 6")
    ref, got = " ".join(page.text.split()), " ".join(read.split())
    cer = Levenshtein.distance(ref, got) / len(ref)
    assert cer <= 0.01, (cer, got[:300])


# --------------------------------------------------------------------------- the fast path against the exact one
def _painted(text: str, style: PageStyle, exact: bool):
    """Every page of ``text``, painted by the sprite painter or (``exact``) by the reference painter."""
    from optictx.render.text import _lines, layout, metrics, paint, paragraphs, prepare

    text, ts = prepare(text, style)
    m = metrics(style, ts)
    pages, _ = layout(_lines(paragraphs(text), ts, style.column_width), m.per_column, style.columns)
    return [paint(cols, ts, style, m, i, exact=exact) for i, cols in enumerate(pages)]


CODE = "int([x]) -> x.__int__(); {'a': 1, \"b\": [2]} ~!@#$%^&*_+=|\\<>?/` fj Te Yo AV LT ffi 3.14 1,000"
FAST_CASES = {
    "prose": (PROSE * 3, SMALL),
    "code": ((CODE + " ") * 6, SMALL.with_(font_family="mono", font_size=13)),
    "scripts": ("Hello Привет Γειά σου naïve café — x\u0301y e\u0308 (jp) [Ẫ] ÉÅ ||| gjpq " * 4, SMALL),
    # lines whose ink overlaps, columns that touch, no margin: the darker-wins pastes
    "crowded": ((PROSE + CODE) * 2, PageStyle(width=600, height=400, margin=0, font_size=17, columns=3,
                                              column_gap=0, line_spacing=0.8)),
    "colours": (PROSE, SMALL.with_(fg=(200, 30, 30), bg=(10, 20, 30))),
    "tiny": (PROSE * 2, PageStyle(width=256, height=256, margin=4, font_family="mono", font_size=10,
                                  line_spacing=1.15)),
    "spaces": ("   indented   gaps        wide\n\n" + "x" * 200 + " end " + "y" * 70, SMALL),
}


@needs_noto
@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_sprite_painter_draws_the_exact_painters_pixels_and_boxes(case):
    text, style = FAST_CASES[case]
    fast, exact = _painted(text, style, False), _painted(text, style, True)
    assert len(fast) == len(exact) >= 1
    for a, b in zip(fast, exact):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert (a.text, a.lines, a.word_boxes, a.blocks) == (b.text, b.lines, b.word_boxes, b.blocks)


@needs_noto
@needs_arabic
@needs_cjk
def test_sprite_painter_matches_on_shaped_and_cjk_text():
    text = "مرحبا بالعالم hello 123 عالم\n光学压缩把长文本渲染成图像再读回来。Optical compression。" * 3
    for style in (SMALL, SMALL.with_(font_family="cjk")):
        for a, b in zip(_painted(text, style, False), _painted(text, style, True)):
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
            assert (a.lines, a.word_boxes) == (b.lines, b.word_boxes)


@needs_noto
def test_sprite_painter_ink_lies_inside_its_word_boxes():
    page = render_text((PROSE + " " + CODE + " ") * 3, PageStyle(width=720, height=560, margin=24, font_size=18))[0]
    ink = ink_of(page.image)
    assert ink.sum() > 0 and len(page.words) > 100
    assert ink[inside([w.box_px for w in page.words], ink.shape)].sum() == ink.sum()
    for w in page.words:  # tight: ink on every edge of every word box
        x1, y1, x2, y2 = w.box_px
        crop = ink[y1:y2, x1:x2]
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any(), w


@needs_noto
def test_batched_advances_equal_the_per_character_sums():
    """Typesetter.measure (one numpy pass) must give the bit-identical advances of the Python loop, or
    line breaks would differ from the exact path's."""
    from optictx.render.typeset import MIN_BATCH, Typesetter, stack_for

    words = sorted(set((PROSE + " " + CODE).split()) | {w + p for w in PROSE.split()[:40] for p in ".,;)"})
    assert len(words) >= MIN_BATCH
    for family, size in (("sans", 19), ("mono", 10), ("serif", 33)):
        ts = Typesetter(stack_for(family), size)  # a fresh one: nothing cached yet
        ts.measure(words)
        ref = Typesetter(stack_for(family), size)
        assert [ts._adv[w] for w in words] == [sum(ref._run_advance(f, t) for f, t in ref.runs(w)) for w in words]


@needs_noto
def test_cmap_reader_agrees_with_fonttools():
    from fontTools.ttLib import TTFont

    from optictx.render.fonts import _cmap_codes, font_stack

    faces = {primary_font("sans"), primary_font("mono"), *font_stack("sans")[1:3]}
    cjk = find_font([("NotoSansCJK-Regular.ttc", 2)])
    faces |= {cjk} if cjk else set()
    for ff in faces:
        cmap = TTFont(ff.path, fontNumber=ff.index, lazy=True).getBestCmap()
        assert _cmap_codes(ff.path, ff.index) == {cp for cp, glyph in cmap.items() if glyph != ".notdef"}, ff


@needs_noto
def test_sprite_cache_dropped_between_pages_and_shared_by_threads(monkeypatch):
    """A full sprite cache is dropped between pages (never under one) and threads share it: the pages
    come out as a single thread with an ample cache draws them."""
    from concurrent.futures import ThreadPoolExecutor

    from optictx.render import typeset

    style = SMALL.with_(font_size=15)
    texts = [(PROSE + " " + CODE + f" page {i} ") * 2 for i in range(8)]
    want = [np.asarray(render_text(t, style)[0].image) for t in texts]
    monkeypatch.setattr(typeset, "WORD_CACHE_BYTES", 20_000)  # a few dozen words
    typeset.typesetter.cache_clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda t: np.asarray(render_text(t, style)[0].image), texts * 3))
    finally:
        typeset.typesetter.cache_clear()
    assert all(np.array_equal(g, want[i % len(texts)]) for i, g in enumerate(got))
