"""Checkpoint I/O: safetensors only, official key names, hub download when online, pickle refused.

An official DeepSeek-OCR folder (``config.json`` + ``model-00001-of-000001.safetensors`` + index) loads
as is; ``save_pretrained`` writes the same layout. Loading builds the model with its parameters on the
``meta`` device and assigns each tensor as it is read (cast per tensor), so the 3.3B model is never
allocated twice. Every header is checked before any data is read: a lying or corrupt file is a
``WeightsError``, never a crash or a silent partial load.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from optictx.config import DeepseekOCRConfig
from optictx.device import default_device, resolve_dtype
from optictx.errors import ModelNotFoundError, WeightsError
from optictx.model.vlm import IMAGE_TOKEN_ID, DeepseekOCRForCausalLM

SINGLE_FILE = "model-00001-of-000001.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
BUNDLED_DIR = Path(__file__).parent / "weights"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# --------------------------------------------------------------------------- file checks
def refuse_pickle(path: Path) -> None:
    """Raise for pickle/zip checkpoints (by suffix or magic bytes): loading one can run arbitrary code."""
    with open(path, "rb") as f:
        head = f.read(9)
    # pickle protocol 2-5 opens with 0x80 <protocol>; a safetensors header length can too, but then its
    # 9th byte opens the JSON header with "{"
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{"
    if path.suffix.lower() in PICKLE_SUFFIXES or pickled or head[:4] == b"PK\x03\x04":
        raise WeightsError(
            f"refusing to load pickle checkpoint {path}: pickle can execute code. "
            "Convert it once in a trusted environment to safetensors (safetensors.torch.save_file)."
        )


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Checks what a lying header could get wrong: the header length against the file size, each tensor's
    byte range against the data section, and the range length against dtype × shape.
    """
    refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise WeightsError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        _check_entry(path, name, info, data_size)
    return header


def _check_entry(path: Path, name: str, info: dict, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets") from None
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WeightsError(f"{path}: tensor {name!r} has an invalid shape {shape}")
    numel = 1
    for d in shape:
        numel *= d
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
        raise WeightsError(
            f"{path}: tensor {name!r} points at bytes [{start}, {end}) outside the {data_size}-byte data section"
        )
    if end - start != numel * _ITEMSIZE[dtype]:
        raise WeightsError(
            f"{path}: header lies about {name!r}: {dtype}{shape} needs {numel * _ITEMSIZE[dtype]} bytes, "
            f"the file gives it {end - start}"
        )


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (file, folder, or index json)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"no checkpoint at {path}")
    if path.is_file() and path.name.endswith(".json"):
        return _from_index(path)
    if path.is_file():
        return {name: path for name in read_header(path)}
    if (path / INDEX_FILE).is_file():
        return _from_index(path / INDEX_FILE)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise WeightsError(f"refusing to load pickle checkpoint(s) {pickles} in {path}; only safetensors is loaded")
        raise WeightsError(f"no *.safetensors file in {path}")
    out: dict[str, Path] = {}
    for f in files:
        out |= {name: f for name in read_header(f)}
    return out


def _from_index(index: Path) -> dict[str, Path]:
    """Read ``weight_map`` and check it against the shards' own headers (an index can lie too)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
    shards = {name: index.parent / f for name, f in weight_map.items()}
    for shard in sorted(set(shards.values())):
        if not shard.is_file():
            raise WeightsError(f"{index} names shard {shard.name}, which is missing")
        have = set(read_header(shard))
        claimed = {n for n, s in shards.items() if s == shard}
        if claimed - have:
            raise WeightsError(f"{index} maps {_first(claimed - have)} to {shard.name}, which does not hold them")
    return shards


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# --------------------------------------------------------------------------- reading
def iter_tensors(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, floating tensors cast to ``dtype`` (memory: one tensor extra)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in checkpoint_files(path).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in names:
                    t = sf.get_tensor(name)
                    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    yield name, t.to(device=device, dtype=cast)
        except SafetensorError as e:
            raise WeightsError(f"{f}: cannot read safetensors data ({e})") from None


def load_state_dict(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a dict (file, folder with one file, or sharded folder with an index)."""
    return dict(iter_tensors(path, dtype, device))


