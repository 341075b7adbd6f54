"""DeepSeek-OCR image views: loading, modes, pad/stretch, Gundam tiling, normalisation (reference §4).

``load_image`` turns whatever a user hands us into a safe RGB ``PIL.Image`` or raises ``ImageError``;
``prepare_views`` turns that image into the exact tensors the official preprocessing makes, with counts
that :mod:`optictx.budget` predicts (tests hold them equal for every mode).
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from optictx.budget import Mode, count_tiles, decoder_slots, get_mode
from optictx.errors import ImageError

# Official pad colour: tuple(int(0.5 * 255)) -> 127, which normalises to -1/255 ≈ -0.0039.
PAD_COLOR = (127, 127, 127)
MEAN = STD = 0.5  # not the CLIP/ImageNet statistics (reference §4.1)
# Our own guard, below PIL's (89.5 MP warning, 179 MP error): an A4 page at 600 DPI is 35 MP.
DEFAULT_MAX_PIXELS = 64_000_000
_RESAMPLE = Image.Resampling.BICUBIC  # Pillow's default for RGB resize and ImageOps.pad, made explicit

ImageSource = Union[str, Path, bytes, bytearray, Image.Image]


# --------------------------------------------------------------------------- loading
def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``src`` (path, bytes or PIL image) as an upright RGB image, or raise ``ImageError``.

    EXIF orientation is applied (as the official loader does); animated images give their first frame;
    transparency is composited on white (the official ``convert('RGB')`` would expose whatever colour the
    transparent pixels hold, often black); 16-bit and float greyscale are scaled, not clipped. Sizes are
    checked from the header *before* decoding, so a decompression bomb costs nothing.
    """
    name = _describe(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = _open(src, name)
            _check_pixels(img, max_pixels, name)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img, name)
        except ImageError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageError(f"{name} is too large to decode safely (decompression-bomb guard: {e})") from e
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
            raise ImageError(f"{name} is corrupt or truncated: {e}") from e


def _describe(src: ImageSource) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"image bytes ({len(src)} B)"
    return "image"


def _open(src: ImageSource, name: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("image bytes are empty (0 bytes)")
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"no image file at {path}")
        data = path.read_bytes()
        if not data:
            raise ImageError(f"{path} is empty (0 bytes)")
    else:
        raise ImageError(f"expected a path, bytes or PIL image, got {type(src).__name__}")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image Pillow can read (corrupt or unsupported format)") from e


def _check_pixels(img: Image.Image, max_pixels: int, name: str) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; downscale it first "
            f"or pass a larger max_pixels if you trust the source"
        )


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode), mode="L")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name} has colour mode {img.mode!r}, which cannot be converted to RGB") from e


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit / 32-bit / float greyscale to 0..255: a plain RGB convert would clip everything above 255."""
    arr = arr.astype(np.float64)
    if mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0  # float images are 0..1 or 0..255 by convention
    else:
        top = 65535.0 if not arr.size or arr.max() <= 65535 else float(arr.max())
    return np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- views
@dataclass
class ImageViews:
    """The tensors one image becomes. ``crops`` is empty (n = 0) when the image is not tiled."""

    global_view: torch.Tensor  # [3, B, B] float32 in [-1, 1]
    crops: torch.Tensor  # [n, 3, T, T]
    grid: tuple[int, int]  # (nw, nh) columns, rows; (1, 1) when not tiled
    mode: Mode
    original_size: tuple[int, int]  # (w, h)

    @property
    def n_slots(self) -> int:
        """Decoder positions the image fills (equals ``budget.ocr_budget(...).decoder_slots``)."""
        return decoder_slots(self.mode, self.grid)

    @property
    def vision_tokens(self) -> int:
        return self.mode.global_side ** 2 + self.crops.shape[0] * self.mode.tile_side ** 2


def to_tensor(img: Image.Image) -> torch.Tensor:
    """``ToTensor`` + ``Normalize(0.5, 0.5)`` in float32, bit-identical to torchvision's two steps."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.to(torch.float32).div(255).sub(MEAN).div(STD)


def prepare_views(image: Image.Image, mode: Union[str, Mode] = "gundam") -> ImageViews:
    """Official DeepSeek-OCR views of an RGB image (reference §4.2–4.3).

    Native modes: ``image_size <= 640`` (nano/Tiny/Small) stretch to a square; Base/Large pad with grey,
    aspect kept. Gundam: tiles are the image stretched to ``(T·nw, T·nh)`` and cut in raster order; the
    global view is padded to ``base_size``. Images with both sides <= 640 get no tiles.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"prepare_views needs a PIL image (use load_image first), got {type(image).__name__}")
    m = get_mode(mode)
    img = image if image.mode == "RGB" else _to_rgb(image, "image")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    t = m.image_size
    if not m.crop_mode:
        side = m.image_size
        view = img.resize((side, side), _RESAMPLE) if m.stretches else _pad(img, side)
        return ImageViews(to_tensor(view), torch.zeros(0, 3, side, side), (1, 1), m, (w, h))
    grid = count_tiles(w, h, m.min_crops, m.max_crops, t)
    crops = torch.stack([to_tensor(c) for c in _tiles(img, grid, t)]) if grid[0] * grid[1] > 1 \
        else torch.zeros(0, 3, t, t)
    return ImageViews(to_tensor(_pad(img, m.base_size)), crops, grid, m, (w, h))


def _pad(img: Image.Image, side: int) -> Image.Image:
    """``ImageOps.pad``: fit inside side×side keeping aspect (upscaling small images), centre, grey fill."""
    return ImageOps.pad(img, (side, side), method=_RESAMPLE, color=PAD_COLOR)


def _tiles(img: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    """Stretch to the grid and cut ``tile``-px squares row by row (tile i at column i % nw, row i // nw)."""
    nw, nh = grid
    big = img.resize((tile * nw, tile * nh), _RESAMPLE)
    return [big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(nh) for c in range(nw)]
