"""DeepEncoder: SAM + CLIP + linear projector, laid out as decoder slots with newline and separator embeddings.

Reference §1, §2.3 and §3. Per image the slots are: the local tiles stitched into one (nh*h2)×(nw*h2) grid
with one ``image_newline`` after each full-width row (only when there are tiles), then the global view's
h×w grid with a newline per row, then one ``view_seperator`` (official spelling). Count:
``h(h+1) + 1 [+ (nh*h2)(nw*h2 + 1)]``.

``_build_encoder`` is separate from ``__init__`` so that the full model can mix this class into its own
module and get the official flat keys (``model.sam_model.*``, ``model.vision_model.*``,
``model.projector.layers.*``, ``model.image_newline``, ``model.view_seperator``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from optictx.config import DeepseekOCRConfig, ProjectorConfig
from optictx.errors import ImageError
from optictx.model.clip import VitModel
from optictx.model.sam import ImageEncoderViT

# Views of one size go through SAM together, but a global block materialises a [B, heads, L, L] rel-pos mask
# (805 MB per 1024-px view in fp32), so a batch is cut into calls whose masks stay under this many bytes.
MASK_BYTES_PER_CALL = 2 << 30

if TYPE_CHECKING:  # preprocess sits upstream in the data walk; only its field names are used here
    from optictx.preprocess import ImageViews


class MlpProjector(nn.Module):
    """The ``linear`` projector type: one Linear(input_dim, n_embed) with bias, stored as ``layers``."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeepEncoder(nn.Module):
    """Pixels of image views -> per-image sequences of decoder-width slot embeddings."""

    def __init__(self, cfg: DeepseekOCRConfig):
        super().__init__()
        self._build_encoder(cfg)

    def _build_encoder(self, cfg: DeepseekOCRConfig) -> None:
        """Create exactly the official encoder attributes (does not call nn.Module.__init__)."""
        cfg.validate()
        n_embed = cfg.projector_config.n_embed
        self.sam_model = ImageEncoderViT(cfg.vision_config.sam)
        self.vision_model = VitModel(cfg.vision_config.clip)
        self.projector = MlpProjector(cfg.projector_config)
        self.image_newline = nn.Parameter(torch.randn(n_embed) / n_embed**0.5)
        self.view_seperator = nn.Parameter(torch.randn(n_embed) / n_embed**0.5)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, h*w, n_embed] (h = H/64 for the official patch 16)."""
        return self.feature_grid(pixel_values).flatten(1, 2)

    def feature_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, h, w, n_embed] token grid.

        Runs on the device and in the dtype of the weights; only the position-table resizes run in fp32.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ImageError(f"DeepEncoder expects pixels shaped [B, 3, H, W], got {list(pixel_values.shape)}")
        weight = self.projector.layers.weight
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)  # views are built on the CPU
        sam = self.sam_model(x)  # [B, C3, h, w]
        clip = self.vision_model(x.shape[0], sam)  # [B, 1 + h*w, C3], CLS first
        fused = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # [CLIP, SAM] order
        return self.projector(fused).view(sam.shape[0], sam.shape[2], sam.shape[3], -1)

    def _grids_by_shape(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """feature_grid() once per distinct pixel shape (one batched call); one [n, h, w, C] per input."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape[-2:])].append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for (height, width), idx in groups.items():
            batch = [images[i].reshape(-1, 3, height, width) for i in idx]
            pixels = torch.cat(batch)
            step = self._views_per_call(height, width)
            grids = torch.cat([self.feature_grid(chunk) for chunk in pixels.split(step)])
            for i, g in zip(idx, grids.split([b.shape[0] for b in batch])):
                out[i] = g
        return out

    def _views_per_call(self, height: int, width: int) -> int:
        """How many views of this size fit one SAM call under MASK_BYTES_PER_CALL."""
        patch = self.sam_model.patch_embed.proj.stride[0]
        tokens = (height // patch) * (width // patch)
        heads = self.sam_model.blocks[0].attn.heads
        mask_bytes = heads * tokens * tokens * self.sam_model.pos_embed.element_size()
        return max(1, MASK_BYTES_PER_CALL // max(1, mask_bytes))

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, C] -> [rows * (cols + 1), C] with image_newline after every row."""
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def encode(self, views: Sequence["ImageViews"]) -> list[torch.Tensor]:
        """One [n_slots_i, n_embed] tensor per image, in the official order: local, global, separator."""
        for v in views:
            _check_views(v)
        globals_ = self._grids_by_shape([v.global_view for v in views])
        tiled = [i for i, v in enumerate(views) if v.crops.shape[0] > 0]
        crops = dict(zip(tiled, self._grids_by_shape([views[i].crops for i in tiled])))
        out = []
        for i, v in enumerate(views):
            parts = []
            if i in crops:
                nw, nh = v.grid
                _, h2, w2, c = crops[i].shape
                # tile i sits at row i // nw, column i % nw: stitch into one (nh*h2) x (nw*w2) grid
                stitched = crops[i].view(nh, nw, h2, w2, c).permute(0, 2, 1, 3, 4).reshape(nh * h2, nw * w2, c)
                parts.append(self._with_newlines(stitched))
            parts.append(self._with_newlines(globals_[i][0]))
            parts.append(self.view_seperator.to(globals_[i].dtype)[None])
            out.append(torch.cat(parts))
        return out

    forward = encode


def _check_views(v: "ImageViews") -> None:
    """Reject views whose tensors disagree with their tile grid (a preprocessing bug or a hand-built input)."""
    gv, crops = v.global_view, v.crops
    if gv.dim() != 3 or gv.shape[0] != 3:
        raise ImageError(f"global_view must be [3, H, W], got {list(gv.shape)}")
    if crops.dim() != 4 or (crops.shape[0] and crops.shape[1] != 3):
        raise ImageError(f"crops must be [n, 3, T, T], got {list(crops.shape)}")
    nw, nh = v.grid
    if crops.shape[0] and crops.shape[0] != nw * nh:
        raise ImageError(f"{crops.shape[0]} crops do not fill the tile grid nw={nw} x nh={nh}")
