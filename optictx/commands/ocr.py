"""`optictx ocr INPUT... --out DIR`: images, PDFs and folders to markdown + one JSONL record per page.

    optictx ocr scan.png paper.pdf scans/ --out results/          # bundled tiny model
    optictx ocr paper.pdf --out results/ --model deepseek-ai/DeepSeek-OCR --mode gundam --annotate
    optictx ocr scans/ --out results/ --resume                    # after a crash: only the missing pages

Per document ``<name>``: ``<name>.jsonl`` (one line per page: ``{doc, page, ok, markdown, text, raw, blocks,
tokens, timings}`` or ``{doc, page, ok: false, error: {type, message}}``), ``<name>.md`` (pages joined with
the official ``<--- Page Split --->``), figure crops in ``<name>_images/`` and, with ``--annotate``, boxed pages
in ``<name>_annotated/``.

Crash safety: each page's line is appended with one write and fsync'ed before the next page starts; the
markdown is rebuilt from the JSONL into a temp file that replaces the old one. A SIGKILL can at worst leave
a half line at the end of the JSONL, which ``--resume`` drops (it keeps each successful page once and
retries failed ones). Memory stays at one page: PDFs are rendered page by page and nothing is accumulated.
Exit code: 0 every page ok, 1 some page failed, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from optictx.errors import ConfigError
from optictx.fileio import atomic_write
from optictx.prompts import PAGE_SPLIT

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
PDF_EXTS = {".pdf"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ocr",
        help="OCR images, PDFs and folders to markdown + JSONL (resumable)",
        description="OCR images, PDFs (rendered at --dpi) and folders (recursive, sorted). Writes per document "
                    "a markdown file and one JSONL record per page; a bad page is recorded and the run goes on. "
                    "Exit code 0: all pages ok, 1: some failed, 2: usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, PDF files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", default="tiny", help="'tiny' (bundled), a model folder or a hub id (default: tiny)")
    p.add_argument("--mode", default=None, help="resolution mode (default: the model's own: nano / gundam)")
    p.add_argument("--prompt", default=None,
                   help="markdown, ocr, free-ocr, figure, describe, or raw text with <image> (default: model's)")
    p.add_argument("--dpi", type=float, default=144, help="PDF rendering resolution (default 144, as official)")
    p.add_argument("--resume", action="store_true", help="keep pages already done in DIR and do the rest")
    p.add_argument("--annotate", action="store_true", help="also save each page with its boxes drawn")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens per page")
    p.add_argument("--ngram-size", type=int, default=30, help="windowed no-repeat n-gram size (0 = off)")
    p.add_argument("--window-size", type=int, default=90, help="window of the n-gram guard")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where native, else fp32), bf16, fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- documents
@dataclass
class Document:
    path: Path
    name: str  # output stem relative to --out (folders keep their sub-folders)
    is_pdf: bool
    pages: int = 1
    open_error: Exception | None = None  # a PDF that cannot be opened at all
    done: set[int] = field(default_factory=set)


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "pdf" if ext in PDF_EXTS else "image" if ext in IMAGE_EXTS else None


def discover(inputs: list[str]) -> list[Document]:
    """Files in argument order; folders recursively in sorted order (only image/PDF extensions)."""
    docs, taken = [], set()
    for arg in inputs:
        root = Path(arg)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and _kind(p))
            pairs = [(p, str(p.relative_to(root).with_suffix(""))) for p in files]
        elif root.is_file():
            pairs = [(root, root.stem)]
        else:
            raise ConfigError(f"input {arg!r} does not exist")
        for path, name in pairs:
            unique, k = name, 2
            while unique in taken:  # a.png and a.pdf, or the same stem in two inputs
                unique, k = f"{name}-{k}", k + 1
            taken.add(unique)
            docs.append(Document(path, unique, _kind(path) == "pdf"))
    if not docs:
        raise ConfigError(f"no images or PDFs found in {', '.join(inputs)} (extensions: "
                          f"{', '.join(sorted(IMAGE_EXTS | PDF_EXTS))})")
    return docs


# --------------------------------------------------------------------------- crash-safe files
def append_record(path: Path, record: dict) -> None:
    """One JSON line in one ``write`` on an O_APPEND descriptor, fsync'ed before returning."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> Iterator[tuple[int, bytes, dict]]:
    """(byte offset, raw line, record) of every complete, parseable line; a torn last line is skipped."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        offset = 0
        for raw in f:
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                break  # the write was cut by a crash
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("page"), int):
                yield start, raw, rec


def prepare_jsonl(path: Path, resume: bool) -> set[int]:
    """Without --resume: start empty. With it: keep the first ok record of each page (dropping failed and torn
    lines, so failed pages are retried and no page appears twice) and return those pages."""
    if not resume:
        atomic_write(path, b"")
        return set()
    keep, done = [], set()
    for _, raw, rec in read_records(path):
        if rec.get("ok") is True and rec["page"] not in done:
            done.add(rec["page"])
            keep.append(raw)
    atomic_write(path, iter(keep))
    return done


def rebuild_markdown(jsonl: Path, md: Path, pages: int) -> None:
    """``<name>.md`` from the JSONL in page order (one page's text in memory at a time)."""
    offsets = {}
    for off, _, rec in read_records(jsonl):
        offsets.setdefault(rec["page"], off)

    def chunks() -> Iterator[bytes]:
        with open(jsonl, "rb") as f:
            for page in range(1, pages + 1):
                if page > 1:
                    yield PAGE_SPLIT.encode("utf-8")
                if page not in offsets:
                    yield f"<!-- page {page}: not processed -->".encode("utf-8")
                    continue
                f.seek(offsets[page])
                rec = json.loads(f.readline())
                if rec.get("ok"):
                    yield rec.get("markdown", "").encode("utf-8")
                else:
                    err = rec.get("error", {})
                    yield f"<!-- page {page} failed: {err.get('type')}: {err.get('message')} -->".encode("utf-8")
            yield b"\n"

    atomic_write(md, chunks())


# --------------------------------------------------------------------------- pages
def _pages(doc: Document, todo: list[int], dpi: float) -> Iterator[tuple[int, object]]:
    """(page number, PIL image or the exception that stopped it) for each page to do, one at a time."""
    from optictx.preprocess import load_image
    from optictx.render.pdf import iter_pdf_pages

    for page in todo:
        try:
            if doc.is_pdf:  # reopen per page: a broken page cannot end the document's iterator
                image = next(iter_pdf_pages(doc.path, dpi, page - 1, page))
            else:
                image = load_image(doc.path)
        except Exception as e:  # noqa: BLE001 - recorded per page, the run goes on
            yield page, e
            continue
        yield page, image


def _save_image(image, target: Path) -> None:
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    atomic_write(target, buf.getvalue())


def ocr_page(ocr, doc: Document, page: int, image, out: Path, annotate: bool) -> dict:
    """OCR one page and write its crops (and annotated page); returns its JSONL record."""
    from optictx.primitives import strip_grounding

    result = ocr(image, page=page if doc.is_pdf else None)
    stem = Path(doc.name).name
    img_dir = f"{stem}_images"
    markdown = strip_grounding(result.raw, images=True, image_path=f"{img_dir}/{page}_{{idx}}.jpg")
    for idx, crop in enumerate(result.crops()):
        _save_image(crop, out / Path(doc.name).parent / img_dir / f"{page}_{idx}.jpg")
    if annotate:
        _save_image(result.annotated(), out / f"{doc.name}_annotated" / f"page-{page:04d}.jpg")
    fields = {k: v for k, v in result.to_dict().items() if k not in ("page", "source")}
    return {"doc": str(doc.path), "page": page, "ok": True} | fields | {"markdown": markdown}


def error_record(doc: Document, page: int, e: BaseException) -> dict:
    return {"doc": str(doc.path), "page": page, "ok": False,
            "error": {"type": type(e).__name__, "message": str(e)}}


# --------------------------------------------------------------------------- run
def plan(docs: list[Document], out: Path, resume: bool) -> None:
    """Count pages (PDFs are opened, not rendered) and read what a previous run finished."""
    from optictx.render.pdf import pdf_page_count

    for doc in docs:
        if doc.is_pdf:
            try:
                doc.pages = pdf_page_count(doc.path)
            except Exception as e:  # noqa: BLE001 - a corrupt PDF is one failed page, not a crash
                doc.pages, doc.open_error = 1, e
        jsonl = out / f"{doc.name}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        doc.done = {p for p in prepare_jsonl(jsonl, resume) if 1 <= p <= doc.pages}


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} pages/s" if speed else "-- pages/s", style="progress.data.speed")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[failed]} failed"),
                    console=Console(stderr=True), disable=quiet, transient=False)


