"""One training loop for every stage: AdamW, warm-up + cosine, accumulation, clipping, periodic eval,
time-based checkpoints with exact resume, a metrics CSV and a loss plot, single process or torchrun DDP
(or FSDP, ``fsdp: true``: parameters sharded across the ranks, see ``optictx.train.sharding``).

A *task* supplies the data and the loss; it must make batch ``(step, micro, rank)`` a pure function of
its arguments and its seed, so resuming at step N replays exactly the samples an uninterrupted run
would have seen (the RNG and optimizer state come back from the checkpoint).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from optictx.errors import ConfigError
from optictx.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from optictx.train.distributed import dist_info, init_distributed, rank0_decides
from optictx.train.sharding import is_sharded, shard_model


@dataclass
class TrainConfig:
    out_dir: str
    max_steps: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 500
    log_every: int = 10
    ckpt_every_s: float = 300.0
    keep_checkpoints: int = 2
    seed: int = 0
    fsdp: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    def batch(self, step: int, micro: int, rank: int, world: int) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]: ...


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_cpu_backends() -> None:
    """Use PyTorch's native CPU convolution kernels for training, not oneDNN.

    With torch 2.13 on AVX2 hosts, oneDNN's Conv2d *weight gradient* for patchify convolutions
    (kernel == stride, e.g. SAM's 16x16 patch embedding at 256 px, batch 8) came out wrong: relative error
    ~1.0 against a float64 reference in every trial, while the native kernel matched exactly
    (tests/test_train.py::test_patch_embedding_gradient_is_exact). The first OCR runs could not learn
    glyphs because of it. The native kernels are as fast here.
    """
    torch.backends.mkldnn.enabled = False


def train_device() -> torch.device:
    """The GPU of this rank under torchrun (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch; other values (texts, ragged CTC targets) stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(device: torch.device):
    """bf16 autocast where it is fast (GPUs, CPUs with native bf16); a no-op on AVX2-only CPUs (fp32)."""
    import contextlib

    from optictx.device import pick_dtype

    if pick_dtype(device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the model in a multi-process job (an FSDP model is sharded before its optimizer exists)."""
    _, world = dist_info()
    if world == 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, find_unused_parameters=True)


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and 1-d parameters (embeddings of separators, gains)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, param_groups=None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the last logged metrics."""
    rank, world = init_distributed()
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    configure_cpu_backends()
    device = train_device()
    model.to(device)
    sharded = cfg.fsdp and world > 1
    if sharded:  # the optimizer below must hold the sharded parameters
        if param_groups is not None:
            raise ConfigError("fsdp builds its own parameter groups; custom param_groups need a plain or DDP run")
        shard_model(model)
    groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
    for g in groups:  # a group may ask for a multiple of the peak LR (e.g. the projector)
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    start = 0
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start = state["step"]
        if rank == 0:
            print(f"resumed from {resume_from} at step {start}", flush=True)
    net = wrap_model(model)
    metrics_path = out / "metrics.csv"
    last: dict[str, float] = {}
    last_ckpt = time.monotonic()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True)
    t0, seen_tokens = time.monotonic(), 0
    for step in range(start, cfg.max_steps):
        net.train()
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(task.batch(step, micro, rank, world), device)
            with autocast(device):
                loss, parts = task.loss(net, batch, step)
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
            seen_tokens += int(parts.get("tokens", 0))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if sharded:
            grad_norm = grad_norm.full_tensor()  # a DTensor: the norm over every rank's shards
        optimizer.step()
        scheduler.step()
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = max(1e-6, time.monotonic() - t0)
            logs.update(step=done, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                        tokens_per_s=seen_tokens / elapsed)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "tokens_per_s", "gap")})
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            net.eval()
            with torch.no_grad():  # a sharded model needs every rank in each forward: all evaluate, rank 0 logs
                metrics = task.evaluate(model, done) if rank == 0 or sharded else {}
                logs.update(metrics if rank == 0 else {})
            logs["step"] = done  # an eval step is always written, even between log steps
            net.train()
        if rank == 0 and logs.get("step") == done:
            _append_csv(metrics_path, logs)
            last = logs
        if rank0_decides(time.monotonic() - last_ckpt > cfg.ckpt_every_s or done == cfg.max_steps):
            # every rank takes part (its RNG state, FSDP shards); rank 0 writes
            save_checkpoint(ckpt_root, done, model, optimizer, scheduler,
                            extra={"config": asdict(cfg)}, keep=cfg.keep_checkpoints, write=rank == 0)
            last_ckpt = time.monotonic()
    if bar is not None:
        bar.close()
    if rank == 0:
        plot_metrics(metrics_path, out / "loss.png")
    return last


def _append_csv(path: Path, row: dict[str, float]) -> None:
    """Append a row; when new columns appear (eval rows), rewrite the file with the union header."""
    rows: list[dict[str, Any]] = []
    header: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    new_cols = [k for k in row if k not in header]
    if new_cols or not path.exists():
        header = header + new_cols
        rows.append(row)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    else:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)


def plot_metrics(csv_path: Path, png_path: Path) -> None:
    """Loss (and eval curves when present) against step, written with matplotlib's Agg backend."""
    if not csv_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    cols = [c for c in rows[0] if c not in ("step", "lr", "grad_norm", "tokens_per_s", "tokens")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [float(r["step"]) for r in rows]
    for c in cols:
        pts = [(s, float(r[c])) for s, r in zip(steps, rows) if r.get(c) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), label=c, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
