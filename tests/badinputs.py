"""A corpus of bad (and valid-but-odd) inputs, generated in memory: nothing is downloaded or committed.

Each builder returns the bytes of one file a user might hand optictx: truncated or lying images, a
decompression bomb, odd colour modes, broken or encrypted PDFs, lying safetensors headers, pickles,
broken configs. The bad-input table (``test_bad_inputs.py``) and the fuzz tests draw from here, and so
can a benchmark or a server load test (``import badinputs`` with ``tests/`` on the path).

Why hand-built bytes: Pillow and reportlab refuse to *write* most of these files (a 0-pixel PNG, a PDF
with no pages), so the few byte formats involved (PNG chunks, a PDF xref table, the safetensors header)
are assembled here directly, each in a few lines.
"""
from __future__ import annotations

import functools
import io
import json
import pickle
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- images


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """The file bytes of ``img`` in ``fmt`` (any format Pillow writes)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of a file: what an interrupted download or copy leaves."""
    return data[: max(1, int(len(data) * keep))]


def noise_image(w: int = 64, h: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels, so JPEG data is not trivially short and truncation cuts real scan data."""
    channels = len(Image.new(mode, (1, 1)).getbands())
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_from_parts(width: int, height: int, idat: bytes, *, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG from its header fields and a ready zlib stream (lets us write sizes Pillow refuses, e.g. 0xN)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_zero_size(width: int = 0, height: int = 10) -> bytes:
    """A PNG whose header says 0 pixels on a side (no encoder writes one; a broken tool can)."""
    return png_from_parts(width, height, zlib.compress(b""))


@functools.lru_cache(maxsize=4)  # bytes are immutable; the 30000² bomb is used by several cases
def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A *valid* greyscale PNG of ``width x height`` black pixels whose file is ~1000x smaller.

    30000x30000 is 900 MB decoded from ~0.9 MB on disk. Deflating 900 MB takes seconds, so the stream is
    built from one compressed block repeated: after a full flush the compressor's window is empty, so the
    same input block compresses to the same bytes every time, and the blocks simply concatenate. The
    checksum is computed, not faked, so Pillow would decode the whole image if nothing stopped it.
    """
    row = width + 1  # one filter byte (0) per row, then the pixels
    rows_per_block = max(1, min(height, 4_000_000 // row))
    blocks, rest = divmod(height, rows_per_block)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the zlib wrapper is written by hand
    block = b"\x00" * (row * rows_per_block)
    body = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    tail = (co.compress(b"\x00" * (row * rest)) if rest else b"") + co.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(b"\x00" * (row * rest), adler)
    idat = b"\x78\xda" + body * blocks + tail + struct.pack(">I", adler)
    return png_from_parts(width, height, idat)


def gray16_png(values: Sequence[int] = (0, 32768, 65535), size: tuple[int, int] = (8, 8)) -> bytes:
    """A 16-bit greyscale PNG (Pillow mode ``I;16``) whose first pixels hold ``values``, the rest 65535."""
    arr = np.full(size[::-1], 65535, np.uint16)
    arr.flat[: len(values)] = values
    return encode(Image.fromarray(arr))


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 0, 0), size: tuple[int, int] = (20, 10)) -> bytes:
    """A CMYK JPEG (as print workflows write them); (0, 255, 0, 0) is pure magenta."""
    return encode(Image.new("CMYK", size, cmyk), "JPEG", quality=100)


def palette_png(transparent: bool = False) -> bytes:
    """A palette (``P``) PNG; with ``transparent`` its index 0 (red, covering the image) is transparent."""
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255])
    return encode(img, transparency=0) if transparent else encode(img)


