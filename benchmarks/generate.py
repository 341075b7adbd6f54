"""Decode speed of optictx.generate, measured side by side in one process on one CPU thread.

1. KV cache vs recomputing: 512 new tokens (greedy) from a 32-token prompt on the tiny decoder (the
   ``ocr_tiny`` language model: 4 layers, hidden 256, 8+1 experts, vocab 4096, random weights, fp32 as
   ``pick_dtype`` picks on this CPU). The recompute baseline runs the whole sequence every step through
   the same loop (``use_cache=False``); both must emit the same tokens. Goal: >= 10x.
2. Batch 8 vs batch 1: tokens/s of 8 left-padded prompts (lengths 24..38) decoded together vs one prompt.
3. The official windowed n-gram guard (30/90) on vs off: its per-token Python cost.

Usage: ``PYTHONPATH=. python benchmarks/generate.py [--new-tokens 512] [--batch 8]``. Always exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("OMP_THREAD_LIMIT", "1")

import torch  # noqa: E402

from optictx.config import ocr_tiny  # noqa: E402
from optictx.device import pick_dtype  # noqa: E402
from optictx.generate import GenerationConfig, generate, new_cache  # noqa: E402
from optictx.model.decoder import DeepseekV2ForCausalLM  # noqa: E402


def tiny_decoder() -> DeepseekV2ForCausalLM:
    torch.manual_seed(0)
    cfg = ocr_tiny().language_config
    return DeepseekV2ForCausalLM(cfg).to(pick_dtype("cpu")).eval()


@dataclasses.dataclass
class Run:
    wall: float
    cpu: float  # this process's CPU seconds: robust when other jobs share the cores
    ids: list[list[int]]


def timed(model, prompts, cfg) -> Run:
    w0, c0 = time.perf_counter(), time.process_time()
    out = generate(model, prompts, cfg)
    return Run(time.perf_counter() - w0, time.process_time() - c0, out.token_ids)


def rate(tokens: int, run: Run) -> str:
    return f"{run.wall:7.2f} s wall {tokens / run.wall:8.1f} tok/s | {run.cpu:7.2f} s CPU {tokens / run.cpu:8.1f} tok/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_decoder()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = [0] + torch.randint(10, vocab, (31,), generator=g).tolist()
    n = args.new_tokens
    greedy = GenerationConfig(max_new_tokens=n, eos_token_id=None)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny decoder: {params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, "
          f"dtype {next(model.parameters()).dtype}, 1 thread")

    generate(model, [prompt], dataclasses.replace(greedy, max_new_tokens=8))  # warm-up
    cached = timed(model, [prompt], greedy)
    full = timed(model, [prompt], dataclasses.replace(greedy, use_cache=False))
    print(f"\n1. {n} new tokens from a {len(prompt)}-token prompt")
    print(f"   KV cache    : {rate(n, cached)}")
    print(f"   recompute   : {rate(n, full)}")
    print(f"   speed-up    : {full.wall / cached.wall:.1f}x wall, {full.cpu / cached.cpu:.1f}x CPU (goal >= 10x); "
          f"identical tokens: {cached.ids == full.ids}")

    with torch.inference_mode():  # the model's own decode step, outside the loop: what the loop adds on top
        cache = new_cache(model)
        model(input_ids=torch.tensor([prompt]), cache=cache, logits_to_keep=1)
        c0 = time.process_time()
        for t in cached.ids[0]:
            model(input_ids=torch.tensor([[t]]), cache=cache, logits_to_keep=1)
        step = (time.process_time() - c0) / n
    print(f"   per token   : model step {step * 1e3:.2f} ms CPU, generate {cached.cpu / n * 1e3:.2f} ms CPU "
          f"(loop overhead {(cached.cpu / n - step) * 1e6:+.0f} us)")

    b, m = args.batch, args.batch_tokens
    prompts = [[0] + torch.randint(10, vocab, (23 + 2 * i,), generator=g).tolist() for i in range(b)]
    cfg = GenerationConfig(max_new_tokens=m, eos_token_id=None)
    one = min((timed(model, [prompts[0]], cfg) for _ in range(2)), key=lambda r: r.cpu)
    many = min((timed(model, prompts, cfg) for _ in range(2)), key=lambda r: r.cpu)
    singles_match = all(timed(model, [p], cfg).ids[0] == ids for p, ids in zip(prompts[:2], many.ids[:2]))
    print(f"\n2. {m} new tokens per prompt, batch {b} (left-padded, lengths {len(prompts[0])}..{len(prompts[-1])})")
    print(f"   batch 1     : {rate(m, one)}")
    print(f"   batch {b}     : {rate(b * m, many)}")
    print(f"   throughput  : {one.wall * b / many.wall:.2f}x wall, {one.cpu * b / many.cpu:.2f}x CPU; "
          f"rows equal single runs: {singles_match}")

    guard = timed(model, [prompt], dataclasses.replace(greedy, ngram_size=30, window_size=90))
    print(f"\n3. windowed n-gram guard (30/90): {rate(n, guard)}; "
          f"{(guard.cpu - cached.cpu) / n * 1e6:+.0f} us CPU per token")


if __name__ == "__main__":
    main()
