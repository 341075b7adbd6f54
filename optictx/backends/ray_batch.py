"""Batch OCR over many files with Ray Data (``optictx[ray]``): a laptop, one GPU box or a cluster.

    from optictx.backends.ray_batch import run_ray_ocr
    summary = run_ray_ocr(["scans/", "paper.pdf"], "results/", model="tiny", fmt="jsonl")

The pipeline, one stage per concern so each scales on its own:

1. ``flat_map`` (tasks): each file becomes one row per page (PDFs are opened, not rendered); pages a
   previous run finished are dropped here, which is the whole of resuming.
2. ``map`` (tasks): each page is rasterised with pypdfium2 (or loaded, for images) to PNG bytes; a page that
   fails becomes an error row, never a crashed job.
3. ``map_batches`` (an actor pool): each actor loads the model once (one actor per GPU, or CPU actors) and
   reads ``batch_size`` pages per call with the batched decoder.
4. The driver streams the rows out as they arrive: appended to ``pages.jsonl`` (fsync'ed per batch; a torn
   last line is ignored on resume) or written as ``parquet/part-*.parquet`` files (each renamed into place
   when complete). Both hold the same flat columns (:data:`COLUMNS`); ``blocks`` is a JSON string.

Resume: pages with an ``ok`` row are skipped; failed pages are retried and get a new row (a reader takes
the last row of a page). Ray itself is imported lazily; without it :func:`run_ray_ocr` raises
``BackendUnavailableError`` with the install command.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optictx.backends import BackendUnavailableError, check_backend
from optictx.errors import ConfigError
from optictx.preprocess import DEFAULT_MAX_PIXELS

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
FORMATS = ("jsonl", "parquet")
JSONL_NAME = "pages.jsonl"
PARQUET_DIR = "parquet"
COLUMNS = ("doc", "page", "ok", "markdown", "text", "raw", "blocks", "finish_reason", "mode", "width", "height",
           "vision_tokens", "decoder_slots", "prompt_tokens", "output_tokens", "text_tokens", "compression",
           "seconds", "error_type", "error_message")


def require_ray():
    """The ``ray`` module with Ray Data, or a BackendUnavailableError with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("Ray batch OCR needs Ray Data, which is not installed: "
                                      "pip install 'optictx[ray]'") from None
    return ray


@dataclass
class RayOCRSummary:
    """What a run did: pages read now (ok / failed), pages skipped as already done, where rows went."""

    pages: int
    ok: int
    failed: int
    skipped: int
    out: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- inputs and resume
