"""Real documents as training data: born-digital PDF pages -> (page image, text in reading order with line
boxes) from the PDF's own text layer (pypdfium2), so users can train on their PDFs.

``export_pdfs(src_dir, out_dir)`` (``optictx data pdf DIR --out DIR``) writes, per page,
``images/<doc>/p0001.png`` and one JSON line in ``pairs.jsonl``::

    {"id", "pdf", "page", "image", "width", "height", "dpi", "text", "lines": [{"text", "box_px", "box_999"}],
     "text_tokens", "vision_tokens", "mode"}

Resumable: a page is done once its line is in ``pairs.jsonl`` (the PNG is written first, atomically), so a
rerun after a crash or Ctrl-C skips finished pages and repairs a half-written last line. A PDF that cannot be
read (corrupt, encrypted, empty) or a page without a text layer (a scan) is recorded in ``failures.jsonl``
with the reason and skipped; nothing already written is lost.

Text order is pdfium's: the content-stream order with its generated line breaks, which is reading order for
the PDFs that word processors and LaTeX write.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from optictx.budget import ocr_budget, text_tokens
from optictx.data.dataset import OCRSample, make_sample, sample_rng
from optictx.errors import PDFError
from optictx.prompts import PROMPTS
from optictx.render.page import TextBox

PAIRS, FAILURES, IMAGES = "pairs.jsonl", "failures.jsonl", "images"


@dataclass
class PdfPair:
    """One page: its image at ``dpi`` and its text-layer lines (boxes in px of that image and 0-999)."""

    pdf: str
    page: int  # 0-based
    image: Image.Image
    lines: list[TextBox]
    dpi: float

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)


def pdf_pairs(src: str | os.PathLike | bytes, dpi: float = 144, first: int = 0, last: int | None = None, *,
              password: str | None = None) -> Iterator[PdfPair]:
    """Pages ``first .. last-1`` of a PDF as (image, text lines) pairs, one page in memory at a time.

    Raises PDFError for a PDF that cannot be read (see :mod:`optictx.render.pdf`).
    """
    from optictx.render import iter_pdf_pages, pdf_text_layer

    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    for i, image in enumerate(iter_pdf_pages(src, dpi, first, last, password=password), start=first):
        yield PdfPair(name, i, image, pdf_text_layer(src, i, dpi, password=password), dpi)


def doc_id(rel: str) -> str:
    """A folder name for a PDF: its relative path made safe, plus a short hash so a/b.pdf != a_b.pdf."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.removesuffix(".pdf").removesuffix(".PDF"))[-80:]
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def _box(tb: TextBox) -> dict[str, Any]:
    return {"text": tb.text, "box_px": list(tb.box_px), "box_999": list(tb.box_999)}


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (killed mid-write) is cut off so appends stay valid."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)  # a crash leaves either no file or a whole one


@dataclass
class ExportReport:
    written: int = 0
    skipped: int = 0  # pages done by an earlier run
    failures: list[dict] = field(default_factory=list)  # this run's failures


def _page_record(pair: PdfPair, rel: str, image_rel: str, mode: str) -> dict[str, Any]:
    w, h = pair.image.size
    return {"id": image_rel.removeprefix(IMAGES + "/").removesuffix(".png"), "pdf": rel, "page": pair.page,
            "image": image_rel, "width": w, "height": h, "dpi": pair.dpi, "text": pair.text,
            "lines": [_box(line) for line in pair.lines], "text_tokens": text_tokens(pair.text),
            "vision_tokens": ocr_budget(w, h, mode).vision_tokens, "mode": mode}


def export_pdfs(src_dir: str | os.PathLike, out_dir: str | os.PathLike, dpi: float = 144, mode: str = "gundam",
                progress: bool = True) -> ExportReport:
    """Every ``*.pdf`` under ``src_dir`` (recursively, sorted) -> PNG + JSONL pairs under ``out_dir``."""
    from tqdm import tqdm

    from optictx.render import pdf_page_count

    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise PDFError(f"{src}: not a folder; pass the folder that holds your PDFs")
    ocr_budget(64, 64, mode)  # an unknown mode fails before any work
    pdfs = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")
    if not pdfs:
        raise PDFError(f"{src}: no .pdf files found")
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["pdf"], r["page"]) for r in _read_jsonl(out / PAIRS)}
    failed = {(r["pdf"], r["page"]) for r in _read_jsonl(out / FAILURES)}
    report = ExportReport()

    def fail(rel: str, page: int | None, err: Exception | str) -> None:
        record = {"pdf": rel, "page": page, "error": str(err)}
        _append(out / FAILURES, record)
        report.failures.append(record)

    for path in tqdm(pdfs, desc="pdf", unit="file", disable=not progress):
        rel = path.relative_to(src).as_posix()
        if (rel, None) in failed:
            continue
        try:
            n = pdf_page_count(path)
        except PDFError as e:
            fail(rel, None, e)
            continue
        for page in range(n):
            if (rel, page) in done or (rel, page) in failed:
                report.skipped += (rel, page) in done
                continue
            try:
                (pair,) = pdf_pairs(path, dpi, page, page + 1)  # consume it: the document closes
            except PDFError as e:
                fail(rel, page, e)
                continue
            if not pair.lines:
                fail(rel, page, "no text layer on this page (a scan or a drawing); OCR it instead")
                continue
            image_rel = f"{IMAGES}/{doc_id(rel)}/p{page + 1:04d}.png"
            _save_png(pair.image, out / image_rel)
            _append(out / PAIRS, _page_record(pair, rel, image_rel, mode))
            report.written += 1
    return report


class PdfPairStore:
    """Exported pairs as a source of :class:`OCRSample` (task ``"pdf"``): index -> a record drawn from
    (seed, index), its PNG as the image and the page text as a "Free OCR." target."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir)
        self.records = _read_jsonl(self.root / PAIRS) if (self.root / PAIRS).exists() else []
        if not self.records:
            raise PDFError(f"{self.root}: no {PAIRS} with pages; run `optictx data pdf DIR --out {self.root}` first")

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, seed: int, index: int, mode: str = "tiny") -> OCRSample:
        rec = self.records[int(sample_rng(seed, index, "pdf").integers(len(self.records)))]
        with Image.open(self.root / rec["image"]) as im:
            image = im.convert("RGB")
        meta = {"pdf": rec["pdf"], "page": rec["page"], "id": rec["id"]}
        return make_sample("pdf", image, PROMPTS["free-ocr"], rec["text"], rec["text"], seed, index, mode, meta)
