"""optictx.render: text and markdown -> page images with ground truth; PDF pages -> images.

Public API (everything a caller needs is re-exported here)::

    PageStyle, RenderedPage, TextBox, Block            page.py
    render_text(text, style, max_pages=None)          text.py
    render_to_fit(text, mode, target_ratio=None, ...) fit.py
    render_markdown(md, style)                        markdown.py
    pdf_page_count, iter_pdf_pages, pdf_text_layer    pdf.py
"""
from optictx.render.fit import MODES, FitResult, render_to_fit
from optictx.render.page import Block, PageStyle, RenderedPage, TextBox, from_999, to_999
from optictx.render.text import render_text

__all__ = ["MODES", "Block", "FitResult", "PageStyle", "RenderedPage", "TextBox", "from_999", "render_text",
           "render_to_fit", "to_999"]