def list_inputs(inputs: str | Path | Iterable[str | Path]) -> list[tuple[str, str]]:
    """``(path, "pdf" | "image")`` for each file; folders are walked recursively in sorted order."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    found: list[tuple[str, str]] = []
    for item in items:
        root = Path(item)
        if root.is_dir():
            found += [(str(p), _kind(p)) for p in sorted(root.rglob("*")) if p.is_file() and _kind(p)]
        elif root.is_file():
            if not _kind(root):
                raise ConfigError(f"{root} is neither an image nor a PDF (by its extension)")
            found.append((str(root), _kind(root)))
        else:
            raise ConfigError(f"input {item!r} does not exist")
    if not found:
        raise ConfigError("no images or PDFs found in the inputs")
    return found


def _kind(path: Path) -> str:
    ext = path.suffix.lower()
    return "pdf" if ext == ".pdf" else "image" if ext in IMAGE_EXTS else ""


def page_key(doc: str, page: int) -> str:
    return f"{doc}\x00{int(page)}"


def done_pages(out: Path, fmt: str) -> set[str]:
    """Keys of pages that already have an ``ok`` row in ``out`` (torn JSONL lines are skipped)."""
    done: set[str] = set()
    if fmt == "jsonl":
        path = out / JSONL_NAME
        if path.is_file():
            with open(path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        row = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and row.get("ok") is True:
                        done.add(page_key(row["doc"], row["page"]))
        return done
    import pyarrow.parquet as pq

    for part in sorted((out / PARQUET_DIR).glob("part-*.parquet")):
        table = pq.read_table(part, columns=["doc", "page", "ok"]).to_pydict()
        done |= {page_key(d, p) for d, p, ok in zip(table["doc"], table["page"], table["ok"]) if ok}
    return done


# --------------------------------------------------------------------------- pipeline stages (plain functions)
def expand_pages(row: dict[str, Any], done: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """One row per page still to do; a PDF that cannot be opened is one error row (page 1)."""
    from optictx.render.pdf import pdf_page_count

    doc, kind = row["doc"], row["kind"]
    if kind == "image":
        pages, error = 1, None
    else:
        try:
            pages, error = pdf_page_count(doc), None
        except Exception as e:  # noqa: BLE001 - recorded as that document's failure
            pages, error = 1, e
    rows = []
    for page in range(1, pages + 1):
        if page_key(doc, page) in done:
            continue
        r = {"doc": doc, "kind": kind, "page": page, "png": b"", "error_type": "", "error_message": ""}
        if error is not None:
            r.update(error_type=type(error).__name__, error_message=str(error))
        rows.append(r)
    return rows


def rasterise(row: dict[str, Any], dpi: float = 144, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """PNG bytes of the page (PDF pages rendered at ``dpi``), or the row with the error filled in."""
    from optictx.preprocess import load_image
    from optictx.render.pdf import iter_pdf_pages

    if row.get("error_type"):
        return row
    try:
        if row["kind"] == "pdf":
            image = next(iter_pdf_pages(row["doc"], dpi, row["page"] - 1, row["page"], max_pixels=max_pixels))
        else:
            image = load_image(row["doc"], max_pixels)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return {**row, "png": buf.getvalue()}
    except Exception as e:  # noqa: BLE001 - one bad page is one error row
        return {**row, "error_type": type(e).__name__, "error_message": str(e)}


def flat_record(row: dict[str, Any], result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    """The output row of one page: a PageResult flattened, or the error that stopped it."""
    rec: dict[str, Any] = {k: None for k in COLUMNS}
    rec.update(doc=str(row["doc"]), page=int(row["page"]), ok=result is not None, error_type="", error_message="")
    if result is None:
        err_type = type(error).__name__ if error is not None else str(row.get("error_type") or "Error")
        rec.update(error_type=err_type, error_message=str(error) if error is not None else str(row["error_message"]))
        return rec
    t = result.tokens
    rec.update(markdown=result.markdown, text=result.text, raw=result.raw, finish_reason=result.finish_reason,
               mode=result.mode, width=result.size[0], height=result.size[1],
               blocks=json.dumps([{"label": b.label, "content": b.content, "boxes_999": b.boxes_999,
                                   "boxes_px": b.boxes_px} for b in result.blocks], ensure_ascii=False),
               vision_tokens=t.vision, decoder_slots=t.decoder_slots, prompt_tokens=t.prompt,
               output_tokens=t.output, text_tokens=t.text, compression=t.compression,
               seconds=result.timings.total_s)
    return rec


class OCRActor:
    """Holds one model (built once per actor) and reads a batch of pages per call."""

    def __init__(self, backend: str = "torch", model: str = "tiny", settings: dict[str, Any] | None = None):
        from optictx.backends import make_ocr

        self.ocr = make_ocr(backend, model, **(settings or {}))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
        todo = [i for i, r in enumerate(rows) if not r["error_type"]]
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        try:
            results = dict(zip(todo, self.ocr.batch([bytes(rows[i]["png"]) for i in todo], keep_image=False)))
        except Exception:  # noqa: BLE001 - find the bad page: one by one
            for i in todo:
                try:
                    results[i] = self.ocr(bytes(rows[i]["png"]), keep_image=False)
                except Exception as e:  # noqa: BLE001
                    errors[i] = e
        records = [flat_record(r, results.get(i), errors.get(i)) for i, r in enumerate(rows)]
        return {k: [rec[k] for rec in records] for k in COLUMNS}


# --------------------------------------------------------------------------- output
class RowWriter:
    """Append rows to ``pages.jsonl`` (one write + fsync per flush) or to atomic Parquet part files."""

    def __init__(self, out: Path, fmt: str, rows_per_file: int = 256):
        self.out, self.fmt, self.rows_per_file = out, fmt, rows_per_file
        self.buffer: list[dict[str, Any]] = []
        self.files: list[Path] = []
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def write(self, row: dict[str, Any]) -> None:
        self.buffer.append({k: _plain(row.get(k)) for k in COLUMNS})
        if len(self.buffer) >= (self.rows_per_file if self.fmt == "parquet" else 1):
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.fmt == "jsonl":
            path = self.out / JSONL_NAME
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.buffer).encode("utf-8")
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            path = self._write_parquet()
        if path not in self.files:
            self.files.append(path)
        self.buffer = []

    def _write_parquet(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.out / PARQUET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"part-{self.run_id}-{len(self.files):05d}.parquet"
        tmp = folder / f".{target.name}.tmp"
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=_schema()), tmp)
        os.replace(tmp, target)
        return target


def _schema():
    import pyarrow as pa

    types = {"page": pa.int64(), "ok": pa.bool_(), "width": pa.int64(), "height": pa.int64(),
             "vision_tokens": pa.int64(), "decoder_slots": pa.int64(), "prompt_tokens": pa.int64(),
             "output_tokens": pa.int64(), "text_tokens": pa.int64(), "compression": pa.float64(),
             "seconds": pa.float64()}
    return pa.schema([(k, types.get(k, pa.string())) for k in COLUMNS])


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray hands back) -> Python values JSON and Arrow understand."""
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        return value.item()
    return value


