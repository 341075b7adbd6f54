"""SAM ViT-B image encoder as used by DeepEncoder: windowed ViT, neck to ``out_chans``, 16x conv compressor.

Reference §2.1. Module and parameter names equal the official ones, so registering this module as
``sam_model`` yields the official ``model.sam_model.*`` keys. Sizes come from ``SamConfig`` so that the
scaled-down presets reuse the same code. Window blocks zero-pad the grid with no attention mask (padded
tokens take part, as in the official code); decomposed relative position is passed to SDPA as ``attn_mask``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import SamConfig
from optictx.errors import ConfigError

LN_EPS = 1e-6  # the official builder hard-codes LayerNorm(eps=1e-6) everywhere in SAM


def resize_abs_pos(pos_embed: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize the [1, S, S, C] abs-pos table to the token grid: bicubic + antialias in fp32 (reference §12.1)."""
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    grid = pos_embed.permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=hw, mode="bicubic", antialias=True, align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a [L, head_dim] rel-pos table to ``length`` rows (fp32), as SAM does."""
    if rel_pos.shape[0] == length:
        return rel_pos
    table = rel_pos.float().t().unsqueeze(0)  # [1, head_dim, L]
    table = F.interpolate(table, size=length, mode="linear")
    return table.squeeze(0).t().to(rel_pos.dtype)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings [q_size, k_size, head_dim] by the SAM ``get_rel_pos`` rule."""
    table = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[relative.long()]


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Decomposed rel-pos bias [N, H*W, H*W] for queries q [N, H*W, d] (unscaled q, as the official code)."""
    h, w = hw
    r_h = get_rel_pos(h, h, rel_pos_h)
    r_w = get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    # einsum may return permuted strides; the broadcast sum inherits them and the reshape below would then
    # copy the whole [N, HW, HW] mask, so make the small factors contiguous first
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h).contiguous()  # [N, h, w, kh]
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w).contiguous()  # [N, h, w, kw]
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # [N, h, w, kh, kw]
    return bias.reshape(q.shape[0], h * w, h * w)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nWin, window, window, C], zero-padding H and W up to a multiple of window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``: stitch windows back and crop the padding."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1], :].contiguous()


class Attention(nn.Module):
    """Multi-head attention over a [B, H, W, C] grid with decomposed relative position."""

    def __init__(self, dim: int, heads: int, rel_size: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # rel_pos_zero_init=True in the official builder
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        split = (b, self.heads, h * w, -1)
        out = F.scaled_dot_product_attention(q.view(split), k.view(split), v.view(split), attn_mask=bias.view(split))
        out = out.view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()  # exact erf GELU, as the official nn.GELU default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Block(nn.Module):
    """Pre-LN ViT block; ``window > 0`` means windowed attention, 0 means global attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, rel_size=window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded = window_partition(y, self.window)  # padding happens after norm1: zeros
            y = window_unpartition(self.attn(windows), self.window, padded, hw)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm over [B, C, H, W] (SAM neck)."""

    def __init__(self, channels: int, eps: float = LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # BCHW -> BHWC


class ImageEncoderViT(nn.Module):
    """SAM ViT-B + neck + net_2/net_3: [B, 3, H, W] -> [B, downsample_channels[-1], H/(4*patch), W/(4*patch)]."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.width))
        globals_ = set(cfg.global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, 0 if i in globals_ else cfg.window_size, grid)
            for i in range(cfg.layers)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        if len(cfg.downsample_channels) != 2:
            raise ConfigError(
                f"sam downsample_channels must hold 2 values (net_2, net_3), got {cfg.downsample_channels}"
            )
        c2, c3 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(cfg.out_chans, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + resize_abs_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            x = blk(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))
