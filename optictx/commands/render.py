"""`optictx render FILE --out DIR`: text, markdown or PDF -> page PNGs, each with a JSON of its ground truth.

A ``.md`` file renders as markdown (``--text`` forces plain text), a ``.pdf`` is rasterised with its text
layer as ground truth, anything else is UTF-8 text; ``-`` reads stdin. ``--fit MODE`` puts the text on
one square page of a DeepSeek-OCR mode with the largest font that fits.
"""
from __future__ import annotations

import argparse
import json
import sys
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


def _write(out: Path, n: int, image, record: dict, dpi: int) -> None:
    image.save(out / f"page-{n:04d}.png", dpi=(dpi, dpi))
    (out / f"page-{n:04d}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")


def _pdf(args, out: Path) -> int:
    from optictx.render.pdf import iter_pdf_pages, pdf_text_layer

    last = None if args.max_pages is None else args.max_pages
    n = 0
    for n, image in enumerate(iter_pdf_pages(args.file, dpi=args.dpi, last=last), 1):
        lines = pdf_text_layer(args.file, n - 1, dpi=args.dpi)
        record = {"page": n, "width": image.width, "height": image.height, "source": "pdf",
                  "text": "\n".join(t.text for t in lines), "lines": [_box(t) for t in lines]}
        _write(out, n, image, record, args.dpi)
    return n


def run(args: argparse.Namespace) -> int:
    from optictx.render import render_markdown, render_text, render_to_fit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    for page in pages:
        w, h = page.image.size
        record = {"page": page.index + 1, "width": w, "height": h, "source": "markdown" if markdown else "text",
                  "text": page.text, "lines": [_box(t) for t in page.lines], "words": [_box(t) for t in page.words],
                  "blocks": [{"label": b.label, **_box(b)} for b in page.blocks]}
        _write(out, page.index + 1, page.image, record, style.dpi)
    print(f"wrote {len(pages)} page(s) to {out}{note}")
    return 0