# --------------------------------------------------------------------------- the run
def _init_ray(ray, address: str | None) -> None:
    """Join ``address`` or start a local instance on 127.0.0.1 with no dashboard and no usage stats."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


def run_ray_ocr(inputs: str | Path | Sequence[str | Path], out: str | Path, *, model: str = "tiny",
                backend: str = "torch", fmt: str = "jsonl", dpi: float = 144, batch_size: int = 4,
                num_actors: int | None = None, num_gpus_per_actor: float | None = None, resume: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS, rows_per_file: int = 256, ray_address: str | None = None,
                **ocr_settings: Any) -> RayOCRSummary:
    """OCR every page of ``inputs`` (files, folders) into ``out`` with Ray Data; see the module docstring.

    ``ocr_settings`` go to the OCR constructor (mode, prompt, max_new_tokens, device, ...). Actors: one per
    GPU when the cluster has GPUs (``num_gpus_per_actor`` 1), else ``num_actors`` (default 1) CPU actors.
    Without ``resume`` an ``out`` that already holds rows is refused rather than overwritten.
    """
    ray = require_ray()
    backend = check_backend(backend)
    if fmt not in FORMATS:
        raise ConfigError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch_size < 1 or dpi <= 0 or rows_per_file < 1:
        raise ConfigError("batch_size and rows_per_file must be >= 1 and dpi > 0")
    files = list_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = done_pages(out, fmt)
    if done and not resume:
        raise ConfigError(f"{out} already holds {len(done)} finished page(s); pass resume=True or use an empty folder")
    t0 = time.perf_counter()
    _init_ray(ray, ray_address)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus = num_gpus_per_actor if num_gpus_per_actor is not None else (1 if cluster_gpus else 0)
    actors = num_actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    settings = dict(ocr_settings)
    if backend == "torch" and gpus:
        settings.setdefault("device", "cuda")

    ds = ray.data.from_items([{"doc": doc, "kind": kind} for doc, kind in files])
    ds = ds.flat_map(expand_pages, fn_kwargs={"done": frozenset(done)})
    ds = ds.map(rasterise, fn_kwargs={"dpi": dpi, "max_pixels": max_pixels})
    ds = ds.map_batches(OCRActor, fn_constructor_kwargs={"backend": backend, "model": model, "settings": settings},
                        batch_size=batch_size, concurrency=actors, num_gpus=gpus)
    writer = RowWriter(out, fmt, rows_per_file)
    ok = failed = 0
    try:
        for row in ds.iter_rows():
            writer.write(row)
            ok, failed = ok + bool(row["ok"]), failed + (not bool(row["ok"]))
    finally:
        writer.flush()
    return RayOCRSummary(pages=ok + failed, ok=ok, failed=failed, skipped=len(done), out=out, files=writer.files,
                         seconds=time.perf_counter() - t0)
