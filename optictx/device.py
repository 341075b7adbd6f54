"""Pick the device and the compute dtype at run time.

On CPUs without native bf16 (AVX2-only hosts) bf16 matmuls are 30-180x slower than fp32, so we use fp32
there; with AVX512_BF16 or AMX, bf16 is ~3x faster. fp16 is never used on a CPU.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512_BF16 or AMX-BF16 (override with OPTICTX_CPU_BF16=0/1)."""
    forced = os.environ.get("OPTICTX_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPUs that support it and on CPUs with native bf16; fp32 otherwise. Never fp16 on a CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """'auto'/None -> pick_dtype; 'bf16'/'bfloat16', 'fp32'/'float32', 'fp16'/'float16' (GPU only)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return pick_dtype(device)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        from optictx.errors import ConfigError
        raise ConfigError(f"unknown dtype {name!r}; use auto, bf16, fp32 or fp16")
    return table[name]
