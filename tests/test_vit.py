"""ViT + 3×3 merge: token counts equal the budget's, 2D RoPE is relative, merge/order are exact permutations."""
import dataclasses

import pytest
import torch
from PIL import Image

from optictx.budget import primitives_budget, resize_for_primitives
from optictx.config import primitives_tiny
from optictx.errors import ImageError
from optictx.model.vit import (
    PrimitivesVisionEncoder,
    VisionAttention,
    merge_channels,
    prepare_vit_image,
    resize_for_vit,
    token_order,
)


def _cfg(**kw):
    return dataclasses.replace(primitives_tiny(), vision_width=32, vision_layers=1, vision_heads=2,
                               hidden_size=48, **kw)


def test_756_square_gives_2916_patches_and_324_tokens():
    torch.manual_seed(0)
    enc = PrimitivesVisionEncoder(_cfg())
    assert resize_for_vit(756, 756, primitives_tiny()) == (756, 756)
    with torch.no_grad():
        patches = enc.vit(torch.randn(1, 3, 756, 756))
        tokens = enc([torch.randn(3, 756, 756)])
    assert patches.shape[1] * patches.shape[2] == 2916 == primitives_budget(756, 756).patches
    assert tokens[0].shape == (324, 48)
    assert primitives_budget(756, 756).merged_tokens == 324


@pytest.mark.parametrize("size", [(756, 756), (1000, 500), (300, 2000), (20, 20), (4000, 3000), (640, 481)])
def test_resize_keeps_aspect_multiples_of_42_and_token_range(size):
    cfg = primitives_tiny()
    w, h = resize_for_vit(*size, cfg)
    assert (w, h) == resize_for_primitives(*size, cfg.min_image_tokens, cfg.max_image_tokens)
    assert w % 42 == 0 and h % 42 == 0
    assert cfg.min_image_tokens <= (w // 42) * (h // 42) <= cfg.max_image_tokens
    assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.25


def test_prepare_vit_image_and_token_counts_for_odd_grids():
    torch.manual_seed(1)
    cfg = _cfg()
    enc = PrimitivesVisionEncoder(cfg)
    img = Image.new("RGB", (400, 250), (200, 30, 30))
    pixels = prepare_vit_image(img, cfg)
    w, h = resize_for_vit(400, 250, cfg)
    assert pixels.shape == (3, h, w)
    with torch.no_grad():
        (tokens,) = enc([pixels])
    assert tokens.shape == ((h // 42) * (w // 42), 48)


def test_mixed_sizes_batch_equals_one_by_one():
    torch.manual_seed(2)
    enc = PrimitivesVisionEncoder(_cfg())
    imgs = [torch.randn(3, 84, 126), torch.randn(3, 126, 84), torch.randn(3, 84, 126)]
    with torch.no_grad():
        together = enc(imgs)
        alone = [enc([i])[0] for i in imgs]
    assert [t.shape[0] for t in together] == [6, 6, 6]
    for a, b in zip(together, alone):
        assert (a - b).abs().max() < 1e-5


def test_bad_images_raise_image_error():
    enc = PrimitivesVisionEncoder(_cfg())
    with pytest.raises(ImageError, match="multiples of 42"):
        enc([torch.randn(3, 100, 84)])
    with pytest.raises(ImageError, match=r"\[3, H, W\]"):
        enc([torch.randn(1, 84, 84)])


def test_2d_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(3)
    attn = VisionAttention(32, 2)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(rq, cq, rk, ck):
        a = attn._rope_2d(q, torch.tensor([rq]), torch.tensor([cq]))
        b = attn._rope_2d(k, torch.tensor([rk]), torch.tensor([ck]))
        return (a * b).sum(-1)

    assert torch.allclose(score(1, 2, 4, 7), score(4, 7, 7, 12), atol=1e-5)  # both moved by (3, 5)
    assert not torch.allclose(score(1, 2, 4, 7), score(1, 2, 4, 8), atol=1e-3)  # column offset matters
    assert not torch.allclose(score(1, 2, 4, 7), score(1, 2, 5, 7), atol=1e-3)  # row offset matters


def test_merge_concatenates_each_3x3_group_in_raster_order():
    x = torch.arange(6 * 9 * 2, dtype=torch.float32).view(1, 6, 9, 2)  # 6x9 patches, 2 channels
    merged = merge_channels(x, 3)
    assert merged.shape == (1, 2, 3, 18)
    expected = torch.cat([x[0, 3 + r, 6 + c] for r in range(3) for c in range(3)])
    assert torch.equal(merged[0, 1, 2], expected)


def test_block2x2_order_puts_full_cells_first():
    assert token_order(4, 4, "block2x2").tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    order = token_order(5, 7, "block2x2")
    assert sorted(order.tolist()) == list(range(35))
    for g in range(2 * 3):  # the 6 full cells: every aligned group of 4 is a 2x2 square
        rows, cols = zip(*(divmod(int(i), 7) for i in order[4 * g : 4 * g + 4]))
        assert max(rows) - min(rows) == 1 and max(cols) - min(cols) == 1
    assert order[24:].tolist() == [6, 13, 20, 27, 28, 29, 30, 31, 32, 33, 34]  # right column, bottom row
    assert token_order(3, 3, "raster").tolist() == list(range(9))


def test_frame_stamp_is_the_only_position_signal_for_a_flat_image():
    """A flat image gives identical patch features (RoPE is relative); the stamp tells tokens apart."""
    torch.manual_seed(4)
    enc = PrimitivesVisionEncoder(_cfg())
    flat = torch.full((3, 126, 84), 0.3)
    with torch.no_grad():
        (tokens,) = enc([flat])
        assert (tokens - tokens[0]).abs().amax(-1)[1:].min() > 1e-4
        enc.merger.frame_proj.weight.zero_()
        (tokens,) = enc([flat])
    assert (tokens - tokens[0]).abs().max() < 1e-5
