"""Training checkpoints in safetensors (no pickle), written atomically, resumable exactly.

A checkpoint is a folder ``step-XXXXXXX/`` with
- ``model.safetensors``   : the model's state dict,
- ``optim.safetensors``   : every optimizer state tensor, keyed ``<param index>.<name>``,
- ``state.json``          : step, optimizer param groups and scalar state, scheduler state, Python RNG
                            state and anything else the loop wants back (e.g. the data position),
- ``rng.safetensors``     : torch CPU (and CUDA) generator states, one per rank in a multi-process job.
An FSDP-sharded model is saved and loaded in the same single-process layout (``optictx.train.sharding``).
It is written into ``.tmp-step-XXXXXXX`` and renamed, so a kill during save leaves the previous one intact.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from optictx.errors import WeightsError
from optictx.fileio import fsync_dir
from optictx.train.distributed import dist_info
from optictx.train.sharding import full_model_state, full_optimizer_state, is_sharded, load_full_state

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            key = f"{pid}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, extra: dict[str, Any] | None = None, keep: int = 2,
                    write: bool = True) -> Path:
    """Write checkpoint ``step``. In a multi-process job every rank must call this (RNG states, and an FSDP
    model's full tensors, are gathered collectively) and only the one with ``write=True`` writes."""
    root = Path(root)
    final = root / f"step-{step:07d}"
    model_sd, optim_sd = full_model_state(model), full_optimizer_state(model, optimizer)
    torch_states, python_states = _rank_rng_states()
    if not write:
        return final
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model_sd.items()}
    optim_tensors, optim_meta = _optimizer_tensors(optim_sd)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_sd, str(tmp / "model.safetensors"))
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    for r, t in enumerate(torch_states):
        rng[f"torch.rank{r}"] = t
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "step": step,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_random": _encode_random_state(random.getstate()),
        "python_random_ranks": [_encode_random_state(p) for p in python_states],
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        # rename first: a kill during rmtree must never leave a half-deleted folder that still looks complete
        doomed = old.with_name(f".del-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for stale in root.glob(".del-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp-*`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place; returns the state dict (step, extra, ...)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model_sd = load_file(str(path / "model.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as e:
        raise WeightsError(f"checkpoint {path} is unreadable: {e}") from e
    optim_sd = None
    if optimizer is not None:
        tensors = load_file(str(path / "optim.safetensors"))
        meta = state["optimizer"]
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(meta["scalars"].items()):
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        optim_sd = {"state": opt_state, "param_groups": meta["param_groups"]}
    if is_sharded(model):
        load_full_state(model, model_sd, optimizer, optim_sd)
    else:
        model.load_state_dict(model_sd)
        if optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rng = load_file(str(path / "rng.safetensors"))
        rank, _ = dist_info()
        torch.set_rng_state(rng.get(f"torch.rank{rank}", rng["torch"]))
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        ranks = state.get("python_random_ranks") or []
        random.setstate(_decode_random_state(ranks[rank] if rank < len(ranks) else state["python_random"]))
    return state


def _rank_rng_states() -> tuple[list[torch.Tensor], list[tuple]]:
    """Every rank's torch and Python RNG states (a collective in a multi-process job, [] otherwise): each
    rank draws its own stream, so resuming only rank 0's would change what the other ranks draw."""
    _, world = dist_info()
    if world == 1:
        return [], []
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (torch.get_rng_state(), random.getstate()))
    return [t for t, _ in gathered], [p for _, p in gathered]


def _encode_random_state(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _decode_random_state(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


