"""The bundled model's page format: a typewriter grid of 8 x 16 px cells aligned with the 16-px SAM patches."""
import numpy as np
import pytest

from optictx.data.ocr_pages import (CELL_H, CELL_W, Level, OCRPageSource, grid_shape, heldout_pages, render_page,
                                    to_ascii, wrap_grid)
from optictx.errors import RenderError


def test_wrap_keeps_words_and_cuts_only_overlong_ones():
    assert wrap_grid("aaa bbb ccc", 7) == ["aaa bbb", "ccc"]
    assert wrap_grid("abcdefghij k", 4) == ["abcd", "efgh", "ij k"]
    assert wrap_grid("one\ntwo", 10) == ["one", "two"]
    assert all(len(line) <= 5 for line in wrap_grid("x" * 23 + " yy zz" * 9, 5))


def test_every_glyph_is_drawn_inside_its_own_cell():
    """Ink of character (r, c) stays in cell (r, c) (give or take the font's 1-px overhang): the alignment
    the encoder relies on."""
    page = render_page("W" * 32 + "\n" + "g|" * 16, 256, 4)
    ink = np.asarray(page.image.convert("L")) < 128
    assert page.lines[0][0] == "W" * 32 and page.n_lines == 2
    for r in range(2):
        for c in range(32):
            cell = ink[r * CELL_H:(r + 1) * CELL_H, c * CELL_W:(c + 1) * CELL_W]
            assert cell.any(), (r, c)  # something drawn in every cell
    assert not ink[2 * CELL_H:].any()  # nothing below the text
    # columns 1..6 of each W-cell hold its ink; a neighbour may overhang the shared border by at most 1 px
    ws = ink[:CELL_H].reshape(CELL_H, 32, CELL_W)
    assert ws[:, :, 1:7].any(axis=(0, 2)).all()


def test_grid_page_fits_16_lines_of_32_and_cells_follow_characters():
    cols, rows = grid_shape(256)
    assert (cols, rows) == (32, 16)
    page = render_page(" ".join(["word"] * 400), 256, 4)
    assert page.n_lines == 16 and all(len(t) <= 32 for t, _ in page.lines)
    # char_cells: row r, col c -> vision token (r // 4, c // 8) of the 4x4 grid
    cells = [c for c, ch in zip(page.char_cells, page.text) if ch != "\n"]
    expect = [(r // 4) * 4 + c // 8 for r, (t, _) in enumerate(page.lines) for c in range(len(t))]
    assert cells == expect


def test_non_ascii_is_a_clear_error_and_to_ascii_folds_accents():
    with pytest.raises(RenderError, match="printable ASCII"):
        render_page("naïve café", 256, 4)
    assert to_ascii("naïve café — ok\tyes") == "naive cafe  ok yes"


def test_sources_are_deterministic_and_heldout_pages_have_the_asked_lines():
    a, b = OCRPageSource(3), OCRPageSource(3)
    pa, pb = a.page(11, Level(6)), b.page(11, Level(6))
    assert pa.text == pb.text and np.array_equal(np.asarray(pa.image), np.asarray(pb.image))
    assert 1 <= pa.n_lines <= 6
    pages = heldout_pages(2, 8)
    assert [p.n_lines for p in pages] == [8, 8]