def _check_choices(args: argparse.Namespace) -> None:
    """Reject a bad --mode or --prompt before spending seconds loading the model."""
    from optictx.budget import get_mode
    from optictx.prompts import prompt_text

    if args.mode is not None:
        get_mode(args.mode)
    if args.prompt is not None:
        prompt_text(args.prompt)


def run(args: argparse.Namespace) -> int:
    from optictx.ocr import OCR

    if args.dpi <= 0 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ConfigError("--dpi and --max-new-tokens must be positive")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    docs = discover(args.inputs)
    _check_choices(args)
    out.mkdir(parents=True, exist_ok=True)
    ocr = OCR(args.model, mode=args.mode, prompt=args.prompt, device=args.device, dtype=args.dtype,
              max_new_tokens=args.max_new_tokens, ngram_size=args.ngram_size, window_size=args.window_size)
    plan(docs, out, args.resume)
    total = sum(d.pages for d in docs)
    skipped = sum(len(d.done) for d in docs)
    failed = ok = 0
    t0 = time.perf_counter()
    with _progress(args.quiet) as progress:
        task = progress.add_task("ocr", total=total, completed=skipped, failed=0)
        for doc in docs:
            progress.update(task, description=doc.name)
            jsonl = out / f"{doc.name}.jsonl"
            todo = [p for p in range(1, doc.pages + 1) if p not in doc.done]
            if doc.open_error is not None:
                items: Iterator = iter([(1, doc.open_error)])
            else:
                items = _pages(doc, todo, args.dpi)
            for page, image in items:
                if isinstance(image, BaseException):
                    record = error_record(doc, page, image)
                else:
                    try:
                        record = ocr_page(ocr, doc, page, image, out, args.annotate)
                    except Exception as e:  # noqa: BLE001 - recorded; the next page still runs
                        record = error_record(doc, page, e)
                    del image
                append_record(jsonl, record)
                ok, failed = ok + record["ok"], failed + (not record["ok"])
                progress.update(task, advance=1, failed=failed)
            rebuild_markdown(jsonl, out / f"{doc.name}.md", doc.pages)
    dt = time.perf_counter() - t0
    done = ok + failed
    print(f"optictx ocr: {ok} page(s) ok, {failed} failed, {skipped} already done; {done / dt if dt else 0:.2f} "
          f"pages/s; results in {out}", flush=True)
    return 1 if failed else 0
