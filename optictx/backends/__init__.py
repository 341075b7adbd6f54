"""Inference backends behind one interface, chosen with ``--backend`` (CLI) or ``backend=`` (Python).

* ``torch`` (default): our own model code (:class:`optictx.ocr.OCR`), CPU or GPU, any mode, streaming.
* ``vllm``: the official DeepSeek-OCR weights served by vLLM >= 0.11.1 on an NVIDIA GPU, with optictx's
  image loading, prompts, n-gram guard settings and post-processing (``optictx[vllm]``).

Batch jobs over many files use Ray Data (``optictx[ray]``): :func:`optictx.backends.ray_batch.run_ray_ocr`.

Both optional backends import their heavy dependency lazily and raise :class:`BackendUnavailableError`
with the install command when it (or a GPU) is missing, so ``import optictx`` never needs them.
"""
from __future__ import annotations

from typing import Any

from optictx.errors import ConfigError, OptictxError

BACKENDS = ("torch", "vllm")


class BackendUnavailableError(OptictxError):
    """An optional backend was asked for but its package or hardware is missing."""

    exit_code = 3
    http_status = 503


def check_backend(name: str) -> str:
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return key


def make_ocr(backend: str = "torch", model: str = "tiny", **settings: Any):
    """An OCR object for ``backend`` with the ``OCR`` interface: ``ocr(image, page=...) -> PageResult``,
    ``ocr.batch(images)``, ``ocr.pdf(path)``, ``ocr.stream(image)``.

    ``settings`` are ``OCR``'s keyword arguments (mode, prompt, device, dtype, max_new_tokens, ngram_size,
    window_size, ...); the vLLM backend also takes vLLM engine arguments (gpu_memory_utilization, ...).
    This is what ``optictx ocr --backend`` calls.
    """
    if check_backend(backend) == "vllm":
        from optictx.backends.vllm_backend import VLLMOCR

        return VLLMOCR(model, **settings)
    from optictx.ocr import OCR

    return OCR(model, **settings)


def make_engine(backend: str = "torch", model: str = "tiny", **settings: Any):
    """The server's engine for ``backend`` (see ``optictx.serve.batching.Engine``)."""
    ocr = make_ocr(backend, model, **settings)
    if check_backend(backend) == "vllm":
        from optictx.backends.vllm_backend import VLLMEngine

        return VLLMEngine(ocr)
    from optictx.serve.batching import TorchEngine

    return TorchEngine(ocr, model_id=_model_id(model))


def _model_id(model: Any) -> str:
    """What ``/v1/models`` lists: the alias or hub id as given, or a folder's name."""
    from pathlib import Path

    text = str(model)
    if text in ("tiny", "ocr-tiny"):
        return "ocr-tiny"
    path = Path(text)
    return path.name if path.exists() else text
