"""optictx.render.pdf: page count, streaming rasterisation at a DPI, page ranges, the text layer, and
typed errors for encrypted, corrupt, empty, missing and absurdly large PDFs. PDFs are built here with
reportlab / pypdfium2 so nothing is downloaded."""
from __future__ import annotations

import io

import pypdfium2 as pdfium
import pytest
from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.pdfgen import canvas

from optictx.errors import PDFError
from optictx.render import iter_pdf_pages, pdf_page_count, pdf_text_layer

LETTER = (612, 792)  # points: 1224 x 1584 px at 144 DPI exactly


def make_pdf(path=None, pages: int = 3, size=LETTER, encrypt=None) -> bytes:
    buf = io.BytesIO()
    c = canvas.Canvas(str(path) if path else buf, pagesize=size, encrypt=encrypt)
    for i in range(pages):
        c.setFont("Helvetica", 12)
        c.drawString(72, size[1] - 72, f"Page {i + 1} first line")
        c.drawString(72, size[1] - 96, "second line of text")
        c.showPage()
    c.save()
    return buf.getvalue() if path is None else path.read_bytes()


def test_three_pages_stream_at_the_requested_dpi(tmp_path):
    path = tmp_path / "three.pdf"
    make_pdf(path)
    assert pdf_page_count(path) == 3 == pdf_page_count(str(path))
    images = list(iter_pdf_pages(path, dpi=144))
    assert [im.size for im in images] == [(1224, 1584)] * 3 and {im.mode for im in images} == {"RGB"}
    assert [im.size for im in iter_pdf_pages(path.read_bytes(), dpi=72, first=1)] == [(612, 792)] * 2
    assert len(list(iter_pdf_pages(path, first=2, last=3))) == 1
    # pages differ (page numbers are drawn) and have ink near the top-left text position
    a, b = images[0].convert("L"), images[1].convert("L")
    assert a.tobytes() != b.tobytes() and a.crop((144, 120, 500, 220)).getextrema()[0] < 100
    with pytest.raises(PDFError, match="outside"):
        list(iter_pdf_pages(path, first=3))


def test_text_layer_lines_and_pixel_boxes():
    data = make_pdf(pages=1)
    lines = pdf_text_layer(data, 0, dpi=144)
    assert [t.text for t in lines] == ["Page 1 first line", "second line of text"]
    x1, y1, x2, y2 = lines[0].box_px
    assert abs(x1 - 144) <= 3 and 120 <= y1 < y2 <= 150 and x2 > x1 + 150  # baseline at 72 pt from the top
    assert lines[1].box_px[1] > lines[0].box_px[3]
    image = next(iter_pdf_pages(data, dpi=144)).convert("L")
    assert image.crop(lines[0].box_px).getextrema()[0] < 80  # the box holds the glyphs' ink


def test_text_layer_boxes_follow_page_rotation():
    doc = pdfium.PdfDocument(make_pdf(pages=1))
    doc[0].set_rotation(90)
    buf = io.BytesIO()
    doc.save(buf)
    doc.close()
    image = next(iter_pdf_pages(buf.getvalue(), dpi=144))
    assert image.size == (1584, 1224)
    for line in pdf_text_layer(buf.getvalue(), 0, dpi=144):
        x1, y1, x2, y2 = line.box_px
        assert y2 - y1 > x2 - x1  # the lines now run vertically
        assert image.convert("L").crop(line.box_px).getextrema()[0] < 80


def test_encrypted_pdf_needs_the_password(tmp_path):
    path = tmp_path / "secret.pdf"
    make_pdf(path, pages=2, encrypt=StandardEncryption("user-pw", ownerPassword="owner-pw"))
    with pytest.raises(PDFError, match="encrypted.*password"):
        pdf_page_count(path)
    with pytest.raises(PDFError, match="password is wrong"):
        pdf_page_count(path, password="nope")
    assert pdf_page_count(path, password="user-pw") == 2
    assert len(list(iter_pdf_pages(path, password="user-pw"))) == 2


@pytest.mark.parametrize("data", [b"%PDF-1.7\nthis is not really a pdf", b"\x00\xff" * 500, b"hello"])
def test_corrupt_bytes_are_a_pdf_error(data):
    with pytest.raises(PDFError, match="not a PDF or it is corrupt"):
        pdf_page_count(data)
    with pytest.raises(PDFError):
        list(iter_pdf_pages(data))


def test_empty_missing_and_zero_page_pdfs(tmp_path):
    with pytest.raises(PDFError, match="0 bytes"):
        pdf_page_count(b"")
    with pytest.raises(PDFError, match="no such file"):
        pdf_page_count(tmp_path / "absent.pdf")
    empty = pdfium.PdfDocument.new()  # a valid PDF whose page tree is empty
    buf = io.BytesIO()
    empty.save(buf)
    empty.close()
    with pytest.raises(PDFError, match="no pages"):
        list(iter_pdf_pages(buf.getvalue()))
    (tmp_path / "empty.pdf").write_bytes(buf.getvalue())
    with pytest.raises(PDFError, match="no pages"):
        pdf_page_count(tmp_path / "empty.pdf")


def test_a_huge_page_is_refused_before_rasterising():
    data = make_pdf(pages=1, size=(20000, 20000))
    assert pdf_page_count(data) == 1
    with pytest.raises(PDFError, match="20000 x 20000 pt.*limit"):
        next(iter_pdf_pages(data, dpi=144))
    assert next(iter_pdf_pages(data, dpi=9)).size == (2500, 2500)  # fine at a low DPI
    with pytest.raises(PDFError, match="dpi"):
        next(iter_pdf_pages(data, dpi=0))
