"""Peak memory of `optictx ocr` on a 10-page vs a 200-page PDF: pages must stream, never pile up.

Both PDFs are generated here with reportlab (A4, a heading and ~40 lines of text per page) and OCR'd by the
real CLI in a child process (the bundled tiny model's architecture, ``ocr_tiny``, with random weights and
its nano mode; 144 DPI as the official runner; 8 new tokens per page so the run stays short). Peak RSS is
the child's own ``ru_maxrss`` from ``os.wait4``, so the parent's memory never counts. Goal: ratio <= 1.1.

Usage: ``PYTHONPATH=. python benchmarks/pipeline_memory.py [--small 10] [--large 200]``. Always exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("optical context compression renders long text into pixels and decodes it back with a small "
         "mixture of experts language model page after page of dense print").split()


def make_pdf(path: Path, pages: int) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4)
    for p in range(pages):
        c.setFont("Helvetica-Bold", 18)
        c.drawString(60, 780, f"Section {p + 1}")
        c.setFont("Helvetica", 10)
        for line in range(40):
            words = [WORDS[(p * 7 + line * 3 + k) % len(WORDS)] for k in range(12)]
            c.drawString(60, 750 - 17 * line, " ".join(words))
        c.showPage()
    c.save()
    return path


def make_model(folder: Path) -> Path:
    """The ocr_tiny architecture with random weights and a small BPE (EOS unreachable: every page decodes)."""
    import torch

    from optictx.config import ocr_tiny
    from optictx.model.vlm import DeepseekOCRForCausalLM
    from optictx.tokenizer import train_bpe

    tok = train_bpe([" ".join(WORDS)] * 50 + ["Section 0123456789 # | <td> </td>"] * 20, vocab_size=600,
                    min_frequency=1)
    cfg = ocr_tiny()
    cfg.language_config.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = DeepseekOCRForCausalLM(cfg, image_token_id=tok.image_token_id).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def measure(pdf: Path, model: Path, out: Path, new_tokens: int) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, JSONL lines) of one `optictx ocr` child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_THREAD_LIMIT="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "optictx.cli", "ocr", str(pdf), "--out", str(out), "--model", str(model),
           "--max-new-tokens", str(new_tokens), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"optictx ocr failed ({proc.returncode}): {err[-2000:]}")
    lines = sum(1 for line in (out / f"{pdf.stem}.jsonl").open() if json.loads(line)["ok"])
    return usage.ru_maxrss / 1024, seconds, lines  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        results = {}
        for n in (args.small, args.large):
            pdf = make_pdf(tmp / f"doc{n}.pdf", n)
            rss, seconds, ok = measure(pdf, model, tmp / f"out{n}", args.new_tokens)
            results[n] = rss
            print(f"{n:4d} pages ({pdf.stat().st_size / 1e3:6.0f} kB PDF): peak RSS {rss:7.1f} MiB, {ok} pages ok, "
                  f"{seconds:6.1f} s ({n / seconds:.2f} pages/s incl. start-up)")
        ratio = results[args.large] / results[args.small]
        print(f"peak RSS ratio {args.large}/{args.small} pages: {ratio:.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
