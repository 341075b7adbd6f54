"""SAM's fast path (chunked rel-pos bias, padding never projected) equals the official computation order
(``reference_forward``: one full [B, heads, L, L] mask, every padded token projected) on small configs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optictx.config import SamConfig
from optictx.model import sam as sam_mod
from optictx.model.sam import Attention, Block, ImageEncoderViT


def small_sam() -> ImageEncoderViT:
    """Window 3 on a 10x10 grid (160 px) pads to 12x12; the global block resizes its 15-row tables to 19."""
    cfg = SamConfig(width=32, layers=3, heads=2, global_attn_indexes=(1,), downsample_channels=(24, 32),
                    image_size=128, window_size=3, out_chans=16)
    enc = ImageEncoderViT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():  # random everywhere: the official init zeroes rel-pos, hiding bias bugs
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return enc.eval()


def record_masks(monkeypatch) -> list[tuple[int, ...]]:
    """Patch SDPA in sam.py to record every mask shape it is given."""
    shapes: list[tuple[int, ...]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sam_mod.F, "scaled_dot_product_attention", spy)
    return shapes


@pytest.mark.parametrize("pixels", [128, 160])
def test_encoder_fast_path_equals_reference(pixels):
    enc = small_sam()
    x = torch.randn(2, 3, pixels, pixels, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, ref = enc(x), enc.reference_forward(x)
    side = -(-pixels // 64)  # two stride-2 convs after patch 16, rounding up
    assert fast.shape == ref.shape == (2, 32, side, side)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,grid", [(0, (10, 10)), (3, (10, 10)), (3, (7, 5)), (0, (7, 5))])
def test_chunked_bias_equals_one_mask_at_every_chunk_split(monkeypatch, window, grid):
    """Budgets that force row slices (one pair, few rows), pair groups, and one call for everything."""
    blk = small_sam().blocks[1 if window == 0 else 0]
    assert blk.window == window
    x = torch.randn(2, *grid, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = blk.reference_forward(x)
        for budget in (7 * grid[0] * grid[1] * 4, 3 * 81 * 81 * 4, 1 << 30):
            monkeypatch.setattr(sam_mod, "BIAS_CHUNK_BYTES", budget)
            torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)


def test_global_mask_is_built_in_chunks_under_the_budget(monkeypatch):
    attn = small_sam().blocks[1].attn
    x = torch.randn(1, 10, 10, 32)
    monkeypatch.setattr(sam_mod, "BIAS_CHUNK_BYTES", 30 * 100 * 4)  # 30 query rows of 100 keys
    shapes = record_masks(monkeypatch)
    with torch.no_grad():
        attn(x)
    # 2 heads, each in row slices of 30, 30, 30, 10 -- never the whole [heads, 100, 100] mask
    assert shapes == [(1, 1, 30, 100)] * 3 + [(1, 1, 10, 100)] + [(1, 1, 30, 100)] * 3 + [(1, 1, 10, 100)]
    shapes.clear()
    with torch.no_grad():
        attn.reference_forward(x)
    assert shapes == [(1, 2, 100, 100)]


def test_window_padding_gets_the_qkv_bias_and_is_not_projected(monkeypatch):
    """Padded tokens are zeros after norm1, so their q/k/v is exactly the qkv bias; proj sees only real rows."""
    attn = small_sam().blocks[0].attn
    x = torch.randn(1, 7, 5, 32)
    rows = []
    attn.proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    with torch.no_grad():
        out = attn(x, window=3)
        padded, _ = sam_mod.window_partition(x, 3)  # zeros to 9x6, as the official code
        assert torch.equal(attn.qkv(torch.zeros(1, 32)), attn.qkv.bias[None])
        want = sam_mod.window_unpartition(attn.reference_forward(padded), 3, (9, 6), (7, 5))
    assert rows == [35, 54]  # fast path: 7*5 real tokens; reference: all 9*6 padded tokens
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_reference():
    """Training runs through the fast path too: its gradients must equal those of the official order."""
    blocks = [Block(16, 2, 2.0, window, grid=6) for window in (3, 0)]
    for blk in blocks:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in blk.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(2, 5, 4, 16, generator=g, requires_grad=True)
        grads = []
        for fn in (blk, blk.reference_forward):
            blk.zero_grad()
            x.grad = None
            fn(x).square().sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in blk.parameters()])
        for fast, ref in zip(*grads):
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_bf16_fast_path_stays_close_to_reference():
    attn = small_sam().blocks[1].attn.to(torch.bfloat16)
    x = torch.randn(1, 10, 10, 32).bfloat16()
    with torch.no_grad():
        fast, ref = attn(x), attn.reference_forward(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=0.02, atol=0.05)


def test_attention_accepts_default_global_call():
    """``Attention(x)`` without a window is global attention over the whole grid, as before."""
    attn = Attention(8, 2, rel_size=4)
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        x = torch.randn(1, 4, 4, 8)
        torch.testing.assert_close(attn(x), attn.reference_forward(x), rtol=1e-5, atol=1e-5)
