"""Data engine: documents with grounding targets, OCR 2.0 tasks, PDF pairs, the sharded dataset and the CLI."""
from __future__ import annotations

import ast
import io
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from optictx.budget import ocr_budget, text_tokens
from optictx.data import documents, ocr2
from optictx.data.dataset import OCRDataset, generate, shard_indices
from optictx.errors import ConfigError, PDFError
from optictx.primitives import find_tables, html_table_to_gfm, parse_grounding, parse_html, table_rows
from optictx.render import from_999


def same(a, b) -> bool:
    return a.target == b.target and a.image.size == b.image.size and a.image.tobytes() == b.image.tobytes()


# --------------------------------------------------------------------------- documents
@pytest.mark.parametrize("layout", documents.LAYOUTS)
def test_document_grounding_boxes_cover_the_ink_and_content_equals_text(layout):
    cfg = documents.with_layout(documents.DocConfig(targets=(("grounding", 1.0),)), layout)
    s = documents.document_sample(3, 1, "tiny", cfg)
    w, h = s.image.size
    blocks = parse_grounding(s.target)
    assert blocks and s.target.count("<|ref|>") == len(blocks)
    assert [b.content for b in blocks] == s.text.split("\n\n")  # the target is the text plus boxes
    assert {b.label for b in blocks} <= {"title", "text", "table", "code"}
    covered = np.zeros((h, w), bool)
    ink = np.asarray(s.image.convert("L")) < 160
    for b in blocks:
        (box,) = b.boxes_999
        x1, y1, x2, y2 = from_999(box, w, h)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert ink[y1:y2, x1:x2].any(), f"empty box {box} for {b.label}"
        covered[max(0, y1 - 2):y2 + 3, max(0, x1 - 2):x2 + 3] = True
    assert not (ink & ~covered).any()  # every dark pixel lies in some block's box
    if layout == "columns":
        assert blocks[0].label == "title" and blocks[0].content.startswith("# ")
        assert s.meta["columns"] >= 2


def test_markdown_tables_are_html_in_grounding_targets():
    cfg = documents.with_layout(documents.DocConfig(targets=(("grounding", 1.0),)), "markdown")
    tables = []
    for i in range(12):
        target = documents.document_sample(0, i, "tiny", cfg).target
        tables += [b for b in parse_grounding(target) if b.label == "table"]
    assert tables, "no table in 12 markdown pages"
    for b in tables:
        rows = table_rows(find_tables(parse_html(b.content))[0])
        assert rows and len({len(r) for r in rows}) == 1  # one row when only the header fits at the page foot
        assert all(re.fullmatch(r"\|.*\|", line) for line in html_table_to_gfm(b.content).splitlines())


def test_document_is_deterministic_per_seed_and_index():
    a = documents.document_sample(7, 5)
    assert same(a, documents.document_sample(7, 5))
    assert a.text != documents.document_sample(7, 6).text
    assert a.text != documents.document_sample(8, 5).text


def test_faker_locale_text_is_marked_and_non_ascii():
    cfg = documents.with_layout(documents.DocConfig(p_locale=1.0, locales=("ru_RU",)), "plain")
    s = documents.document_sample(0, 0, "tiny", cfg)
    assert s.meta["text_source"] == "faker:ru_RU" and s.meta["non_ascii"]
    assert re.search("[а-яА-Я]", s.text)
    corpus = documents.document_sample(0, 0, "tiny", documents.DocConfig(p_locale=0.0))
    assert corpus.meta["text_source"] == "corpus"


def test_documents_never_use_heldout_text():
    from optictx.data.corpus import heldout_paragraphs

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.split()
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    held = set().union(*(shingles(p) for p in heldout_paragraphs()))
    for i in range(4):
        s = documents.document_sample(1, i, "tiny", documents.with_layout(documents.DocConfig(p_locale=0), "plain"))
        assert not shingles(s.text) & held


def test_caps_source_is_prose_in_capitals():
    from optictx.data.corpus import TextSampler

    text = " ".join(TextSampler(5, {"caps": 1.0}).sample(300) for _ in range(10))
    letters = [c for c in text if c.isalpha()]
    assert len(letters) > 1000 and all(c.isupper() for c in letters)
    vocab = {w.lower() for w in " ".join(TextSampler(5).prose).split()}
    assert sum(w.lower() in vocab for w in text.split()[:50]) > 25  # real prose words


