"""SAM ViT-B image encoder as used by DeepEncoder: windowed ViT, neck to ``out_chans``, 16x conv compressor.

Reference §2.1. Module and parameter names equal the official ones, so registering this module as
``sam_model`` yields the official ``model.sam_model.*`` keys. Sizes come from ``SamConfig`` so that the
scaled-down presets reuse the same code. Window blocks zero-pad the grid with no attention mask (padded
tokens take part, as in the official code); decomposed relative position is an additive SDPA ``attn_mask``.

``forward`` computes the official values in less time and memory (the bias is built a chunk at a time, the
padding is never projected); ``reference_forward`` keeps the official computation order as the baseline
that tests and ``benchmarks/encoder.py`` compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import SamConfig
from optictx.errors import ConfigError

LN_EPS = 1e-6  # the official builder hard-codes LayerNorm(eps=1e-6) everywhere in SAM
# Bytes of rel-pos bias per SDPA call (one head of a 1024-px view). Smaller chunks mean more SDPA calls, each
# a parallel region that costs a scheduling slice when the cores are oversubscribed; larger ones page-fault
# more scratch. At one thread 16-256 MiB all took 20-27% less time than one full mask (1024 px, global).
BIAS_CHUNK_BYTES = 64 << 20


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


def rel_pos_factors(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two thin factors of the decomposed rel-pos bias for queries q [N, H*W, d] (unscaled, as official):
    [N, H*W, H, 1] and [N, H*W, 1, W]; their broadcast sum, flattened, is the [N, H*W, H*W] bias."""
    h, w = hw
    r_h = get_rel_pos(h, h, rel_pos_h)
    r_w = get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    # einsum may return permuted strides; the reshapes make the small factors contiguous so that the
    # broadcast sum comes out contiguous and flattening it is free
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h).reshape(q.shape[0], h * w, h, 1)
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w).reshape(q.shape[0], h * w, 1, w)
    return bias_h, bias_w


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Decomposed rel-pos bias [N, H*W, H*W] for queries q [N, H*W, d], materialised whole (official)."""
    bias_h, bias_w = rel_pos_factors(q, rel_pos_h, rel_pos_w, hw)
    return (bias_h + bias_w).flatten(-2)


def rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
) -> torch.Tensor:
    """SDPA with the decomposed rel-pos bias, q, k, v [N, H*W, d] (N = items x heads) -> [N, H*W, d].

    Materialising the whole bias ([N, L, L]: 805 MB per 1024-px view) costs about 0.6 s of a ~2 s global
    attention at one thread, mostly page faults and memory traffic. Here each SDPA call gets the bias of a
    group of (item, head) pairs, or of one pair and a slice of query rows, under BIAS_CHUNK_BYTES. Splitting
    by heads before rows keeps each call's query count high (the CPU kernel's big query blocks) and reads
    each k/v once. Same values as one mask.
    """
    n, length, _ = q.shape
    bias_h, bias_w = rel_pos_factors(q, rel_pos_h, rel_pos_w, hw)
    row_bytes = length * q.element_size()
    rows = min(length, max(1, BIAS_CHUNK_BYTES // row_bytes))
    group = min(n, max(1, BIAS_CHUNK_BYTES // (row_bytes * length))) if rows == length else 1
    # one scratch block for every chunk's bias: fresh blocks this large are mmap'd and page-faulted each
    # time; autograd needs fresh tensors, so training (tiny grids) allocates per chunk instead
    recording = torch.is_grad_enabled() and (q.requires_grad or rel_pos_h.requires_grad)
    scratch = None if recording else q.new_empty(group, rows, length)
    outs = []
    for i in range(0, n, group):
        parts = []
        for s in range(0, length, rows):
            bh, bw = bias_h[i:i + group, s:s + rows], bias_w[i:i + group, s:s + rows]
            if scratch is None:
                mask = bh + bw
            else:
                mask = torch.add(bh, bw, out=scratch[: bh.shape[0], : bh.shape[1]].unflatten(-1, hw))
            attn = F.scaled_dot_product_attention(
                q[None, i:i + group, s:s + rows], k[None, i:i + group], v[None, i:i + group],
                attn_mask=mask.flatten(-2)[None],
            )
            parts.append(attn[0])
        outs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def window_partition(
    x: torch.Tensor, window: int, fill: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nWin, window, window, C], padding H and W up to a multiple of window with ``fill``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    hp, wp = h + pad_h, w + pad_w
    if pad_h or pad_w:
        grid = x.new_empty(b, hp, wp, c)
        grid[:, :h, :w] = x
        grid[:, h:] = fill
        grid[:, :h, w:] = fill
        x = grid
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
    return x[:, : hw[0], : hw[1], :]


class Attention(nn.Module):
    """Multi-head attention over a [B, H, W, C] grid (or its windows) with decomposed relative position."""

    def __init__(self, dim: int, heads: int, rel_size: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # rel_pos_zero_init=True in the official builder
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """x [B, H, W, C] -> [B, H, W, C]; ``window > 0``: attention inside zero-padded window x window tiles.

        The official code pads x and projects the padding too. A zero token projects to exactly the qkv
        bias, so q/k/v are computed on the real tokens and the padding is filled with the bias; the output
        projection likewise runs only on the tokens that are kept (16% fewer rows at 1024 px).
        """
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        padded = (h, w)
        if window > 0:
            qkv, padded = window_partition(qkv, window, fill=self.qkv.bias.to(qkv.dtype))
        n, gh, gw, _ = qkv.shape
        d = c // self.heads
        qkv = qkv.view(n, gh * gw, 3, self.heads, d).permute(2, 0, 3, 1, 4).reshape(3, n * self.heads, gh * gw, d)
        out = rel_pos_attention(*qkv.unbind(0), self.rel_pos_h, self.rel_pos_w, (gh, gw))
        out = out.reshape(n, self.heads, gh, gw, d).permute(0, 2, 3, 1, 4).reshape(n, gh, gw, c)
        if window > 0:
            out = window_unpartition(out, window, padded, (h, w))
        return self.proj(out)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official computation, kept as the baseline the fast path is tested and benchmarked against:
        one [B, heads, L, L] additive mask passed to SDPA (x is the grid or its already padded windows)."""
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
        x = x + self.attn(self.norm1(x), self.window)
        return x + self.mlp(self.norm2(x))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official block: pad after norm1, project every padded token, one full mask per attention."""
        y = self.norm1(x)
        if self.window > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded = window_partition(y, self.window)  # padding happens after norm1: zeros
            y = window_unpartition(self.attn.reference_forward(windows), self.window, padded, hw).contiguous()
        else:
            y = self.attn.reference_forward(y)
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
        return self._run(x, reference=False)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same output through the official computation order (blocks' ``reference_forward``): the baseline."""
        return self._run(x, reference=True)

    def _run(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + resize_abs_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            x = blk.reference_forward(x) if reference else blk(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))
