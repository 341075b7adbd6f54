"""`optictx render FILE --out DIR`: text, markdown or PDF -> page PNGs, each with a JSON of its ground truth.

A ``.md`` file renders as markdown (``--text`` forces plain text), a ``.pdf`` is rasterised with its text
layer as ground truth, anything else is UTF-8 text; ``-`` reads stdin. ``--fit MODE`` puts the text on
one square page of a DeepSeek-OCR mode with the largest font that fits.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optictx.errors import RenderError


def register(subparsers) -> None:
    p = subparsers.add_parser("render", help="render text/markdown/PDF to page images with ground-truth JSON",
                              description=__doc__.splitlines()[0])
    p.add_argument("file", help="a .txt/.md/.pdf file, or - for stdin")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--width", type=int, help="page width in px (default: A4 at --dpi)")
    p.add_argument("--height", type=int, help="page height in px (default: A4 at --dpi)")
    p.add_argument("--margin", type=int, help="margin in px (default: 0.75 in)")
    p.add_argument("--font-size", type=int, help="font size in px per em (default: 12 pt at --dpi)")
    p.add_argument("--font", default="sans", help="sans, serif, mono, cjk, or a font file path")
    p.add_argument("--line-spacing", type=float, default=1.25)
    p.add_argument("--columns", type=int, default=1)
    p.add_argument("--dpi", type=int, default=144)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--markdown", action="store_true", help="render as markdown (default for .md)")
    kind.add_argument("--text", action="store_true", help="render as plain text even if .md")
    p.add_argument("--fit", metavar="MODE", help="one page of a mode (tiny/small/base/large), largest font that fits")
    p.add_argument("--max-pages", type=int)
    p.set_defaults(func=run)


def _style(args):
    from optictx.render import PageStyle

    style = PageStyle.a4(dpi=args.dpi, font_family=args.font, line_spacing=args.line_spacing, columns=args.columns)
    changes = {k: v for k, v in (("width", args.width), ("height", args.height), ("margin", args.margin),
                                 ("font_size", args.font_size)) if v is not None}
    return style.with_(**changes) if changes else style


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RenderError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise RenderError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _box(tb) -> dict:
    return {"text": tb.text, "box_px": list(tb.box_px), "box_999": list(tb.box_999)}


def _write(folder: Path, n: int, image, record: dict, dpi: int) -> None:
    """Write one page's PNG and JSON into the staging folder (published all at once by :func:`_staged`)."""
    image.save(folder / f"page-{n:04d}.png", dpi=(dpi, dpi))
    (folder / f"page-{n:04d}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RenderError(f"--out {out} exists and is not a folder")


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A hidden temp folder whose files appear in ``out`` only if the block finishes.

    Why: a PDF whose page 2 is refused must not leave page 1 behind (a half-written output folder looks
    like a finished short document). A new ``out`` is staged next to it and renamed into place in one step;
    into an existing ``out`` each file is moved with an atomic ``os.replace``. On any error the temp folder
    and every parent folder made for it are removed, so a failed run leaves the disk as it found it.
    """
    _check_out(out)
    made: list[Path] = []  # parent folders created here, outermost first
    exists = out.is_dir()
    home = out if exists else out.parent
    p = home
    while not p.exists():
        made.insert(0, p)
        p = p.parent
    try:
        for d in made:
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name or 'out'}.", suffix=".tmp", dir=home))
    except OSError as e:
        _remove_made(made)
        raise RenderError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    try:
        try:
            yield tmp
            _publish(tmp, out, exists)
        except OSError as e:  # disk full, permissions: a typed error, not a traceback
            raise RenderError(f"--out {out}: cannot write the pages ({e.strerror or e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


def _remove_made(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break  # something else put a file there: leave it


def _publish(tmp: Path, out: Path, exists: bool) -> None:
    if not exists:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output folder gets the usual permissions
        try:
            tmp.rename(out)
            return
        except OSError:
            if not out.is_dir():  # not a race with another writer creating ``out`` meanwhile: a real failure
                raise
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def _pdf(args, out: Path) -> int:
    from optictx.render.pdf import iter_pdf_pages, pdf_page_count, pdf_text_layer

    # opened once first: an encrypted, corrupt or empty PDF is refused before any folder is made, and
    # --max-pages is a cap (a 3-page PDF with --max-pages 10 renders 3 pages, not a range error)
    total = pdf_page_count(args.file)
    last = total if args.max_pages is None else min(args.max_pages, total)
    n = 0
    with _staged(out) as folder:
        for n, image in enumerate(iter_pdf_pages(args.file, dpi=args.dpi, last=last), 1):
            lines = pdf_text_layer(args.file, n - 1, dpi=args.dpi)
            record = {"page": n, "width": image.width, "height": image.height, "source": "pdf",
                      "text": "\n".join(t.text for t in lines), "lines": [_box(t) for t in lines]}
            _write(folder, n, image, record, args.dpi)
    return n


def run(args: argparse.Namespace) -> int:
    from optictx.render import render_markdown, render_text, render_to_fit

    out = Path(args.out)
    if args.max_pages is not None and args.max_pages < 1:
        raise RenderError(f"--max-pages must be at least 1, got {args.max_pages}")
    _check_out(out)
    if args.file.lower().endswith(".pdf") and not (args.markdown or args.text):
        n = _pdf(args, out)
        print(f"wrote {n} page(s) of {args.file} at {args.dpi} DPI to {out}")
        return 0
    text = _read(args.file)
    style = _style(args)
    markdown = args.markdown or (args.file.lower().endswith(".md") and not args.text)
    if args.fit:
        from optictx.render import PageStyle
        from optictx.render.fit import resolve_mode

        _, size, _ = resolve_mode(args.fit)
        square = PageStyle(width=size, height=size, margin=args.margin if args.margin is not None else size // 32,
                           font_family=args.font, line_spacing=args.line_spacing, columns=args.columns, dpi=args.dpi)
        fit = render_to_fit(text, args.fit, style=square)
        pages, note = [fit.page], f" ({fit.mode}: {fit.font_size} px font, {fit.vision_tokens} vision tokens)"
    else:
        render = render_markdown if markdown else render_text
        pages, note = render(text, style, max_pages=args.max_pages), ""
    with _staged(out) as folder:
        for page in pages:
            w, h = page.image.size
            record = {"page": page.index + 1, "width": w, "height": h, "source": "markdown" if markdown else "text",
                      "text": page.text, "lines": [_box(t) for t in page.lines],
                      "words": [_box(t) for t in page.words],
                      "blocks": [{"label": b.label, **_box(b)} for b in page.blocks]}
            _write(folder, page.index + 1, page.image, record, style.dpi)
    print(f"wrote {len(pages)} page(s) to {out}{note}")
    return 0