def test_numbers_source_is_digit_rich_deterministic_and_mixable():
    from optictx.data.corpus import TextSampler
    from optictx.data.ocr_pages import OCRPageSource, Level

    text = " ".join(TextSampler(3, {"numbers": 1.0}).sample(400) for _ in range(20))
    default = " ".join(TextSampler(3).sample(400) for _ in range(20))
    digits = lambda t: sum(c.isdigit() for c in t) / len(t)
    assert digits(text) > 0.12 > digits(default)
    assert re.search(r"\b\d{1,2}[A-Z]\b", text) and re.search(r"\b[a-z]+\d+\b", text)  # 14A, cedar42
    assert TextSampler(3, {"numbers": 1.0}).sample(300) == TextSampler(3, {"numbers": 1.0}).sample(300)
    mixed = OCRPageSource(0, text_weights={"prose": 0.5, "numbers": 0.5})
    assert mixed.page(7, Level(8)).text == OCRPageSource(0, text_weights={"prose": 0.5, "numbers": 0.5}).page(7, Level(8)).text
    with pytest.raises(ConfigError, match="unknown text sources"):
        TextSampler(0, {"poetry": 1.0})


def test_bad_document_config_is_refused():
    with pytest.raises(ConfigError):
        documents.DocConfig(layouts=(("poster", 1.0),))
    with pytest.raises(ConfigError):
        documents.DocConfig(table_format="latex")


# --------------------------------------------------------------------------- OCR 2.0
def test_chart_target_is_the_html_table_of_the_plotted_data():
    kinds = set()
    for i in range(4):
        image, rows, meta = ocr2.chart(0, i)
        kinds.add(meta["kind"])
        s = ocr2.chart_sample(0, i)
        got = [["".join(c for c in cell.children if isinstance(c, str)) for cell in row]
               for row in table_rows(find_tables(parse_html(s.target))[0])]
        assert got == rows
        assert len({len(r) for r in rows}) == 1 and len(rows) == meta["points"] + 1
        assert len(rows[0]) == meta["series"] + 1
        values = [float(v) for r in rows[1:] for v in r[1:]]
        if meta["kind"] == "pie":
            assert sum(values) == 100
        assert np.asarray(image).std() > 10  # something is drawn
    assert kinds == {"bar", "pie"}
    assert same(ocr2.chart_sample(2, 3), ocr2.chart_sample(2, 3))


def test_formula_targets_are_delimited_balanced_and_cover_the_grammar():
    seen = set()
    for i in range(60):
        latex = ocr2.FormulaWriter(np.random.default_rng([0, i]), 2).formula()
        assert latex.count("{") == latex.count("}") and latex.count("\\left(") == latex.count("\\right)")
        seen |= {k for k in ("\\frac", "^{", "_{", "\\sum", "\\int", "\\sqrt", "\\alpha|\\beta|\\pi")
                 if re.search(k.replace("\\", "\\\\").replace("^", "\\^"), latex)}
    assert seen == {"\\frac", "^{", "_{", "\\sum", "\\int", "\\sqrt", "\\alpha|\\beta|\\pi"}
    s = ocr2.formula_sample(0, 4)
    assert s.target.startswith("\\(") and s.target.endswith("\\)")
    assert np.asarray(s.image.convert("L")).min() < 100
    assert same(s, ocr2.formula_sample(0, 4))


def test_chemistry_target_is_canonical_smiles():
    Chem = pytest.importorskip("rdkit.Chem")
    sources = set()
    for i in range(10):
        s = ocr2.chemistry_sample(0, i)
        mol = Chem.MolFromSmiles(s.target)
        assert mol is not None and Chem.MolToSmiles(mol) == s.target
        assert np.asarray(s.image.convert("L")).min() < 100
        sources.add(s.meta["source"])
    assert sources == {"known", "grammar"}
    assert same(ocr2.chemistry_sample(1, 2), ocr2.chemistry_sample(1, 2))


def test_chemistry_without_rdkit_raises_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)
    with pytest.raises(ConfigError, match="pip install"):
        ocr2.chemistry(0, 0)


