"""DeepEncoder speed on one Base-mode view (1024x1024), official sizes, random weights, CPU.

    PYTHONPATH=. python benchmarks/encoder.py [--repeats 3] [--threads N] [--size 1024] [--bf16 auto|full|pieces|off]

Prints, all measured in this one process:
- fp32 seconds per image of optictx's DeepEncoder (``DeepEncoder.features``) and of a baseline that follows
  the official computation order with the same weights (``ImageEncoderViT.reference_forward``: one full
  [B, heads, L, L] rel-pos mask into SDPA per attention, every zero-padded window token projected). The two
  run interleaved ``--repeats`` times; medians of wall-clock and of process CPU time, their ratios, the
  largest output difference and the extra peak RSS of one forward.
- bf16 (autocast, as the issue's reference measurement) seconds per image. Where the CPU has no native bf16
  this is slow (3-6x fp32 here), so by default it is bounded: one window block, one global block, one CLIP
  layer and the rest (patch embed, neck, convs, projector) are timed once in bf16 and (median) in fp32, and
  the encoder is their sum with 8 window + 4 global blocks + 24 CLIP layers; the fp32 sum is printed next to
  the measured fp32 time as a check of the extrapolation.
  ``--bf16 full`` times the whole encoder instead; ``auto`` does that only where bf16 is native.
- the dtype ``optictx.device.pick_dtype`` picks for this CPU.

The machine may be shared and noisy: read the ratios, not the absolute seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from optictx.config import deepseek_ocr
from optictx.device import cpu_has_native_bf16, pick_dtype
from optictx.model.deepencoder import DeepEncoder

BF16 = torch.bfloat16


def build_encoder(seed: int = 0) -> DeepEncoder:
    """Official-size DeepEncoder with random weights everywhere (the official init zeroes rel-pos tables)."""
    torch.manual_seed(seed)
    enc = DeepEncoder(deepseek_ocr()).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.02)
    return enc


def reference_features(enc: DeepEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """``DeepEncoder.features`` with SAM run in the official computation order (the baseline)."""
    sam = enc.sam_model.reference_forward(pixels)
    clip = enc.vision_model(pixels.shape[0], sam)
    fused = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)
    return enc.projector(fused)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_extra_rss(fn: Callable[[], object]) -> float:
    """Peak resident memory added during one call, in MiB (Linux: reset VmHWM via clear_refs, read it back)."""
    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
        return float("nan")

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run every variant once per round, ``repeats`` rounds, so drifts in machine load hit all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
            print(f"  round {r + 1}/{repeats} {name:9s} {times[name][-1][0]:7.2f} s wall", flush=True)
    return times


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def bf16_pieces(enc: DeepEncoder, size: int, repeats: int) -> tuple[float, float]:
    """(fp32, bf16-autocast) seconds per image as sums of pieces: one window block, one global block, one
    CLIP layer (times their counts) and the rest (patch embed, neck, convs, projector) once. bf16 runs once."""
    sam = enc.sam_model
    win = next(b for b in sam.blocks if b.window > 0)
    glob = next(b for b in sam.blocks if b.window == 0)
    layer = enc.vision_model.transformer.layers[0]
    side = size // sam.patch_embed.proj.stride[0]  # SAM token grid; CLIP sees it 4x smaller per side, + CLS
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    grid = torch.randn(1, side, side, sam.pos_embed.shape[-1])
    tokens = torch.randn(1, (side // 4) ** 2 + 1, layer.self_attn.out_proj.in_features)
    fused = torch.randn(1, (side // 4) ** 2, enc.projector.layers.in_features)

    def rest() -> None:
        sam.patch_embed(pixels)
        sam.net_3(sam.net_2(sam.neck(grid.permute(0, 3, 1, 2))))
        enc.projector(fused)

    n_win = sum(b.window > 0 for b in sam.blocks)
    pieces = {"window block": (lambda: win(grid), n_win),
              "global block": (lambda: glob(grid), len(sam.blocks) - n_win),
              "CLIP layer": (lambda: layer(tokens), len(enc.vision_model.transformer.layers)),
              "rest": (rest, 1)}
    total32, total16 = 0.0, 0.0
    for name, (fn, count) in pieces.items():
        t32 = statistics.median(timed(fn)[0] for _ in range(repeats))
        with torch.autocast("cpu", dtype=BF16):
            t16 = timed(fn)[0]  # one run: bounded on hosts where bf16 is emulated
        print(f"  {name:12s} x{count:2d}: fp32 {t32:6.2f} s   bf16 {t16:7.2f} s   ({t16 / t32:4.1f}x)", flush=True)
        total32 += count * t32
        total16 += count * t16
    return total32, total16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per fp32 variant (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=1024, help="view side in pixels (Base mode: 1024)")
    ap.add_argument("--bf16", choices=("auto", "full", "pieces", "off"), default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    picked = pick_dtype("cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {capability}, "
          f"native bf16: {cpu_has_native_bf16()}, load average {os.getloadavg()[0]:.1f}")
    enc = build_encoder()
    pixels = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    variants = {"optictx": lambda: enc.features(pixels), "baseline": lambda: reference_features(enc, pixels)}
    with torch.inference_mode():
        out: dict[str, torch.Tensor] = {}
        # the first call of each is the warm-up; it also gives the outputs to compare and the peak memory
        rss = {name: peak_extra_rss(lambda: out.setdefault(name, fn())) for name, fn in variants.items()}
        diff = (out["optictx"] - out["baseline"]).abs().max().item()
        print(f"fp32, one {args.size}x{args.size} view, {args.repeats} interleaved rounds:")
        runs = interleaved(variants, args.repeats)
        (fast_wall, fast_cpu), (base_wall, base_cpu) = medians(runs["optictx"]), medians(runs["baseline"])
        mode = args.bf16 if args.bf16 != "auto" else ("full" if cpu_has_native_bf16() else "pieces")
        bf16_s, bf16_how = None, ""
        if mode == "full":
            with torch.autocast("cpu", dtype=BF16):
                bf16_s = medians(interleaved({"bf16": variants["optictx"]}, args.repeats)["bf16"])[0]
            bf16_how = "whole encoder, median"
        elif mode == "pieces":
            print("bf16 autocast, bounded (one block of each kind, times its count):")
            pieces32, bf16_s = bf16_pieces(enc, args.size, args.repeats)
            bf16_how = f"sum of pieces; the same sum in fp32 is {pieces32:.2f} s"
    print()
    print(f"{'':24s}{'wall s/img':>12s}{'CPU s/img':>12s}{'peak +RSS MiB':>15s}")
    print(f"{'optictx fp32':24s}{fast_wall:12.2f}{fast_cpu:12.2f}{rss['optictx']:15.0f}")
    print(f"{'official-order baseline':24s}{base_wall:12.2f}{base_cpu:12.2f}{rss['baseline']:15.0f}")
    print(f"speed-up vs baseline: {base_wall / fast_wall:.2f}x wall, {base_cpu / fast_cpu:.2f}x CPU; "
          f"max |optictx - baseline| = {diff:.2e}")
    if bf16_s is not None:
        print(f"optictx bf16 autocast: {bf16_s:.2f} s/img ({bf16_how}); {bf16_s / fast_wall:.1f}x the fp32 time")
    print(f"pick_dtype('cpu') -> {picked}; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
