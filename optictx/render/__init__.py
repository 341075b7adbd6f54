"""optictx.render: text and markdown -> page images with ground truth; PDF pages -> images.

Public API (everything a caller needs is re-exported here)::

    PageStyle, RenderedPage, TextBox, Block, to_999, from_999      page.py
    render_text(text, style=None, *, max_pages=None)               text.py
    render_to_fit(text, mode="small", target_ratio=None, ...)      fit.py
    render_markdown(md, style=None, *, max_pages=None)             markdown.py
    pdf_page_count, iter_pdf_pages, pdf_text_layer                 pdf.py

The markdown parser and pdfium load on first use (about 0.5 s of imports a text-only caller skips).
"""
from optictx.render.fit import MODES, FitResult, render_to_fit
from optictx.render.page import Block, PageStyle, RenderedPage, TextBox, from_999, to_999
from optictx.render.text import render_text

_LAZY = {"render_markdown": "optictx.render.markdown", "iter_pdf_pages": "optictx.render.pdf",
         "pdf_page_count": "optictx.render.pdf", "pdf_text_layer": "optictx.render.pdf"}

__all__ = ["MODES", "Block", "FitResult", "PageStyle", "RenderedPage", "TextBox", "from_999", "render_text",
           "render_to_fit", "to_999", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optictx.render' has no attribute {name!r}")
