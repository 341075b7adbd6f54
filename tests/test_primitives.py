"""Grounding language: total parsers, exact round trips, official coordinate mapping, markdown clean-up, drawing."""

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from optictx.errors import ImageError, PrimitiveError
from optictx.primitives import (Block, Primitive, box_to_999, box_to_pixels, crop_blocks, draw_blocks,
                                format_box, format_det, format_points, html_table_to_gfm, parse_grounding,
                                parse_primitives, point_to_999, point_to_pixels, sort_left_to_right,
                                strip_grounding, to_999, to_pixels)

TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|box|>", "<|/box|>", "<|point|>", "<|/point|>",
          "<｜ref｜>", "<｜/ref｜>", "<｜box｜>", "<|", "|>", "<|/de", "[", "]", "[[", "]]", ",", ", ", " ",
          "\n", "-", ".", "image", "title", "1e9", "99999999999999999999999999999999999999999"]
soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.integers(-2000, 2000).map(str), st.text(max_size=6)),
                max_size=40).map("".join)
coord = st.integers(0, 999)
box = st.tuples(coord, coord, coord, coord)
point = st.tuples(coord, coord)
label = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: not any(t in s for t in ("<|ref|>", "<|/ref|>", "<|det|>", "<|box|>", "<|point|>", "<|/det|>",
                                       "<|/box|>", "<|/point|>")) and "｜" not in s)


def _ordered(b):
    return (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))


def _valid(prims, blocks):
    for p in prims:
        assert p.kind in ("box", "point")
        for c in p.coords:
            assert len(c) == (4 if p.kind == "box" else 2) and all(0 <= v <= 999 for v in c)
            if p.kind == "box":
                assert c[0] <= c[2] and c[1] <= c[3]
    for b in blocks:
        assert all(len(c) == 4 and c[0] <= c[2] and c[1] <= c[3] for c in b.boxes_999)


@settings(max_examples=400, deadline=None)
@given(st.one_of(soup, st.text()))
def test_parsers_are_total_and_outputs_valid(text):
    prims, blocks = parse_primitives(text), parse_grounding(text)
    _valid(prims, blocks)
    md = strip_grounding(text, images=True, gfm_tables=True)
    assert "<|ref|>" not in md and "<|det|>" not in md and "<|box|>" not in md


@settings(max_examples=200, deadline=None)
@given(label, st.lists(box, min_size=1, max_size=5))
def test_det_and_box_round_trip(lab, boxes):
    want = tuple(_ordered(b) for b in boxes)
    assert parse_grounding(format_det(lab, boxes)) == [Block(lab.strip(), want, "")]
    assert parse_primitives(format_box(lab, boxes)) == [Primitive("box", lab.strip(), want)]


@settings(max_examples=200, deadline=None)
@given(st.lists(point, min_size=1, max_size=8))
def test_points_round_trip_in_order(points):
    assert parse_primitives(format_points(points)) == [Primitive("point", None, tuple(points))]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(label, st.lists(box, min_size=1, max_size=3),
                          st.text("abc xyz#*\n()\\", max_size=20)), min_size=1, max_size=4))
def test_document_of_blocks_round_trips(items):
    text = "".join(format_det(lab, bx) + "\n" + content + "\n\n" for lab, bx, content in items)
    got = parse_grounding(text)
    assert got == [Block(lab.strip(), tuple(_ordered(b) for b in bx), content.strip()) for lab, bx, content in items]


def test_official_spacing():
    assert format_det("title", [(20, 37, 459, 160), (1, 2, 3, 4)]) == \
        "<|ref|>title<|/ref|><|det|>[[20, 37, 459, 160], [1, 2, 3, 4]]<|/det|>"
    assert format_box("cat", [(1, 2, 3, 4)]) == "<|ref|>cat<|/ref|><|box|>[[1,2,3,4]]<|/box|>"
    assert format_points([(5, 6), (7, 8)]) == "<|point|>[[5,6],[7,8]]<|/point|>"


@pytest.mark.parametrize("bad", [[(0, 0, 1000, 5)], [(-1, 0, 1, 1)], [(1.5, 0, 2, 2)], [(1, 2, 3)], []])
def test_format_rejects_bad_boxes(bad):
    with pytest.raises(PrimitiveError):
        format_det("x", bad)


def test_format_rejects_tag_in_label():
    with pytest.raises(PrimitiveError):
        format_box("a<|det|>b", [(1, 2, 3, 4)])


def test_truncated_and_messy_output():
    # second box cut mid-number: dropped; first box kept
    assert parse_grounding("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8")[0].boxes_999 == ((1, 2, 3, 4),)
    # the tag closed, the last group not: its numbers are complete, so it is kept
    assert parse_grounding("<|ref|>t<|/ref|><|det|>[[1,2,3,4<|/det|>")[0].boxes_999 == ((1, 2, 3, 4),)
    # extra spaces, out of range, reversed corners, floats
    b = parse_grounding("<|ref|> title <|/ref|><|det|>[[ 900 ,  -3,1500, 20.6 ]]<|/det|>\n# Head")
    assert b == [Block("title", ((900, 0, 999, 21),), "# Head")]
    # label cut off, and a half-written closing tag
    assert parse_grounding("intro <|ref|>tab<|/re") == [Block("tab", (), "")]
    assert parse_grounding("<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>hello <|/de") == \
        [Block("text", ((1, 2, 3, 4),), "hello")]
    # close tag forgotten but the list finished: the text after it (digits included) is content, not coordinates
    assert parse_grounding("<|ref|>text<|/ref|><|det|>[[1,2,3,4]]\n2024 report\n<|ref|>t<|/ref|>") == \
        [Block("text", ((1, 2, 3, 4),), "2024 report"), Block("t", (), "")]
    # wrong arity ignored, full-width bars accepted, stray closing tags ignored
    assert parse_primitives("<｜ref｜>dog<｜/ref｜><｜box｜>[[1,2,3],[4,5,6,7]]<｜/box｜></|box|>") == \
        [Primitive("box", "dog", ((4, 5, 6, 7),))]
    assert parse_primitives("<|/point|><|point|>[[3, 4], [5") == [Primitive("point", None, ((3, 4),))]


