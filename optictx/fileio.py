"""Crash-safe file writes shared by the batch OCR job, optical memory and training checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, data: bytes | Iterable[bytes], sync_dir: bool = True) -> None:
    """Write a temporary sibling (``.NAME.PID.tmp``), fsync it, then ``os.replace``: readers see the old file
    or the new one, never half. ``sync_dir=False`` leaves the directory fsync to a caller writing many files."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in ([data] if isinstance(data, bytes) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        if sync_dir:
            fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
