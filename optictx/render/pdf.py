"""PDF -> page images (streaming) and the born-digital text layer, with pypdfium2 (Apache/BSD; not
PyMuPDF, which is AGPL).

Why streaming: a 500-page PDF at 144 DPI is ~3 GB of RGB; pages are rendered one at a time and each
pdfium page and bitmap is closed before the next, so memory stays at one page. Bad input (missing,
corrupt, encrypted, empty, absurd page size) raises :class:`PDFError` with what to do about it.
"""
from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from optictx.errors import PDFError
from optictx.render.page import TextBox, to_999

MAX_PAGE_PIXELS = 60_000_000
"""Largest page we rasterise (~ an A0 sheet at 144 DPI is 6.7k x 4.8k = 32 M px). A 20000-pt page at
144 DPI would be 40000 px on a side: refused before pdfium allocates gigabytes."""

_LOAD_ERRORS = {
    pdfium_c.FPDF_ERR_FILE: "the file cannot be opened or read",
    pdfium_c.FPDF_ERR_FORMAT: "it is not a PDF or it is corrupt",
    pdfium_c.FPDF_ERR_PASSWORD: "it is encrypted and needs a password (pass password=...)",
    pdfium_c.FPDF_ERR_SECURITY: "it uses an unsupported security handler",
    pdfium_c.FPDF_ERR_PAGE: "a page is missing or corrupt",
}
_ENCRYPTION_CODES = (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY)
_UNKNOWN = "pdfium could not load it (it is corrupt or uses a feature pdfium does not support)"

_SAMPLE_HEAD = 1 << 24
_SAMPLE_TAIL = 1 << 20

Source = str | os.PathLike | bytes


def _sample(src: str | bytes) -> bytes:
    """The first 16 MiB and last 1 MiB of the file: the header, and the trailer where ``/Encrypt`` lives
    (a linearised file also repeats it near the start). Unreadable -> ``b""`` (no evidence either way)."""
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        return data if len(data) <= _SAMPLE_HEAD + _SAMPLE_TAIL else data[:_SAMPLE_HEAD] + data[-_SAMPLE_TAIL:]
    try:
        with open(src, "rb") as f:
            head = f.read(_SAMPLE_HEAD)
            size = f.seek(0, os.SEEK_END)
            if size <= len(head):
                return head
            f.seek(max(len(head), size - _SAMPLE_TAIL))
            return head + f.read()
    except OSError:
        return b""


def _has_no_pages(sample: bytes) -> bool:
    """pdfium refuses a PDF whose page tree is empty without setting an error code; recognise that case
    from the bytes so the message says so."""
    return (sample.startswith(b"%PDF") and re.search(rb"/Count\s*0\b", sample) is not None
            and re.search(rb"/Type\s*/Page\b(?!s)", sample) is None)


def _is_encrypted(sample: bytes) -> bool:
    """An encrypted PDF names its encryption dictionary in the trailer (or xref-stream dictionary)."""
    return re.search(rb"/Encrypt\b", sample) is not None


def _refusal(src: str | bytes, code: int | None, password: str | None) -> str:
    """Why pdfium refused the file, not trusting its error code.

    pdfium's last-error code is process state that some refusals (a page-less document) leave untouched,
    so after an earlier failure it is stale: an empty PDF opened after an encrypted one reads "password
    error", and in the server one request's error would show in another's reply. So the page-less check
    runs on every refusal, and an encryption code is believed only when the file has ``/Encrypt``.
    """
    sample = _sample(src)
    if _has_no_pages(sample):
        return "the PDF has no pages"
    if code in _ENCRYPTION_CODES:
        if not _is_encrypted(sample):
            return _UNKNOWN  # a stale code from an earlier failure
        if code == pdfium_c.FPDF_ERR_PASSWORD and password is not None:
            return "the password is wrong"
    return _LOAD_ERRORS.get(code, _UNKNOWN)


def _name(src: Source) -> str:
    return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else str(src)