def test_to_pixels_pins_official_formula():
    assert to_pixels(999, 1024) == 1024 and to_pixels(0, 640) == 0
    assert to_pixels(500, 1000) == 500  # 500/999*1000 = 500.5 -> int() truncates
    assert to_pixels(998, 1000) == 998  # 998.998...
    assert box_to_pixels((0, 999, 999, 0), (200, 100)) == (0, 100, 200, 0)
    assert point_to_pixels((333, 666), (999, 1998)) == (333, 1332)


@given(coord, st.integers(1, 10000))
def test_to_pixels_matches_x_over_999_times_w(v, w):
    assert abs(to_pixels(v, w) - v * w / 999) < 1
    assert to_pixels(v, w) == int(v / 999 * w)


@given(st.integers(0, 10000), st.integers(1, 10000))
def test_to_999_inverts_to_pixels(px, w):
    px = min(px, w)
    u = to_999(px, w)
    assert 0 <= u <= 999
    assert abs(to_pixels(u, w) - px) <= 0.5 * w / 999 + 1


def test_to_999_clamps_and_box_helpers():
    assert to_999(-5, 100) == 0 and to_999(150, 100) == 999 and to_999(50, 100) == 500  # 499.5 rounds up
    assert box_to_999((80, 10, 20, 90), (100, 100)) == (200, 100, 799, 899)
    assert point_to_999((100, 0), (100, 50)) == (999, 0)
    assert sort_left_to_right([(5, 0, 9, 9), (1, 3, 2, 4), (1, 0, 2, 4)]) == [(1, 0, 2, 4), (1, 3, 2, 4),
                                                                               (5, 0, 9, 9)]
    with pytest.raises(PrimitiveError):
        to_999(1, 0)


RAW = ("<|ref|>title<|/ref|><|det|>[[20, 37, 459, 160]]<|/det|>\n# Report\n\n"
       "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499], [500, 500, 999, 999]]<|/det|>\n\n\n\n"
       "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nLet \\(f \\coloneqq g\\) and b \\eqqcolon a.\n\n\n\n"
       "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<table><tr><td>a</td><td>b|c</td></tr>"
       "<tr><td>1</td><td>2</td></tr></table>\n")


def test_strip_grounding_like_the_official_runner():
    md = strip_grounding(RAW)
    assert md == ("# Report\n\nLet \\(f := g\\) and b =: a.\n\n"
                  "<table><tr><td>a</td><td>b|c</td></tr><tr><td>1</td><td>2</td></tr></table>")
    md = strip_grounding(RAW, images=True, image_path="images/3_{idx}.jpg", gfm_tables=True)
    assert md == ("# Report\n\n![](images/3_0.jpg)\n![](images/3_1.jpg)\n\nLet \\(f := g\\) and b =: a.\n\n"
                  "| a | b\\|c |\n| --- | --- |\n| 1 | 2 |")


def test_gfm_falls_back_on_spans_and_pads_short_rows():
    assert html_table_to_gfm('<table><tr><td colspan="2">a</td></tr><tr><td>1</td><td>2</td></tr></table>') is None
    assert html_table_to_gfm("no table") is None
    assert html_table_to_gfm("<table><tr><th><b>x</b>  y</th><td>z</td></tr><tr><td>1") == \
        "| <b>x</b> y | z |\n| --- | --- |\n| 1 |  |"


def test_draw_blocks_marks_boxes_only():
    img = Image.new("RGB", (200, 100), "white")
    blocks = [Block("title", ((0, 0, 499, 499),), "t"), Block("text", ((500, 500, 999, 999),), "x")]
    out = draw_blocks(img, blocks)
    assert out.size == img.size and out.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    # title outline is 4 px wide, text outline 2 px: compare 3 px inside the left edges, mid-height
    assert out.getpixel((3, 30)) != (255, 255, 255)            # title box x1 = 0
    assert out.getpixel((100 + 3, 80)) != out.getpixel((100 + 1, 80))  # text box x1 = int(500/999*200) = 100
    # the interior gets a translucent fill: alpha 20 moves white by at most 20 levels
    inner = out.getpixel((50, 30))
    assert inner != (255, 255, 255) and min(inner) >= 255 - 20
    # points are drawn too
    dots = draw_blocks(img, [Primitive("point", None, ((500, 500),))])
    assert dots.getpixel((100, 50)) != (255, 255, 255)
    with pytest.raises(ImageError):
        draw_blocks("not an image", blocks)


def test_crop_blocks_maps_each_figure_box():
    img = Image.new("RGB", (1000, 500))
    blocks = parse_grounding(RAW)
    crops = crop_blocks(img, blocks)
    # (0,0,499,499) -> (0,0,int(499/999*1000)=499,int(499/999*500)=249); second -> (500,250,1000,500)
    assert [c.size for c in crops] == [(499, 249), (500, 250)]
    # a zero-area box still yields a 1x1 crop so numbering stays aligned with strip_grounding's links
    assert [c.size for c in crop_blocks(img, [Block("image", ((999, 999, 999, 999),), "")])] == [(1, 1)]
