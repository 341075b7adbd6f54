"""Image loading safety and the official DeepSeek-OCR views (reference §4)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from optictx.budget import MODES, ocr_budget
from optictx.errors import ImageError
from optictx.preprocess import PAD_COLOR, load_image, prepare_views, to_tensor


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _norm(v: int) -> float:
    return (v / 255 - 0.5) / 0.5


# --------------------------------------------------------------------------- views agree with budget
SIZES = [(1190, 1684), (600, 400), (2000, 500), (300, 900), (1000, 1000), (641, 200)]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "gundam-m"])
def test_views_match_budget(mode):
    for size in SIZES:
        img = Image.new("RGB", size, (30, 120, 200))
        views = prepare_views(img, mode)
        b = ocr_budget(*size, mode)
        m = MODES[mode]
        side = m.image_size if not m.crop_mode else m.base_size
        assert views.global_view.shape == (3, side, side) and views.global_view.dtype == torch.float32
        assert views.crops.shape == (b.n_tiles, 3, m.image_size, m.image_size)
        assert views.grid == b.tiles and views.original_size == size
        assert views.n_slots == b.decoder_slots and views.vision_tokens == b.vision_tokens


def test_gundam_m_views_match_budget():
    views = prepare_views(Image.new("RGB", (1500, 800)), "gundam-m")
    b = ocr_budget(1500, 800, "gundam-m")
    assert views.crops.shape == (b.n_tiles, 3, 1024, 1024) and views.global_view.shape == (3, 1280, 1280)
    assert views.n_slots == b.decoder_slots


def test_normalisation_is_exact():
    img = Image.fromarray(np.array([[[0, 127, 255]]], dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1)
    # torchvision's ToTensor (float32 /255) then Normalize (-0.5, /0.5), step by step in float32
    f32 = np.float32
    expected = [(f32(v) / f32(255) - f32(0.5)) / f32(0.5) for v in (0, 127, 255)]
    assert t.flatten().numpy().tolist() == [float(e) for e in expected]
    assert _norm(127) == pytest.approx(-0.0039, abs=1e-4)


def test_padded_modes_have_grey_border_and_match_imageops_pad():
    img = Image.new("RGB", (1000, 500), (200, 10, 10))
    for mode, side in [("base", 1024), ("large", 1280), ("gundam", 1024)]:
        g = prepare_views(img, mode).global_view
        assert torch.allclose(g[:, 0, :], torch.tensor(_norm(127)), atol=1e-7)  # top rows are padding
        assert torch.allclose(g[:, -1, :], torch.tensor(-0.0039), atol=1e-4)
        centre = g[:, side // 2, side // 2]
        assert centre.tolist() == pytest.approx([_norm(200), _norm(10), _norm(10)], abs=1e-6)
        expected = ImageOps.pad(img, (side, side), color=PAD_COLOR)
        assert torch.equal(g, to_tensor(expected))


def test_small_modes_stretch_without_padding():
    img = Image.new("RGB", (1000, 300), (50, 60, 70))
    for mode in ("nano", "tiny", "small"):
        g = prepare_views(img, mode).global_view
        assert torch.allclose(g, torch.tensor([_norm(50), _norm(60), _norm(70)]).view(3, 1, 1), atol=1e-6)


def test_tiles_are_cut_in_raster_order():
    nw, nh = 2, 3
    colours = [(40 * k, 255 - 30 * k, 17 * k) for k in range(nw * nh)]
    img = Image.new("RGB", (640 * nw, 640 * nh))
    for k, c in enumerate(colours):
        col, row = k % nw, k // nw
        img.paste(c, (col * 640, row * 640, (col + 1) * 640, (row + 1) * 640))
    views = prepare_views(img, "gundam")
    assert views.grid == (nw, nh) and views.crops.shape[0] == nw * nh
    for k, c in enumerate(colours):
        centre = views.crops[k, :, 320, 320]
        assert centre.tolist() == pytest.approx([_norm(v) for v in c], abs=1e-6)


def test_small_image_is_not_tiled_and_crops_empty():
    views = prepare_views(Image.new("RGB", (640, 480)), "gundam")
    assert views.crops.shape == (0, 3, 640, 640) and views.grid == (1, 1) and views.n_slots == 273


# --------------------------------------------------------------------------- loading
def test_load_image_sources(tmp_path):
    img = Image.new("RGB", (30, 20), (1, 2, 3))
    data = _png_bytes(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for src in (data, str(path), path, img):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20) and out.getpixel((0, 0)) == (1, 2, 3)


def test_alpha_palette_and_la_composite_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = load_image(_png_bytes(pal, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)
    assert load_image(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = load_image(_png_bytes(Image.fromarray(arr)))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_and_animated_and_exif(tmp_path):
    cmyk = Image.new("CMYK", (5, 5), (0, 0, 0, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    assert load_image(buf.getvalue()).getpixel((2, 2)) == pytest.approx((255, 255, 255), abs=2)

    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = load_image(buf.getvalue()).getpixel((0, 0))
    assert first[0] > 200 and first[2] < 50

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 0)).save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (20, 40)


def test_empty_missing_and_corrupt_inputs(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"this is not an image at all")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _png_bytes(noisy)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError):
        prepare_views("not an image", "base")


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all zeros: megapixels of image in kilobytes of file."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused():
    huge = _bomb_png(20000, 20000)  # 400 MP: over PIL's hard limit
    assert len(huge) < 200_000
    with pytest.raises(ImageError, match="too large"):
        load_image(huge, max_pixels=10**12)
    mid = _bomb_png(10000, 10000)  # 100 MP: PIL only warns; we refuse
    with pytest.raises(ImageError, match="too large"):
        load_image(mid, max_pixels=10**12)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_bomb_png(3000, 3000), max_pixels=1_000_000)
    assert load_image(_bomb_png(300, 200)).size == (300, 200)  # the builder makes real PNGs
