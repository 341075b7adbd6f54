"""`optictx data`: build training data.

    optictx data pdf DIR --out DIR [--dpi 144] [--mode gundam]
        every PDF under DIR -> page PNGs + pairs.jsonl (text-layer lines with boxes); resumable, bad PDFs
        and pages without a text layer go to failures.jsonl
    optictx data sample --task chart|formula|chemistry|geometry|document|mix --n 8 --out DIR
        preview synthetic samples: PNGs + samples.jsonl (prompt, target, token counts, compression)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from optictx.data.dataset import DEFAULT_MODE, TASKS


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="build training data: PDF pairs, synthetic sample previews",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="data_command", metavar="{pdf,sample}")
    pdf = sub.add_parser("pdf", help="born-digital PDFs -> (page image, text lines with boxes) pairs")
    pdf.add_argument("dir", help="folder searched recursively for *.pdf")
    pdf.add_argument("--out", required=True, help="output folder (created; rerun to resume)")
    pdf.add_argument("--dpi", type=float, default=144, help="render resolution (default 144, the official runner's)")
    pdf.add_argument("--mode", default="gundam", help="mode whose vision-token count is recorded (default gundam)")
    pdf.add_argument("--quiet", action="store_true", help="no progress bar")
    pdf.set_defaults(func=run_pdf)
    s = sub.add_parser("sample", help="preview synthetic samples of a task")
    s.add_argument("--task", required=True, choices=[*TASKS, "mix"], help="task, or mix for the default mixture")
    s.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--start", type=int, default=0, help="first sample index")
    s.add_argument("--mode", default=DEFAULT_MODE, help=f"mode for vision-token counts (default {DEFAULT_MODE})")
    s.add_argument("--layout", choices=["plain", "markdown", "columns"], help="document task: one layout only")
    s.set_defaults(func=run_sample)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def run_pdf(args: argparse.Namespace) -> int:
    from optictx.data.pdf_pairs import FAILURES, PAIRS, export_pdfs

    report = export_pdfs(args.dir, args.out, dpi=args.dpi, mode=args.mode, progress=not args.quiet)
    print(f"wrote {report.written} page(s), {report.skipped} already done, {len(report.failures)} failure(s) "
          f"-> {Path(args.out) / PAIRS}")
    for f in report.failures:
        where = f"{f['pdf']}" + (f" page {f['page'] + 1}" if f["page"] is not None else "")
        print(f"  skipped {where}: {f['error']}")
    if report.failures:
        print(f"  (recorded in {Path(args.out) / FAILURES})")
    return 0 if report.written or report.skipped else 1


def run_sample(args: argparse.Namespace) -> int:
    from optictx.data.dataset import OCRDataset
    from optictx.errors import ConfigError

    if args.n < 1 or args.start < 0 or args.seed < 0:
        raise ConfigError("--n must be >= 1 and --start, --seed >= 0")
    configs = {}
    if args.layout:
        if args.task not in ("document", "mix"):
            raise ConfigError("--layout applies to the document task only")
        from optictx.data.documents import with_layout

        configs["document"] = with_layout(None, args.layout)
    dataset = OCRDataset(None if args.task == "mix" else args.task, seed=args.seed, mode=args.mode, configs=configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for index in range(args.start, args.start + args.n):
            s = dataset.sample(index)
            name = f"{s.task}-{index:06d}.png"
            s.image.save(out / name)
            f.write(json.dumps({"image": name, **s.record()}, ensure_ascii=False) + "\n")
            preview = s.target.replace("\n", "\\n")
            print(f"{name}  {s.image.width}x{s.image.height}  {s.text_tokens} text / {s.vision_tokens} vision "
                  f"tokens = {s.compression:.2f}x  {preview[:70]}{'...' if len(preview) > 70 else ''}")
    print(f"wrote {args.n} sample(s) to {out}")
    return 0
