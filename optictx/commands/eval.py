"""`optictx eval ...`: compression-vs-precision, visual primitives, optical memory, OmniDocBench scoring."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models (compression, primitives, memory, omnidocbench)")
    ev = p.add_subparsers(dest="eval_command", metavar="BENCH")

    c = ev.add_parser("compression", help="precision vs compression ratio on held-out pages, with controls",
                      description="Render held-out text (never trained on) at growing density, read it back, and "
                                  "print precision / edit distance per compression-ratio bin next to the "
                                  "mismatched-image control and Tesseract on the same pixels.")
    c.add_argument("--model", default="tiny", help="tiny (bundled), a model folder, or a hub id")
    c.add_argument("--pages", type=int, default=32, help="pages, from one line to a full page (default 32)")
    c.add_argument("--out", default="out/eval-compression", help="folder for results.json and the plot")
    c.add_argument("--no-tesseract", action="store_true", help="skip the Tesseract baseline column")
    c.add_argument("--max-new-tokens", type=int, default=1024)
    c.set_defaults(func=run_compression)

    for name, helptext in (("primitives", "counting / pointing / grounding / maze / path-tracing accuracy"),
                           ("memory", "optical memory: planted-fact recall vs age and budget"),
                           ("omnidocbench", "score predictions with the OmniDocBench end-to-end protocol")):
        hook = _optional_hook(name)
        if hook is not None:
            hook(ev)
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])


def _optional_hook(name: str):
    """Sub-benchmarks register themselves from their own modules (absent ones are simply not offered)."""
    import importlib

    modules = {"primitives": "optictx.eval.primitives_eval", "memory": "optictx.eval.memory_eval",
               "omnidocbench": "optictx.eval.omnidocbench"}
    try:
        module = importlib.import_module(modules[name])
    except ModuleNotFoundError as e:
        if e.name == modules[name]:
            return None
        raise
    return getattr(module, "register_cli", None)


def run_compression(args: argparse.Namespace) -> int:
    from optictx.eval import compression as cmp
    from optictx.ocr import OCR

    from optictx.budget import ocr_budget

    ocr = OCR(args.model, prompt="free-ocr", max_new_tokens=args.max_new_tokens)
    page_size = ocr.mode.base_size
    vision_tokens = ocr_budget(page_size, page_size, ocr.mode).vision_tokens
    pages = cmp.make_pages(args.pages, page_size=page_size, grid=page_size // 64)
    scores = cmp.score_pages(lambda im: ocr(im).text, pages, vision_tokens, use_tesseract=not args.no_tesseract)
    rows = cmp.bin_table(scores)
    title = f"{args.model}: {vision_tokens} vision tokens per {page_size}px page, {len(pages)} held-out pages"
    cmp.print_table(rows, title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = cmp.summary(scores)
    (out / "results.json").write_text(json.dumps({"summary": summary, "bins": rows, "pages": cmp.to_jsonable(scores)},
                                                 indent=2) + "\n", encoding="utf-8")
    cmp.plot(scores, out / "compression.png", title)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'compression.png'}")
    return 0
