"""CLIP-L trunk of DeepEncoder (``vision_model``, official class ``VitModel``), fed with SAM's net_3 output.

Reference §2.2. The conv features stand in for CLIP's patch embeddings; a CLS token is prepended and the
position table (CLS row + S×S patch rows) is resized bicubically in fp32 to the actual grid. Pre-LN blocks
with a fused [q; k; v] projection, quick_gelu and no post-layernorm. ``pre_layrnorm`` keeps the official typo.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import ClipConfig


def resize_pos_embed(pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[1 + S*S, C] table -> [1 + h*w, C]: patch rows resized bicubic/antialias in fp32, CLS row unchanged."""
    side = math.isqrt(pos.shape[0] - 1)
    if (side, side) == tuple(hw):
        return pos
    cls_row, grid = pos[:1], pos[1:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=hw, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(hw[0] * hw[1], -1)
    return torch.cat([cls_row, grid], dim=0)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width))
        # In the checkpoint but unused by DeepEncoder (it passes SAM features as patch embeddings).
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)
        # Not in the official safetensors, hence non-persistent.
        self.register_buffer("position_ids", torch.arange(cfg.num_positions).unsqueeze(0), persistent=False)

    def forward(self, batch: int, patch_embeds: torch.Tensor) -> torch.Tensor:
        """patch_embeds [B, C, h, w] -> [B, 1 + h*w, C] with CLS first and resized positions added."""
        hw = (patch_embeds.shape[2], patch_embeds.shape[3])
        tokens = patch_embeds.flatten(2).transpose(1, 2)
        cls_tok = self.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
        x = torch.cat([cls_tok, tokens], dim=1)
        pos = resize_pos_embed(self.position_embedding(self.position_ids[0]), hw)
        return x + pos.to(x.dtype)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (the official ``pre_layrnorm`` is ``LayerNormfp32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class NoTPAttention(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv_proj = nn.Linear(cfg.width, cfg.width * 3, bias=True)
        self.out_proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        # rows of qkv_proj are [q; k; v], each split into heads
        q, k, v = self.qkv_proj(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, c))


class NoTPFeedForward(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_hidden_size, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class NoTPTransformerBlock(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_epsilon)
        self.self_attn = NoTPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_epsilon)
        self.mlp = NoTPFeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class NoTPTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(NoTPTransformerBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VitModel(nn.Module):
    """CLIP-L trunk: (batch or pixels, patch_embeds [B, C, h, w]) -> hidden states [B, 1 + h*w, C] (CLS first)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.transformer = NoTPTransformer(cfg)
        # pre_layernorm_epsilon equals layernorm_epsilon (1e-5) in the official config
        self.pre_layrnorm = LayerNormFp32(cfg.width, eps=cfg.layernorm_epsilon)

    def forward(
        self, pixel_values_or_batch_size: torch.Tensor | int, patch_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = pixel_values_or_batch_size
        batch = x if isinstance(x, int) else x.shape[0]
        if patch_embeds is None:  # plain CLIP on pixels; DeepEncoder always passes SAM features instead
            patch_embeds = self.embeddings.patch_embedding(x.to(self.embeddings.patch_embedding.weight.dtype))
        h = self.embeddings(batch, patch_embeds)
        return self.transformer(self.pre_layrnorm(h))
