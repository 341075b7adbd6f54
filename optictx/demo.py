"""`make demo`: optical compression end to end on the bundled tiny model, on text it never saw.

1. render a held-out paragraph (licence text, never used in training) onto one page,
2. show the budget: vision tokens vs the text tokens the page stands for (DeepSeek tokenizer),
3. read it back with `ocr-tiny`, print the text, its precision / edit distance and the compression ratio,
4. write the page, and an annotated copy with the reading under it, to out/demo/.
"""
from __future__ import annotations

import random
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def annotate(page: Image.Image, lines: list[str]) -> Image.Image:
    """The page scaled 2x with the model's reading and the figures printed below it."""
    from optictx.data.ocr_pages import tiny_model_font

    scale = 2
    big = page.resize((page.width * scale, page.height * scale), Image.NEAREST)
    font = ImageFont.truetype(tiny_model_font(), 13)
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 70) or [""])]
    out = Image.new("RGB", (max(big.width, 560), big.height + 18 * len(wrapped) + 16), "white")
    out.paste(big, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        draw.text((6, big.height + 8 + 18 * i), line, fill=(20, 20, 120), font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from optictx.budget import ocr_budget, text_tokens
    from optictx.eval.compression import heldout_text
    from optictx.eval.metrics import normalized_edit_distance, ocr_precision_recall
    from optictx.data.ocr_pages import render_page
    from optictx.errors import OptictxError
    from optictx.ocr import OCR

    console = Console()
    out = Path("out/demo")
    out.mkdir(parents=True, exist_ok=True)
    try:
        ocr = OCR("tiny")
    except OptictxError as e:
        console.print(f"[red]cannot load the bundled model:[/red] {e}")
        return 2
    side = ocr.mode.base_size
    budget = ocr_budget(side, side, ocr.mode)
    rng = random.Random(7)
    page = render_page(heldout_text(rng, 420), side, side // 64)
    page.image.save(out / "page.png")
    n_text = text_tokens(page.text)
    table = Table(title="Optical compression budget (one page)")
    for col in ("page", "vision tokens", "decoder slots", "text tokens (DeepSeek)", "compression"):
        table.add_column(col, justify="right")
    table.add_row(f"{side}x{side}px, {page.n_lines} lines", str(budget.vision_tokens),
                  str(budget.decoder_slots), str(n_text), f"{n_text / budget.vision_tokens:.1f}x")
    console.print(table)
    console.print("[bold]Ground truth (held-out text, never seen in training):[/bold]")
    console.print(page.text)
    result = ocr(page.image)
    precision, recall = ocr_precision_recall(result.text, page.text)
    ned = normalized_edit_distance(result.text, page.text)
    console.print("\n[bold]ocr-tiny read:[/bold]")
    console.print(result.text)
    console.print(f"\nprecision {100 * precision:.1f}%  recall {100 * recall:.1f}%  edit distance {ned:.3f}  "
                  f"compression {n_text / budget.vision_tokens:.1f}x  ({result.timings.total_s:.1f} s)")
    # The control every figure needs: the same target read from another page's pixels. A model that only
    # guesses from its language prior scores the same here as above.
    other = render_page(heldout_text(random.Random(8), 420), side, side // 64)
    control = ocr(other.image).text
    cp, cr = ocr_precision_recall(control, page.text)
    console.print(f"control (decoded from a different page's image): precision {100 * cp:.1f}%  "
                  f"recall {100 * cr:.1f}%  edit distance {normalized_edit_distance(control, page.text):.3f}")
    annotate(page.image, ["ocr-tiny read:", result.text,
                          f"precision {100 * precision:.1f}%  edit distance {ned:.3f}  "
                          f"{budget.vision_tokens} vision tokens for {n_text} text tokens "
                          f"({n_text / budget.vision_tokens:.1f}x)"]).save(out / "annotated.png")
    console.print(f"wrote {out / 'page.png'} and {out / 'annotated.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
