"""Coverage-guided fuzzing of the grounding-language parser with atheris (optional; not run in CI).

Model output is untrusted text, and ``optictx.primitives`` promises its parsers never raise. Hypothesis
tests (tests/test_fuzz.py) check that on structured random input; this target lets libFuzzer search for
inputs that reach new branches of the scanner for as long as you like::

    pip install atheris                    # not a dependency of optictx
    python fuzz/atheris_grounding.py --seeds fuzz/corpus_grounding          # write a seed corpus once
    python fuzz/atheris_grounding.py fuzz/corpus_grounding -max_total_time=600

A crash is saved by libFuzzer as ``crash-<sha1>``; replay it with ``python fuzz/atheris_grounding.py crash-...``.
``check_one`` holds the invariants and needs no atheris, so the test suite runs it too (it cannot drift).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ANY_TAG = re.compile(r"<[|｜]/?(ref|det|box|point)[|｜]>")


def check_one(text: str) -> None:
    """Every invariant the parsers promise, for one input; raises AssertionError (or the parser's bug)."""
    from optictx import primitives as p

    blocks = p.parse_grounding(text)
    for b in blocks:
        assert isinstance(b, p.Block) and ANY_TAG.search(b.label) is None
        for box in b.boxes_999:
            assert len(box) == 4 and all(0 <= v <= 999 for v in box) and box[0] <= box[2] and box[1] <= box[3]
    for prim in p.parse_primitives(text):
        assert prim.kind in ("box", "point")
        for c in prim.coords:
            assert len(c) == (4 if prim.kind == "box" else 2) and all(0 <= v <= 999 for v in c)
    for md in (p.strip_grounding(text), p.strip_grounding(text, images=True, gfm_tables=True)):
        assert isinstance(md, str)
    # drawing must accept whatever the parser returned
    if blocks:
        from PIL import Image

        p.draw_blocks(Image.new("RGB", (32, 24), "white"), blocks)


def seeds() -> list[str]:
    """Realistic starting points: official-format blocks, primitives, truncations and a full-width variant."""
    from optictx import primitives as p

    doc = (p.format_det("title", [(20, 37, 459, 160)]) + "\n# Results\n\n"
           + p.format_det("table", [(10, 200, 990, 600), (1, 2, 3, 4)]) + "\n<table><tr><td>1</td></tr></table>\n\n"
           + p.format_det("image", [(0, 0, 999, 999)]) + "\n")
    prim = p.format_box("cat", [(1, 2, 3, 4), (5, 6, 7, 8)]) + " and " + p.format_points([(5, 6), (700, 800)])
    return [doc, prim, doc[: len(doc) // 2], prim[:-3], doc.replace("|", "｜"), "<|ref|>x<|det|>[[1, 2, 3"]


def _fuzz(data: bytes) -> None:
    import atheris

    check_one(atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data)))


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[1] == "--seeds":
        folder = Path(argv[2])
        folder.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(seeds()):
            # ConsumeUnicode reads a width byte first: odd and bit 1 clear = UTF-16, which keeps the full-width bars
            (folder / f"seed-{i}").write_bytes(b"\x01" + s.encode("utf-16-le"))
        print(f"wrote {len(seeds())} seeds to {folder}")
        return
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (optional, for fuzzing only)")
    with atheris.instrument_imports():
        import optictx.primitives  # noqa: F401 - instrumented so coverage guides the search
    atheris.Setup(argv, _fuzz)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv)
