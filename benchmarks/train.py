"""Training throughput of the bundled OCR recipe: tokens/s and model FLOP utilisation (MFU).

MFU = (FLOPs of one training step, counted by torch's FlopCounterMode) / step time, divided by the matmul
peak *measured in this same process* with the same dtype and thread count (a large square matmul), so the
ratio is meaningful on a noisy shared machine.

    python benchmarks/train.py [--vocab grid|bpe] [--batch 8] [--lines 8] [--steps 4] [--threads 1]

``--vocab grid`` (default) is the shipped recipe: the cell-tagged vocabulary and the task settings of
``configs/ocr-tiny-grid.json`` (guided attention on layers 1-3); ``bpe`` is the 4,096-BPE recipe of stages A-C.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from optictx.device import pick_dtype
from optictx.config import dataclass_from
from optictx.train.ocr_run import build_model
from optictx.train.ocr_task import OCRTask, OCRTaskConfig, OCRTrainModule, ProbeSites
from optictx.grid_tokenizer import build_grid_tokenizer
from optictx.tokenizer import train_bpe
from optictx.data.corpus import tokenizer_training_text


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lines", type=int, default=8, help="text lines per page (curriculum level)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", choices=("grid", "bpe"), default="grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = pick_dtype("cpu")
    task_keys: dict = {}
    if args.vocab == "grid":
        tok = build_grid_tokenizer()
        recipe = json.loads((Path(__file__).parents[1] / "configs" / "ocr-tiny-grid.json").read_text())
        shipped = dataclass_from(OCRTaskConfig, recipe["ocr"], "ocr")
        task_keys = {k: getattr(shipped, k) for k in ("guide_weight", "guide_layers", "guide_heads", "cursor_weight",
                                                       "glyph_weight", "token_weight")}
    else:
        tok = train_bpe(tokenizer_training_text(0, 2000), vocab_size=4096)
    _, model = build_model({"model": "ocr-tiny"}, tok)
    model = model.to(dtype)
    cfg = OCRTaskConfig(batch_size=args.batch, curriculum_steps=1, full_lines=args.lines, **task_keys)
    task = OCRTask(tok, cfg)
    net = OCRTrainModule(model, *ProbeSites.cells(cfg.page_size, cfg.grid)).to(dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batches = [task.batch(10 + i, 0, 0, 1) for i in range(args.steps + 1)]

    def step(batch):
        loss, parts = task.loss(net, batch, 10)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return parts["tokens"]

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops_per_step = counter.get_total_flops()
    peak = matmul_peak(dtype)
    t = time.perf_counter()
    tokens = sum(step(b) for b in batches[1:])
    elapsed = time.perf_counter() - t
    peak_after = matmul_peak(dtype)
    achieved = flops_per_step * args.steps / elapsed
    peak = (peak + peak_after) / 2
    print(f"{args.vocab} vocabulary ({tok.vocab_size} ids), dtype {dtype}, threads {args.threads}, "
          f"batch {args.batch} pages of {args.lines} lines")
    print(f"step time        {elapsed / args.steps:8.3f} s")
    print(f"text tokens/s    {tokens / elapsed:8.1f}   pages/s {args.batch * args.steps / elapsed:.2f}")
    print(f"model FLOP/step  {flops_per_step / 1e9:8.2f} GFLOP")
    print(f"achieved         {achieved / 1e9:8.2f} GFLOP/s")
    print(f"matmul peak      {peak / 1e9:8.2f} GFLOP/s (1024^3 {dtype}, same process)")
    print(f"MFU              {100 * achieved / peak:8.1f} %")


if __name__ == "__main__":
    main()