def check_keys(expected: dict[str, torch.Size], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise a WeightsError naming the first few missing, unexpected and mis-shaped tensors."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    wrong = {k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k])}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if wrong:
        problems.append(
            f"{len(wrong)} with the wrong shape: "
            + ", ".join(f"{k} file {list(found[k])} vs model {list(expected[k])}" for k in sorted(wrong)[:5])
        )
    if problems:
        raise WeightsError(f"{where} does not match the model config: " + "; ".join(problems))


def load_into(model: nn.Module, path: str | Path, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """Check names/shapes from the headers alone, then assign tensors to ``model`` (params may be on meta)."""
    files = checkpoint_files(path)
    headers = {f: read_header(f) for f in set(files.values())}
    found = {name: tuple(headers[f][name]["shape"]) for name, f in files.items()}
    check_keys({k: v.shape for k, v in model.state_dict().items()}, found, str(path))
    model.load_state_dict(dict(iter_tensors(path, dtype, device)), strict=True, assign=True)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise WeightsError(f"{name} was not filled by {path} (still on the meta device)")
    return model


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create modules with parameters on ``meta`` (no memory, no init cost) but real buffers.

    Unlike ``with torch.device("meta")``, buffers (e.g. CLIP's ``position_ids``, which no checkpoint
    holds) keep their values; only parameters, which loading replaces anyway, become placeholders.
    ``nn.init`` calls on meta tensors are skipped: they do nothing useful, and the first meta
    ``normal_`` imports torch._dynamo (6-8 s on our CPUs).
    """
    original = nn.Module.register_parameter
    inits = {n: f for n, f in vars(nn.init).items() if n.endswith("_") and not n.startswith("_") and callable(f)}

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    def skip_meta(fn):
        @functools.wraps(fn)
        def init(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)

        return init

    nn.Module.register_parameter = register
    for n, f in inits.items():
        setattr(nn.init, n, skip_meta(f))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for n, f in inits.items():
            setattr(nn.init, n, f)


# --------------------------------------------------------------------------- resolving names
def _hub_cache() -> Path:
    """The hub cache folder, read at call time (huggingface_hub freezes its constants at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder, a bundled model name (``optictx/weights/<name>``), or a hub id ``owner/name``.

    Hub ids download with ``huggingface_hub`` when online; offline (``HF_HUB_OFFLINE=1`` or no network)
    the local hub cache is used, and when it lacks the model the error names the folder to fill.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file; pass the folder holding config.json and the safetensors")
    name = str(name_or_path)
    if (BUNDLED_DIR / name).is_dir():
        return BUNDLED_DIR / name
    if not _REPO_ID.match(name):
        bundled = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()) if BUNDLED_DIR.is_dir() else []
        raise ModelNotFoundError(
            f"no model folder {path}; bundled models: {bundled or 'none'}; or give a hub id owner/name"
        )
    return _snapshot(name)


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = _hub_cache()
    online_error = None
    if not _offline():
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # noqa: BLE001 - network down, unknown repo, gated, ...: fall back to the cache
            online_error = e
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        why = "HF_HUB_OFFLINE=1" if online_error is None else f"download failed: {online_error}"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache ({why}). Fill {folder} by running "
            f"`hf download {repo_id}` on a machine with network (same HF_HOME / HF_HUB_CACHE), "
            "or pass a local folder holding config.json and the safetensors."
        ) from None


# --------------------------------------------------------------------------- whole models
def from_pretrained(
    path_or_repo_id: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
) -> DeepseekOCRForCausalLM:
    """Build ``DeepseekOCRForCausalLM`` from ``config.json`` and load its safetensors by the official names."""
    folder = resolve_model_path(path_or_repo_id)
    cfg = DeepseekOCRConfig.from_json_file(folder / "config.json")
    # not a DeepseekOCRConfig field: the official file omits it (128815); our tiny models write their own
    image_token_id = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("image_token_id")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    with params_on_meta():
        model = DeepseekOCRForCausalLM(cfg) if image_token_id is None else DeepseekOCRForCausalLM(cfg, image_token_id)
    load_into(model, folder, torch_dtype, device)
    return model.to(device).eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: nn.Module, cfg: DeepseekOCRConfig, directory: str | Path, dtype=None) -> Path:
    """Write config.json, ``model-00001-of-000001.safetensors`` and its index, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    tensors = {
        k: (v.to(torch_dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
    }
    _atomic(directory / SINGLE_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {k: SINGLE_FILE for k in sorted(tensors)},
    }
    _atomic(directory / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))
    config = cfg.to_dict()
    config["torch_dtype"] = config["language_config"]["torch_dtype"] = _dtype_name(torch_dtype)
    image_token_id = getattr(model, "image_token_id", None)
    if image_token_id is not None and image_token_id != IMAGE_TOKEN_ID:
        config["image_token_id"] = image_token_id
    _atomic(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    return directory


def _atomic(target: Path, write) -> None:
    """Write to a sibling temp file and ``os.replace`` it: readers never see a half-written file."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
