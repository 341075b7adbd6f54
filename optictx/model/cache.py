"""The KV cache shared by every decoder in the zoo.

One ``KVCache`` per generation; ``layers[i]`` is whatever the attention module of layer *i* needs (MHA:
keys/values; MLA: the compressed latent + the shared rope key; CSA: window, compressed entries, partial
block). Each attention module reads and replaces its own entry; the model advances ``seen`` once per
forward. Keeping the per-layer state opaque lets one ``generate`` drive MHA, MLA and CSA alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KVCache:
    num_layers: int
    layers: list[Any] = field(default_factory=list)
    seen: int = 0  # sequence positions already stored (same for every row of the batch)

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    def nbytes(self) -> int:
        """Bytes held by all tensors in the cache (for budget checks and benchmarks)."""
        return sum(_nbytes(state) for state in self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. drop finished sequences)."""
        self.layers = [_index_batch(state, index) for state in self.layers]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(o) for o in vars(obj).values())
    return 0


def _index_batch(obj: Any, index: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() > 0 else obj
    if isinstance(obj, tuple):
        return tuple(_index_batch(o, index) for o in obj)
    if isinstance(obj, list):
        return [_index_batch(o, index) for o in obj]
    if isinstance(obj, dict):
        return {k: _index_batch(v, index) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in vars(obj).items():
            setattr(obj, k, _index_batch(v, index))
        return obj
    return obj
