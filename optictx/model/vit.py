"""Arbitrary-resolution ViT (14-px patches, 2D RoPE) and the 3×3 channel merge of "Thinking with Visual
Primitives": 756² px -> 54×54 = 2,916 patches -> 18×18 = 324 tokens for the language model.

* Sizes are multiples of 42 px (patch 14 × merge 3) so the merge never pads; ``resize_for_vit`` picks the
  size with the same rule as ``budget.resize_for_primitives`` (it *is* that function), so the model's token
  counts always equal the budget's.
* Position: 2D RoPE inside the ViT (first half of every head rotates with the row, second half with the
  column; interleaved pairs as ``mla.py``), so any grid size works without resizing a position table.
* ``Merge3x3``: [B, H/14, W/14, C] -> [B, H/42, W/42, 9C] -> LayerNorm -> Linear -> GELU -> Linear, plus a
  *frame stamp* [mine]: Fourier features of each token's centre in the image frame (0..1), projected and
  added. The language model only has 1D RoPE and no row tokens, so without it the grid width (and hence
  where a token sits) would have to be guessed from content; coordinates in answers are 0-999 of the frame.
* Token order (``cfg.image_token_order``): "raster", or "block2x2" [mine, lineage §3.5]: complete 2×2 cells
  first (cell-raster order, each cell's 4 tokens contiguous), then the odd right column, then the odd bottom
  row. CSA compresses 4 consecutive sequence slots, so when the image span starts on a multiple of 4 every
  CSA entry of a full cell is an 84×84-px square (756² px -> 81 entries, 7,056 px per entry).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optictx.budget import resize_for_primitives
from optictx.config import PrimitivesConfig
from optictx.errors import ConfigError, ImageError
from optictx.model.mla import apply_rope_interleaved, rope_angles

FRAME_FREQS = 8  # Fourier octaves of the frame stamp: 2^7 π spans finer than one token at 384 tokens/side


def resize_for_vit(width: int, height: int, cfg: PrimitivesConfig) -> tuple[int, int]:
    """(width, height) in px for the ViT: multiples of 42, aspect kept, merged tokens in [min, max]."""
    return resize_for_primitives(width, height, cfg.min_image_tokens, cfg.max_image_tokens,
                                 cfg.patch_size, cfg.merge_size)


def prepare_vit_image(image, cfg: PrimitivesConfig) -> torch.Tensor:
    """PIL image -> normalised [3, H, W] at ``resize_for_vit`` size (bicubic), the ViT's input."""
    from PIL import Image

    from optictx.preprocess import to_tensor

    w, h = resize_for_vit(image.width, image.height, cfg)
    return to_tensor(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))


def token_order(h: int, w: int, order: str) -> torch.Tensor:
    """Raster indices of an h×w token grid in sequence order ("raster" or "block2x2", see module doc)."""
    if order == "raster":
        return torch.arange(h * w)
    if order != "block2x2":
        raise ConfigError(f"image_token_order {order!r} is not supported; use 'raster' or 'block2x2'")
    h2, w2 = h // 2 * 2, w // 2 * 2
    cells = [
        (r + dr) * w + c + dc
        for r in range(0, h2, 2) for c in range(0, w2, 2) for dr in (0, 1) for dc in (0, 1)
    ]
    right = [r * w + w - 1 for r in range(h2)] if w % 2 else []
    bottom = [(h - 1) * w + c for c in range(w)] if h % 2 else []
    return torch.tensor(cells + right + bottom, dtype=torch.long)


