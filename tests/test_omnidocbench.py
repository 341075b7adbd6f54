"""OmniDocBench end-to-end scoring: exact scores on hand-made pages, on rendered pages, bad ground truth, CLI."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from optictx.errors import MetricError
from optictx.eval.omnidocbench import (
    min_cost_assignment, normalize_formula, normalize_text, pipe_table_to_html, score_omnidocbench,
    split_prediction,
)


# --------------------------------------------------------------------------- helpers
def det(category: str, order: int | None, anno_id: int, **content) -> dict:
    """One OmniDocBench layout element (poly is a dummy rectangle: end-to-end scoring does not read it)."""
    d = {"category_type": category, "poly": [0, 0, 10, 0, 10, 10, 0, 10], "ignore": False, "order": order,
         "anno_id": anno_id, "attribute": {}}
    d.update(content)
    return d


def page(image: str, dets: list[dict], relations: list[dict] | None = None) -> dict:
    return {"layout_dets": dets, "extra": {"relation": relations or []},
            "page_info": {"page_no": 0, "height": 100, "width": 100, "image_path": image, "page_attribute": {}}}


def write(tmp: Path, pages: list[dict], preds: dict[str, str]) -> tuple[Path, Path]:
    gt = tmp / "OmniDocBench.json"
    gt.write_text(json.dumps(pages, ensure_ascii=False), encoding="utf-8")
    pred_dir = tmp / "pred"
    pred_dir.mkdir(exist_ok=True)
    for name, md in preds.items():
        (pred_dir / name).write_text(md, encoding="utf-8")
    return pred_dir, gt


TABLE = "<table><tr><td>1</td><td>2</td></tr></table>"
GT_PAGE = page("docs/p1.jpg", [
    det("title", 0, 0, text="Intro"),
    det("text_block", 1, 1, text="The cat sat."),
    det("text_block", 2, 2, text="A dog ran."),
    det("equation_isolated", 3, 3, latex="x^2 + y^2"),
    det("table", 4, 4, html=TABLE),
    det("page_number", 5, 5, text="7"),
])


# --------------------------------------------------------------------------- exact scores, hand-made page
def test_reordered_and_misspelt_page_scores_exactly(tmp_path):
    md = "# Intro\n\nA dog ran.\n\nThe cat sad.\n\n$$x^2+y^2$$\n\n| 1 | 2 |\n|---|---|\n\n7\n"
    pred, gt = write(tmp_path, [GT_PAGE], {"p1.md": md})
    s = score_omnidocbench(pred, gt)
    # normalised text: Intro / Thecatsat vs Thecatsad (1 edit) / Adogran -> 1 edit in 5 + 9 + 7 characters
    assert s["text_block"]["edit"]["page_avg"] == pytest.approx(1 / 21)
    assert s["text_block"]["edit"]["whole"] == pytest.approx(1 / 21)
    assert s["text_block"]["edit"]["sample_avg"] == pytest.approx((1 / 9) / 3)
    assert s["text_block"]["edit"]["count"] == 3  # the page number was matched but is not scored
    assert s["display_formula"]["edit"]["page_avg"] == 0.0  # spaces do not count in formulas
    assert s["table"]["teds"] == 1.0 and s["table"]["teds_structure"] == 1.0  # pipe table == html table
    # gt order [0, 1, 2], read in prediction order [0, 2, 1]: two edits over three blocks
    assert s["reading_order"]["edit"]["page_avg"] == pytest.approx(2 / 3)
    assert s["pages"] == 1 and s["missing"] == []
    assert s["per_page"]["p1.jpg"]["reading_order_edit"] == pytest.approx(2 / 3)


def test_missing_blocks_cost_their_length(tmp_path):
    pred, gt = write(tmp_path, [GT_PAGE], {"p1.md": "# Intro\n\nThe cat sat.\n\n7"})
    s = score_omnidocbench(pred, gt)
    assert s["text_block"]["edit"]["page_avg"] == pytest.approx(7 / 21)  # only "Adogran" (7 chars) is lost
    assert s["display_formula"]["edit"]["page_avg"] == 1.0 and s["display_formula"]["edit"]["count"] == 1
    assert s["table"]["teds"] == 0.0 and s["table"]["teds_structure"] == 0.0 and s["table"]["count"] == 1
    assert s["reading_order"]["edit"]["page_avg"] == pytest.approx(1 / 3)  # [0, 1] against [0, 1, 2]


def test_extra_predicted_text_costs_nothing(tmp_path):
    md = f"# Intro\n\nThe cat sat.\n\nAn extra paragraph.\n\nA dog ran.\n\n$$x^2 + y^2$$\n\n{TABLE}"
    pred, gt = write(tmp_path, [GT_PAGE], {"p1.md": md})
    s = score_omnidocbench(pred, gt)
    assert s["text_block"]["edit"]["page_avg"] == 0.0 and s["reading_order"]["edit"]["page_avg"] == 0.0


def test_perfect_prediction_and_ignore_flag(tmp_path):
    dets = [dict(d) for d in GT_PAGE["layout_dets"]]
    dets.append(det("text_block", 6, 6, text="Watermark text", ignore=True))
    md = f"# Intro\n\nThe cat sat.\n\nA dog ran.\n\n\\[x^2 + y^2\\]\n\n{TABLE}\n\n7\n\nWatermark test"
    pred, gt = write(tmp_path, [page("p1.png", dets)], {"p1.md": md})
    s = score_omnidocbench(pred, gt)
    assert s["text_block"]["edit"] == {"page_avg": 0.0, "whole": 0.0, "sample_avg": 0.0, "count": 3}
    assert s["display_formula"]["edit"]["page_avg"] == 0.0
    assert s["table"]["teds"] == 1.0
    assert s["reading_order"]["edit"]["page_avg"] == 0.0


def test_truncated_blocks_are_joined_and_header_cells_equal_data_cells(tmp_path):
    dets = [det("text_block", 0, 10, text="Hello wor"), det("text_block", 1, 11, text="ld again"),
            det("table", 2, 12, html="<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>b</td></tr>"
                                     "</tbody></table>")]
    rel = [{"source_anno_id": 10, "target_anno_id": 11, "relation_type": "truncated"}]
    md = "Hello world again\n\n<table><tr><td>a</td></tr><tr><td>b</td></tr></table>"
    pred, gt = write(tmp_path, [page("x.jpg", dets, rel)], {"x.md": md})
    s = score_omnidocbench(pred, gt)
    assert s["text_block"]["edit"]["count"] == 1 and s["text_block"]["edit"]["page_avg"] == 0.0
    assert s["table"]["teds"] == 1.0


def test_unmatched_predicted_table_gives_its_cells_to_text(tmp_path):
    dets = [det("text_block", 0, 0, text="alpha beta"), det("text_block", 1, 1, text="gamma")]
    md = "<table><tr><td>alpha beta</td><td>gamma</td></tr></table>"
    pred, gt = write(tmp_path, [page("t.jpg", dets)], {"t.md": md})
    assert score_omnidocbench(pred, gt)["text_block"]["edit"]["page_avg"] == 0.0


def test_missing_predictions_are_skipped_or_scored_empty(tmp_path):
    pages = [GT_PAGE, page("docs/p2.jpg", [det("text_block", 0, 0, text="Only text")])]
    pred, gt = write(tmp_path, pages, {"p2.mmd": "Only text"})  # the nougat suffix is accepted
    s = score_omnidocbench(pred, gt)
    assert s["missing"] == ["p1.jpg"] and s["pages"] == 1 and s["text_block"]["edit"]["page_avg"] == 0.0
    s = score_omnidocbench(pred, gt, missing_as_empty=True)
    assert s["pages"] == 2 and s["missing"] == []
    assert s["text_block"]["edit"]["page_avg"] == pytest.approx(0.5)  # p1: everything lost, p2: perfect
    (pred / "p2.mmd").unlink()
    (pred / "p2.jpg.md").write_text("Only text", encoding="utf-8")  # the mineru naming
    assert score_omnidocbench(pred, gt)["pages"] == 1
    (pred / "p2.jpg.md").unlink()
    with pytest.raises(MetricError, match=r"none of the 2 ground-truth pages has a prediction.*p1\.md"):
        score_omnidocbench(pred, gt)


# --------------------------------------------------------------------------- rendered fixture
ROWS = [["Region", "Sales"], ["North", "120"], ["South", "95"]]
PAGES_MD = [
    "# Quarterly report\n\nSales rose in every region this quarter.\n\n"
    + "\n".join(["| Region | Sales |", "|---|---|", "| North | 120 |", "| South | 95 |"])
    + "\n\nCosts stayed flat, so margins improved.\n\n```python\ntotal = 120 + 95\n```\n",
    "## Outlook\n\nNext quarter should be similar.\n\nHiring continues.\n",
]
CATEGORY = {"title": "title", "text": "text_block", "code": "code_txt", "table": "table"}


def _gt_element(block, order: int) -> dict:
    """A rendered block as an OmniDocBench element: text without markdown syntax (as annotators write it),
    the table as HTML built from ROWS (independently of the scorer's pipe-table conversion)."""
    x1, y1, x2, y2 = block.box_px
    d = det(CATEGORY[block.label], order, order, poly=[x1, y1, x2, y1, x2, y2, x1, y2])
    if block.label == "table":
        d["html"] = "<table>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in ROWS) + \
            "</table>"
    elif block.label == "code":
        d["text"] = "\n".join(block.text.splitlines()[1:-1])
    else:
        d["text"] = block.text.lstrip("#").strip()
    return d


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Markdown pages rendered by ``render_markdown`` and written in the OmniDocBench format: each rendered
    block becomes an element with its box as ``poly`` and its index as ``order``; images saved alongside."""
    from optictx.render import PageStyle
    from optictx.render.markdown import render_markdown

    root = tmp_path_factory.mktemp("odb")
    (root / "images").mkdir()
    style = PageStyle(width=700, height=700, margin=30, font_size=16)
    pages, sources = [], {}
    for k, md in enumerate(PAGES_MD):
        (rp,) = render_markdown(md, style)
        name = f"render_{k}.png"
        rp.image.save(root / "images" / name)
        pages.append({"layout_dets": [_gt_element(b, i) for i, b in enumerate(rp.blocks)], "extra": {"relation": []},
                      "page_info": {"page_no": k, "width": style.width, "height": style.height,
                                    "image_path": f"images/{name}", "page_attribute": {"language": "english"}}})
        sources[name] = (rp.text, [b.text for b in rp.blocks])
    (root / "gt.json").write_text(json.dumps(pages), encoding="utf-8")
    return root, sources


def test_rendered_pages_score_perfect_then_swapped(rendered, tmp_path):
    root, sources = rendered
    assert [[e["category_type"] for e in p["layout_dets"]] for p in json.loads((root / "gt.json").read_text())] == [
        ["title", "text_block", "table", "text_block", "code_txt"], ["title", "text_block", "text_block"]]
    pred = tmp_path / "pred"
    pred.mkdir()
    for name, (page_md, _) in sources.items():  # the rendered page's own markdown: a perfect prediction
        (pred / name.replace(".png", ".md")).write_text(page_md, encoding="utf-8")
    s = score_omnidocbench(pred, root / "gt.json")
    assert s["pages"] == 2 and s["text_block"]["edit"]["count"] == 7  # titles, paragraphs and code
    assert s["text_block"]["edit"]["page_avg"] == 0.0 and s["reading_order"]["edit"]["page_avg"] == 0.0
    assert s["table"]["teds"] == 1.0 and s["table"]["teds_structure"] == 1.0 and s["table"]["count"] == 1
    assert s["display_formula"]["edit"]["count"] == 0 and s["display_formula"]["edit"]["page_avg"] is None
    # swap the two paragraphs of page 1: text unchanged; reading order [0, 2, 1] -> 2 edits / 3 on that page
    name1 = list(sources)[1]
    b = sources[name1][1]
    (pred / name1.replace(".png", ".md")).write_text("\n\n".join([b[0], b[2], b[1]]), encoding="utf-8")
    s = score_omnidocbench(pred, root / "gt.json")
    assert s["text_block"]["edit"]["page_avg"] == 0.0
    assert s["reading_order"]["edit"]["page_avg"] == pytest.approx((0 + 2 / 3) / 2)
    # drop the table from page 0: TEDS 0 for it, and its cells are not text the ground truth has elsewhere
    page0 = list(sources)[0]
    (pred / page0.replace(".png", ".md")).write_text(
        "\n\n".join(t for t in sources[page0][1] if not t.startswith("|")), encoding="utf-8")
    assert score_omnidocbench(pred, root / "gt.json")["table"]["teds"] == 0.0


# --------------------------------------------------------------------------- pieces
def test_split_prediction_kinds_and_positions():
    md = ("```markdown\n# Title\n\nBody text.\n\n$$a+b$$\n\n| h |\n|---|\n| v |\n\n"
          "```python\nx = 1\n```\n![fig](f.png)\n\n<table><tr><td>z</td></tr></table>\n```")
    blocks = split_prediction(md)
    assert [(b.kind, b.content) for b in blocks] == [
        ("text", "# Title"), ("text", "Body text."), ("formula", "$$a+b$$"),
        ("table", "<table><tr><td>h</td></tr><tr><td>v</td></tr></table>"), ("text", "x = 1"),
        ("table", "<table><tr><td>z</td></tr></table>")]
    # positions point at each block in the original markdown: they are the prediction's reading order
    assert [md[b.position:b.position + 5] for b in blocks] == ["# Tit", "Body ", "$$a+b", "| h |", "```py", "<tabl"]


def test_single_newline_pages_split_per_line():
    assert [b.content for b in split_prediction("one\ntwo\nthree")] == ["one", "two", "three"]
    assert [b.content for b in split_prediction("one\ntwo\n\nthree")] == ["one\ntwo", "three"]


def test_normalisers():
    assert normalize_text("# Hello, *world*!\n 3.5 _x_ 中文") == "Helloworld35_x_中文"
    assert normalize_formula(r"$$\mathbf{x} \tag{1} = \left( y \right).$$") == "{x}=(y)"
    assert normalize_formula(r"\[ \begin{aligned} A \end{aligned} \]") == "a"
    assert pipe_table_to_html("| a \\| b | c |\n|:--|--:|\n") == "<table><tr><td>a | b</td><td>c</td></tr></table>"


def test_assignment_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        cost = [[rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        pairs = min_cost_assignment(cost)
        assert len(pairs) == min(n, m)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        best = min(sum(cost[r][c] for r, c in zip(rows, cols))
                   for rows in itertools.permutations(range(n), min(n, m))
                   for cols in itertools.permutations(range(m), min(n, m)))
        assert sum(cost[r][c] for r, c in pairs) == pytest.approx(best)


# --------------------------------------------------------------------------- bad inputs and the CLI
@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid utf-8 json"),
    ("{}", "non-empty json list of pages"),
    ("[]", "non-empty json list of pages"),
    ('[{"layout_dets": []}]', "page 0 has no page_info.image_path"),
    ('[{"page_info": {"image_path": "a.jpg"}, "layout_dets": {}}]', "layout_dets must be a list"),
    ('[{"page_info": {"image_path": "a.jpg"}, "layout_dets": [{"text": "x"}]}]', "category_type"),
    ('[{"page_info": {"image_path": "a/p.jpg"}, "layout_dets": []},'
     ' {"page_info": {"image_path": "b/p.jpg"}, "layout_dets": []}]', "appears twice"),
])
def test_bad_ground_truth_is_a_metric_error(tmp_path, content, words):
    gt = tmp_path / "gt.json"
    gt.write_text(content, encoding="utf-8")
    (tmp_path / "pred").mkdir()
    with pytest.raises(MetricError) as e:
        score_omnidocbench(tmp_path / "pred", gt)
    assert words in str(e.value).lower()


def test_missing_paths_are_metric_errors(tmp_path):
    pred, gt = write(tmp_path, [GT_PAGE], {})
    with pytest.raises(MetricError, match="no predictions folder"):
        score_omnidocbench(tmp_path / "nope", gt)
    with pytest.raises(MetricError, match="no OmniDocBench ground-truth file"):
        score_omnidocbench(pred, tmp_path / "nope.json")


def test_cli_prints_and_writes_the_same_scores(tmp_path, capsys):
    from optictx.cli import main

    pred, gt = write(tmp_path, [GT_PAGE], {"p1.md": "# Intro\n\nA dog ran.\n\nThe cat sad.\n\n$$x^2+y^2$$"})
    out = tmp_path / "res" / "scores.json"
    assert main(["eval", "omnidocbench", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TEDS" in printed and "reading order" in printed
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(score_omnidocbench(pred, gt)))
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]  # no temp file left behind
    assert main(["eval", "omnidocbench", "--pred", str(tmp_path / "none"), "--gt", str(gt)]) == 2
    assert "no predictions folder" in capsys.readouterr().err
