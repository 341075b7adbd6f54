"""The compression-vs-precision evaluation's bookkeeping, with stand-in readers (no model): page spread,
the mismatched-image control, bins, the summary and the misreading table."""
from optictx.eval import compression as cmp


def pages_and_index(n=6):
    pages = cmp.make_pages(n)
    return pages, {p.image.tobytes(): p for p in pages}


def test_pages_spread_from_one_line_to_a_full_page():
    pages = cmp.make_pages(8)
    assert [p.n_lines for p in pages] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all(len(line) <= 32 for p in pages for line in p.text.split("\n"))
    assert cmp.make_pages(8)[3].text == pages[3].text  # fixed seed: the same pages every run


def test_a_perfect_reader_beats_the_control_and_has_no_misreadings():
    pages, by_image = pages_and_index()
    scores = cmp.score_pages(lambda im: by_image[im.tobytes()].text, pages, 16, use_tesseract=False,
                             progress=False)
    assert all(s.precision == 1.0 and s.edit_distance == 0.0 for s in scores)
    assert all(s.control_precision < 0.8 for s in scores)  # another page's text is not this page's
    summary = cmp.summary(scores)
    assert summary["precision_le_10x"] == 1.0 and summary["top_substitutions"] == []
    assert sum(r["pages"] for r in cmp.bin_table(scores)) == len(pages)


def test_misreadings_are_counted_and_kept_per_page():
    pages, by_image = pages_and_index()
    read = lambda im: by_image[im.tobytes()].text.replace("y", "b")  # noqa: E731  a reader that sees y as b
    scores = cmp.score_pages(read, pages, 16, use_tesseract=False, progress=False)
    n_y = sum(p.text.count("y") for p in pages)
    assert n_y and cmp.top_substitutions(scores)[0] == ("y", "b", n_y)
    assert scores[0].prediction == read(pages[0].image) and scores[0].text == pages[0].text
    assert cmp.summary(scores)["top_substitutions"][0] == f"'y'->'b' x{n_y}"