@contextmanager
def open_pdf(src: Source, password: str | None = None) -> Iterator[pdfium.PdfDocument]:
    """Open a PDF from a path or bytes; typed errors; always closed on exit."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise PDFError(f"{path}: no such file")
        src = str(path)
    elif not isinstance(src, (bytes, bytearray)):
        raise PDFError(f"expected a path or bytes, got {type(src).__name__}")
    elif not src:
        raise PDFError("empty input: 0 bytes is not a PDF")
    try:
        doc = pdfium.PdfDocument(bytes(src) if isinstance(src, bytearray) else src, password=password)
    except pdfium.PdfiumError as e:
        # pypdfium2's own message repeats the (possibly stale) code's text, so it is not shown
        raise PDFError(f"{_name(src)}: {_refusal(src, getattr(e, 'err_code', None), password)}") from e
    try:
        if len(doc) == 0:
            raise PDFError(f"{_name(src)}: the PDF has no pages")
        yield doc
    finally:
        doc.close()


def _load_page(doc: pdfium.PdfDocument, index: int, src: Source) -> pdfium.PdfPage:
    """``doc[index]`` with a typed error: a page tree can promise a page it does not hold."""
    try:
        return doc[index]
    except pdfium.PdfiumError as e:
        raise PDFError(f"{_name(src)}: page {index + 1} is missing or corrupt") from e


def pdf_page_count(src: Source, password: str | None = None) -> int:
    """Number of pages (raises PDFError for anything that is not a readable, non-empty PDF)."""
    with open_pdf(src, password) as doc:
        return len(doc)


def _page_range(n: int, first: int, last: int | None) -> range:
    last = n if last is None else last
    if not (0 <= first < n and first < last <= n):
        raise PDFError(f"page range [{first}, {last}) is outside the document's {n} pages (0-based, last exclusive)")
    return range(first, last)


def _check_size(page: pdfium.PdfPage, index: int, scale: float, max_pixels: int) -> None:
    w, h = page.get_size()
    px = (w * scale) * (h * scale)
    if not (w > 0 and h > 0) or px > max_pixels:
        raise PDFError(f"page {index + 1} is {w:.0f} x {h:.0f} pt = {w * scale:.0f} x {h * scale:.0f} px at "
                       f"{scale * 72:.0f} DPI, over the {max_pixels:,}-pixel limit: lower the DPI or raise max_pixels")


def iter_pdf_pages(src: Source, dpi: float = 144, first: int = 0, last: int | None = None, *,
                   password: str | None = None, max_pixels: int = MAX_PAGE_PIXELS) -> Iterator[Image.Image]:
    """Yield RGB images of pages ``first .. last-1`` (0-based) at ``dpi``, one page in memory at a time.

    144 DPI is what the official DeepSeek-OCR PDF runner uses (reference §7.4). A page over
    ``max_pixels`` raises PDFError before it is rasterised.
    """
    if not 1 <= dpi <= 2400:
        raise PDFError(f"dpi {dpi} must be 1..2400")
    scale = dpi / 72
    with open_pdf(src, password) as doc:
        for i in _page_range(len(doc), first, last):
            page = _load_page(doc, i, src)
            try:
                _check_size(page, i, scale, max_pixels)
                bitmap = page.render(scale=scale)
                try:
                    image = bitmap.to_pil()
                    if image.mode != "RGB":  # shares the pdfium buffer for 4-byte formats: copy out
                        image = image.convert("RGB")
                finally:
                    bitmap.close()
            except pdfium.PdfiumError as e:
                raise PDFError(f"{_name(src)}: page {i + 1} could not be rendered ({e})") from e
            finally:
                page.close()
            yield image


def _to_device(page, w_px: int, h_px: int, x: float, y: float) -> tuple[int, int]:
    """PDF user space (points, y up) -> pixel of the rendered page, honouring the page's /Rotate."""
    dx, dy = ctypes.c_int(), ctypes.c_int()
    pdfium_c.FPDF_PageToDevice(page.raw, 0, 0, w_px, h_px, 0, x, y, ctypes.byref(dx), ctypes.byref(dy))
    return dx.value, dy.value


def pdf_text_layer(src: Source, page_index: int = 0, dpi: float = 144, *,
                   password: str | None = None) -> list[TextBox]:
    """Text lines of a born-digital page with boxes in pixels of :func:`iter_pdf_pages` at the same DPI.

    Lines follow pdfium's reading order and its generated line breaks; a line's box is the hull of its
    non-blank characters' boxes. Scanned pages have no text layer and give ``[]``.
    """
    scale = dpi / 72
    with open_pdf(src, password) as doc:
        _page_range(len(doc), page_index, page_index + 1)
        page = _load_page(doc, page_index, src)
        try:
            textpage = page.get_textpage()
        except pdfium.PdfiumError as e:
            page.close()
            raise PDFError(f"{_name(src)}: page {page_index + 1} has an unreadable text layer ({e})") from e
        try:
            w_pt, h_pt = page.get_size()
            W, H = round(w_pt * scale), round(h_pt * scale)
            lines: list[TextBox] = []
            chars: list[str] = []
            box: list[int] | None = None

            def flush() -> None:
                nonlocal chars, box
                text = "".join(chars).strip()
                if text and box is not None:
                    b = (max(0, box[0]), max(0, box[1]), min(W, box[2]), min(H, box[3]))
                    lines.append(TextBox(text, b, to_999(b, W, H)))
                chars, box = [], None

            for i in range(textpage.count_chars()):
                ch = chr(pdfium_c.FPDFText_GetUnicode(textpage.raw, i))
                if ch in "\r\n":  # pdfium's generated line break ("\r\n")
                    flush()
                    continue
                chars.append(ch)
                if ch.isspace() or ch == "\x00":
                    continue
                left, bottom, right, top = textpage.get_charbox(i)
                xs, ys = zip(_to_device(page, W, H, left, bottom), _to_device(page, W, H, right, top))
                cb = [min(xs), min(ys), max(xs), max(ys)]
                box = cb if box is None else [min(box[0], cb[0]), min(box[1], cb[1]), max(box[2], cb[2]),
                                              max(box[3], cb[3])]
            flush()
            return lines
        finally:
            textpage.close()
            page.close()