def rgba_png(rgba: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bytes:
    """An RGBA PNG of one colour; the default is fully transparent *black*, the classic trap."""
    return encode(Image.new("RGBA", (10, 10), rgba))


def la_png() -> bytes:
    """Greyscale + alpha, fully transparent black."""
    return encode(Image.new("LA", (10, 10), (0, 0)))


def one_bit_png() -> bytes:
    """A 1-bit bilevel PNG, all white."""
    return encode(Image.new("1", (10, 10), 1))


def float_tiff(value: float = 0.5) -> bytes:
    """A 32-bit float greyscale TIFF (Pillow mode ``F``) in the 0..1 convention."""
    return encode(Image.fromarray(np.full((4, 4), value, np.float32)), "TIFF")


def animated_gif(colours: Sequence[str] = ("red", "lime", "blue")) -> bytes:
    """A 3-frame animated GIF; frame 0 is red."""
    frames = [Image.new("RGB", (10, 10), c) for c in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=list(frames[1:]), duration=100, loop=0)


def exif_rotated_jpeg(size: tuple[int, int] = (40, 20), orientation: int = 6) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90° clockwise to view' (orientation 6): upright it is portrait.

    The left half is black, so after the rotation the *top* half is black.
    """
    img = Image.new("RGB", size, "white")
    img.paste((0, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif, quality=95)


# --------------------------------------------------------------------------- PDFs


def reportlab_pdf(pages: int = 1, pagesize: tuple[float, float] = (595.0, 842.0), text: str = "Hello",
                  user_password: str | None = None, owner_password: str = "owner") -> bytes:
    """A real PDF (reportlab), optionally encrypted with ``user_password`` (RC4/AES as reportlab writes it)."""
    from reportlab.lib import pdfencrypt
    from reportlab.pdfgen import canvas

    encrypt = None
    if user_password is not None:
        encrypt = pdfencrypt.StandardEncryption(user_password, ownerPassword=owner_password)
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=pagesize, encrypt=encrypt)
    for i in range(pages):
        c.drawString(36, 36, f"{text} {i + 1}")
        c.showPage()
    c.save()
    return buf.getvalue()


def mixed_size_pdf(sizes: Sequence[tuple[float, float]] = ((200.0, 200.0), (20_000.0, 20_000.0))) -> bytes:
    """One page per size: a normal page followed by an absurd one fails on page 2 only."""
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=sizes[0])
    for i, size in enumerate(sizes):
        c.setPageSize(size)
        c.drawString(10, 10, f"page {i + 1}")
        c.showPage()
    c.save()
    return buf.getvalue()


def minimal_pdf(objects: Sequence[str]) -> bytes:
    """A PDF from object bodies (object 1 is the catalogue) with a correct xref table.

    Lets us write structures no PDF library produces: a page tree with no pages, or one that promises
    a page it does not have.
    """
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


CATALOG = "<< /Type /Catalog /Pages 2 0 R >>"


def zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty (/Count 0)."""
    return minimal_pdf([CATALOG, "<< /Type /Pages /Kids [] /Count 0 >>"])


def missing_page_pdf() -> bytes:
    """A PDF whose page tree claims one page but lists none: page count 1, page 1 unloadable."""
    return minimal_pdf([CATALOG, "<< /Type /Pages /Kids [] /Count 1 >>"])


def corrupt_pdf() -> bytes:
    """A PDF signature followed by garbage: no xref, no objects."""
    return b"%PDF-1.7\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"


# --------------------------------------------------------------------------- checkpoints


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header dict (written as given: it may lie) and a data section."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def honest_header(n_floats: int = 4) -> dict:
    """Header of one F32 tensor ``w`` of ``n_floats`` values."""
    return {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}


def lying_safetensors(kind: str) -> bytes:
    """A 16-byte data section (4 floats) whose header lies in one way:

    ``shape``: claims 1000 floats; ``offsets``: points past the end of the file; ``length``: the 8-byte
    header length claims more bytes than the file has; ``json``: the header is not JSON; ``dtype``: an
    unknown dtype; ``dtype_type``: dtype is a list; ``shape_type``: shape is a number.
    """
    data = np.arange(4, dtype=np.float32).tobytes()
    h = honest_header()
    if kind == "shape":
        h["w"]["shape"] = [1000]
    elif kind == "offsets":
        h["w"]["data_offsets"] = [0, 1 << 40]
    elif kind == "length":
        return struct.pack("<Q", 1 << 40) + b"{}" + data
    elif kind == "json":
        return struct.pack("<Q", 9) + b"{not json" + data
    elif kind == "dtype":
        h["w"]["dtype"] = "F128"
    elif kind == "dtype_type":
        h["w"]["dtype"] = ["F32"]
    elif kind == "shape_type":
        h["w"]["shape"] = 4
    else:
        raise ValueError(kind)
    return safetensors_bytes(h, data)


class _Boom:
    """Unpickling this would call ``os.system``: the reason pickle checkpoints are refused."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def pickle_checkpoint(protocol: int = 4) -> bytes:
    """A pickle whose loading would run a shell command (never loaded by the tests)."""
    return pickle.dumps({"state_dict": {"w": [0.0]}, "payload": _Boom()}, protocol=protocol)


def torch_zip_checkpoint() -> bytes:
    """What ``torch.save`` writes: a zip archive holding a pickle."""
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- text and configs


NON_UTF8_TEXT = "café, naïve — ½".encode("cp1252")
"""Latin-1/cp1252 bytes: 0xE9, 0xEF, 0x97 and 0xBD are not valid UTF-8 here."""

NO_FONT_CHARS = {
    "private_use": "\ue000",  # Private Use Area: no font defines it
    "linear_b": "\U00010000",  # a real script no installed Noto face covers
    "surrogate": b"caf\xe9".decode("utf-8", "surrogateescape")[-1],  # what a lenient decode leaves behind
}


def bad_config_json(kind: str) -> bytes:
    """config.json contents broken in one way: ``syntax``, ``non_utf8``, ``list`` (not an object)."""
    return {"syntax": b'{"hidden_size": 1280,', "non_utf8": b'{"model_type": "\xff\xfe"}',
            "list": b"[1, 2, 3]"}[kind]