# --------------------------------------------------------------------------- ViT
class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int, rope_theta: float = 10000.0):
        super().__init__()
        if width % heads or (width // heads) % 4:
            raise ConfigError(f"vision_width {width} / vision_heads {heads} must give a head dim divisible by 4")
        self.heads, self.head_dim, self.rope_theta = heads, width // heads, rope_theta
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = self._rope_2d(q, rows, cols), self._rope_2d(k, rows, cols)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _rope_2d(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        cos_r, sin_r = rope_angles(rows[None], half, self.rope_theta)
        cos_c, sin_c = rope_angles(cols[None], half, self.rope_theta)
        return torch.cat([apply_rope_interleaved(x[..., :half], cos_r, sin_r),
                          apply_rope_interleaved(x[..., half:], cos_c, sin_c)], dim=-1)


class VisionBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm1(x))``; ``x += mlp(norm2(x))`` (GELU MLP, 4× wide)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisionAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rows, cols)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """pixels [B, 3, H, W] (H, W multiples of the patch) -> patch features [B, H/14, W/14, C]."""

    def __init__(self, cfg: PrimitivesConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg.vision_width, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(cfg.vision_width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B, C, h, w]
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        rows = torch.arange(h, device=x.device).repeat_interleave(w)
        cols = torch.arange(w, device=x.device).repeat(h)
        for block in self.blocks:
            x = block(x, rows, cols)
        return self.norm(x).view(b, h, w, c)


class Merge3x3(nn.Module):
    """Concatenate each 3×3 patch group along channels, project to the LM width, add the frame stamp."""

    def __init__(self, cfg: PrimitivesConfig):
        super().__init__()
        self.m = cfg.merge_size
        merged = cfg.vision_width * self.m * self.m
        self.norm = nn.LayerNorm(merged, eps=1e-6)
        self.fc1 = nn.Linear(merged, cfg.hidden_size)
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.frame_proj = nn.Linear(4 * FRAME_FREQS, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h·m, w·m, C] -> [B, h, w, hidden]."""
        x = merge_channels(x, self.m)
        x = self.fc2(F.gelu(self.fc1(self.norm(x))))
        return x + self.frame_proj(frame_features(x.shape[1], x.shape[2], x.device).to(x.dtype))


def merge_channels(x: torch.Tensor, m: int) -> torch.Tensor:
    """[B, h·m, w·m, C] -> [B, h, w, m·m·C]; each m×m group is concatenated in raster order."""
    b, hp, wp, c = x.shape
    h, w = hp // m, wp // m
    return x.view(b, h, m, w, m, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, m * m * c)


def frame_features(h: int, w: int, device: torch.device) -> torch.Tensor:
    """[h, w, 4F]: sin/cos(2^k·π·u) of each token centre (u = (i + 0.5) / n in 0..1) for rows and columns."""
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    freqs = math.pi * 2.0 ** torch.arange(FRAME_FREQS, device=device, dtype=torch.float32)
    fy, fx = y[:, None] * freqs, x[:, None] * freqs  # [h, F], [w, F]
    fy = torch.cat([fy.sin(), fy.cos()], -1)[:, None, :].expand(h, w, -1)
    fx = torch.cat([fx.sin(), fx.cos()], -1)[None, :, :].expand(h, w, -1)
    return torch.cat([fy, fx], dim=-1)


class PrimitivesVisionEncoder(nn.Module):
    """Images (each [3, H, W], any multiple-of-42 size) -> one [N_i, hidden] token tensor per image."""

    def __init__(self, cfg: PrimitivesConfig):
        super().__init__()
        self.unit = cfg.patch_size * cfg.merge_size
        self.order = cfg.image_token_order
        token_order(2, 2, self.order)  # fail at build time on a bad order name
        self.vit = VisionTransformer(cfg)
        self.merger = Merge3x3(cfg)

    def forward(self, pixel_values: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        images = list(pixel_values)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # same size -> one batched ViT call
        for i, img in enumerate(images):
            groups[self._check(img, i)].append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        param = self.vit.patch_embed.weight
        for (h, w), idx in groups.items():
            batch = torch.stack([images[i] for i in idx]).to(device=param.device, dtype=param.dtype)
            tokens = self.merger(self.vit(batch))  # [n, h/42, w/42, D]
            hh, ww = h // self.unit, w // self.unit
            order = token_order(hh, ww, self.order).to(tokens.device)
            flat = tokens.reshape(len(idx), hh * ww, -1)[:, order]
            for j, i in enumerate(idx):
                out[i] = flat[j]
        return out  # type: ignore[return-value]

    def _check(self, img: torch.Tensor, i: int) -> tuple[int, int]:
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
            raise ImageError(f"image {i}: expected a [3, H, W] tensor, got {getattr(img, 'shape', type(img))}")
        h, w = int(img.shape[1]), int(img.shape[2])
        if h % self.unit or w % self.unit or h == 0 or w == 0:
            raise ImageError(
                f"image {i} is {w}x{h} px; the ViT needs sides that are multiples of {self.unit} px — "
                "resize it with optictx.model.vit.prepare_vit_image (or resize_for_vit)"
            )
        return h, w
