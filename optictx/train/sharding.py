"""FSDP (PyTorch's ``fully_shard``, FSDP2) for models that do not fit one device, and full state dicts of it.

``fully_shard`` replaces every parameter by a DTensor holding this rank's shard, so three things differ
from a plain or DDP model, and each has one helper here:

* the optimizer must be built *after* sharding (it must hold the DTensor parameters);
* saving needs the full tensors: ``full_model_state`` / ``full_optimizer_state`` gather them (a collective:
  every rank calls it, rank 0 writes);
* loading scatters full tensors back into shards: ``load_full_state``.

FSDP2 runs on the CPU with gloo (FSDP1 refuses CPU-only hosts), so the 2-process test runs anywhere.
Checkpoints keep the single-process layout (optimizer state keyed by parameter index), so a run can be
resumed with or without FSDP and with any number of processes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module) -> nn.Module:
    """Shard every block of the outermost ``nn.ModuleList`` s (the transformer layers; experts inside a block
    stay in their block's unit) as its own unit, then the rest: one block's full weights at a time."""
    from torch.distributed.fsdp import fully_shard

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    if any(p.requires_grad for p in block.parameters()):
                        fully_shard(block)
            else:
                visit(child)

    visit(model)
    fully_shard(model)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _index_of_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name -> its index in ``optimizer.state_dict()`` (params numbered in group order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {n: i for i, n in enumerate(order)}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors on the CPU (collective when sharded; empty on ranks > 0)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as a single process would return it (collective when sharded; empty on
    ranks > 0)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if "param_groups" not in sd:  # cpu_offload gathers onto rank 0 only; the other ranks get nothing
        return {"state": {}, "param_groups": []}
    index = _index_of_name(model, optimizer)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, model_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                    optim_sd: dict[str, Any] | None) -> None:
    """Load full (single-process layout) state into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_options())
    if optimizer is None or optim_sd is None:
        return
    name = {i: n for n, i in _index_of_name(model, optimizer).items()}
    groups = [{**g, "params": [name[i] for i in g["params"]]} for g in optim_sd["param_groups"]]
    by_name = {"state": {name[i]: s for i, s in optim_sd["state"].items()}, "param_groups": groups}
    # strict=False: a parameter that never had a gradient (an unused embedding, an expert never routed to)
    # has no AdamW state, exactly as in a single-process checkpoint
    set_optimizer_state_dict(model, optimizer, by_name, options=_options(strict=False))
    # set_optimizer_state_dict first creates state for every parameter (a zero-gradient step); drop it again
    # where the checkpoint had none, so the run continues exactly as a single process would
    for n, p in model.named_parameters():
        if n not in by_name["state"]:
            optimizer.state.pop(p, None)