def test_geometry_target_is_the_official_dict_and_matches_the_drawing():
    for i in range(5):
        s = ocr2.geometry_sample(0, i)
        d = ast.literal_eval(s.target)
        lines = d["Line"]
        assert len(lines["line"]) == len(lines["line_type"]) and set(lines["line_type"]) <= {"-", "--"}
        named = {ast.literal_eval(e.split(": ")[1]): e.split(": ")[0] for e in lines["line_endpoint"]}
        for seg in lines["line"]:  # parsed exactly as the official runner does
            p0, p1 = (ast.literal_eval(p) for p in seg.split(" -- "))
            assert p0 in named and p1 in named
        gray = np.asarray(s.image.convert("L"))
        size = s.image.width
        for x, y in named:  # a dot is drawn at every named point (plot spans -15..15)
            px, py = round((x + 15) / 30 * size), round((15 - y) / 30 * size)
            assert gray[py - 2:py + 3, px - 2:px + 3].min() < 100
        for center, r in zip(d.get("Circle", {}).get("circle_center", []), d.get("Circle", {}).get("radius", [])):
            cx, cy = ast.literal_eval(center.split(": ")[1])
            assert isinstance(r, int) and max(abs(cx), abs(cy)) + r <= 15  # the circle stays in the plot
    assert same(ocr2.geometry_sample(5, 1), ocr2.geometry_sample(5, 1))


# --------------------------------------------------------------------------- token accounting
def test_every_sample_records_its_text_and_vision_tokens():
    for task in ("formula", "geometry", "document"):
        for mode, vision in (("tiny", 64), ("small", 100)):
            s = generate(task, 0, 2, mode)
            assert s.text_tokens == text_tokens(s.text) > 0
            assert s.vision_tokens == vision == ocr_budget(*s.image.size, mode).vision_tokens
            assert s.compression == pytest.approx(s.text_tokens / vision)
    big = generate("document", 0, 2, "gundam")
    assert big.vision_tokens == ocr_budget(*big.image.size, "gundam").vision_tokens


# --------------------------------------------------------------------------- PDF pairs
LINES = [["Invoice 2024-117 for Acme Corp.", "Total due: 1,250.00 EUR"], ["Second page, first line.", "Done."]]


def _pdf(pages: list[list[str]]) -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=(400, 300))
    for lines in pages:
        for k, line in enumerate(lines):
            c.drawString(40, 250 - 30 * k, line)
        c.showPage()
    c.save()
    return buf.getvalue()


def test_pdf_pairs_text_equals_what_was_written_with_boxes_in_reading_order(tmp_path):
    from optictx.data.pdf_pairs import pdf_pairs

    path = tmp_path / "doc.pdf"
    path.write_bytes(_pdf(LINES))
    pairs = list(pdf_pairs(path, dpi=144))
    assert [p.text for p in pairs] == ["\n".join(lines) for lines in LINES]
    for p in pairs:
        assert p.image.size == (800, 600)
        tops = [line.box_px[1] for line in p.lines]
        assert tops == sorted(tops)
        for line in p.lines:
            x1, y1, x2, y2 = line.box_px
            assert 0 <= x1 < x2 <= 800 and 0 <= y1 < y2 <= 600
            assert abs(x1 - 80) <= 2  # drawn at x = 40 pt = 80 px
            assert (np.asarray(p.image.convert("L").crop(line.box_px)) < 128).any()


def test_export_pdfs_records_bad_files_and_resumes(tmp_path):
    from optictx.data.pdf_pairs import PdfPairStore, export_pdfs

    src, out = tmp_path / "pdfs", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.pdf").write_bytes(_pdf(LINES))
    (src / "sub" / "b.pdf").write_bytes(_pdf([["Only page of b."], []]))  # page 2 has no text layer
    (src / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    report = export_pdfs(src, out, dpi=72, mode="small", progress=False)
    assert report.written == 3 and report.skipped == 0
    assert sorted((f["pdf"], f["page"]) for f in report.failures) == [("broken.pdf", None), ("sub/b.pdf", 1)]
    records = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(r["pdf"], r["page"], r["text"]) for r in records] == [
        ("a.pdf", 0, "\n".join(LINES[0])), ("a.pdf", 1, "\n".join(LINES[1])), ("sub/b.pdf", 0, "Only page of b.")]
    for r in records:
        assert Image.open(out / r["image"]).size == (r["width"], r["height"]) == (400, 300)
        assert r["vision_tokens"] == 100 and r["text_tokens"] == text_tokens(r["text"])
    # a crash after a.pdf page 1's PNG but mid-way through its JSON line: the rerun redoes exactly that page
    lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text(lines[0] + lines[2] + lines[1][:25])
    again = export_pdfs(src, out, dpi=72, mode="small", progress=False)
    assert (again.written, again.skipped, again.failures) == (1, 2, [])
    records2 = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records2) == sorted(r["id"] for r in records)
    store = PdfPairStore(out)
    s = OCRDataset("pdf", seed=0, pdf_dir=str(out), mode="small").sample(0)
    assert s.task == "pdf" and s.text in {r["text"] for r in records} and len(store) == 3


def test_export_pdfs_refuses_a_folder_without_pdfs(tmp_path):
    from optictx.data.pdf_pairs import export_pdfs

    with pytest.raises(PDFError, match="no .pdf"):
        export_pdfs(tmp_path, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- dataset
def test_shards_are_disjoint_and_cover_every_index():
    shards = [list(shard_indices(10, 50, rank, 2, worker, 2)) for rank in range(2) for worker in range(2)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(10, 50)) and len(set(flat)) == len(flat)
    assert shards[0][:3] == [10, 14, 18] and shards[1][:3] == [12, 16, 20]  # rank 0: workers 0 and 1


def test_dataloader_workers_render_disjoint_shards_deterministically_and_resume():
    from torch.utils.data import DataLoader

    from optictx.data.dataset import collate_samples

    mix = {"geometry": 1, "formula": 1, "document": 1}
    ds = OCRDataset(mix, seed=0, stop=8)
    got = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert [s.index for s in got] == list(range(8))  # two workers, disjoint halves, returned in index order
    direct = [ds.sample(i) for i in range(8)]
    assert all(same(a, b) for a, b in zip(got, direct))  # rendered in worker processes == rendered here
    assert {s.task for s in got} == set(mix)
    resumed = list(OCRDataset(mix, seed=0, start=5, stop=8))
    assert len(resumed) == 3 and all(same(a, b) for a, b in zip(resumed, direct[5:]))
    ranks = [[s.index for s in OCRDataset("formula", seed=3, stop=6, rank=r, world_size=2)] for r in range(2)]
    assert ranks == [[0, 2, 4], [1, 3, 5]]
    batch = next(iter(DataLoader(OCRDataset("formula", stop=8), batch_size=3, collate_fn=collate_samples)))
    assert [s.index for s in batch] == [0, 1, 2]


def test_dataset_refuses_unknown_tasks_and_pdf_without_folder():
    with pytest.raises(ConfigError, match="unknown task"):
        OCRDataset("tables")
    with pytest.raises(ConfigError, match="pdf_dir"):
        OCRDataset("pdf")
    with pytest.raises(ConfigError):
        OCRDataset("chart", mode="huge")


# --------------------------------------------------------------------------- CLI
def _data_cli(argv: list[str]) -> int:
    """Run `optictx data ...` through its own parser (the dispatcher imports every other command too)."""
    import argparse

    from optictx.commands import data

    parser = argparse.ArgumentParser(prog="optictx")
    data.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_sample_and_pdf(tmp_path, capsys):
    argv = ["data", "sample", "--task", "geometry", "--n", "2", "--start", "4", "--out", str(tmp_path / "s")]
    assert _data_cli(argv) == 0
    records = [json.loads(x) for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [4, 5]
    assert records[0]["target"] == ocr2.geometry_sample(0, 4).target
    assert Image.open(tmp_path / "s" / records[1]["image"]).size == (records[1]["width"], records[1]["height"])
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "a.pdf").write_bytes(_pdf(LINES[:1]))
    assert _data_cli(["data", "pdf", str(tmp_path / "pdfs"), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "wrote 1 page(s), 0 already done, 0 failure(s)" in capsys.readouterr().out
    assert _data_cli(["data", "pdf", str(tmp_path / "pdfs"), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "wrote 0 page(s), 1 already done" in capsys.readouterr().out
    with pytest.raises(PDFError, match="not a folder"):
        _data_cli(["data", "pdf", str(tmp_path / "nothing"), "--out", str(tmp_path / "p")])
