"""`optictx budget`: what an image or a text costs, predicted without running a model.

    optictx budget page.png                 # every mode: tiles, views, vision tokens, decoder slots
    optictx budget 1190x1684 --mode gundam  # one mode, from a size
    optictx budget --text doc.txt --mode small   # text tokens vs vision tokens: the compression ratio
    optictx budget 756x756 --primitives     # ViT patches -> merged tokens -> CSA/HCA KV entries
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from optictx.budget import MODES, OCRBudget, get_mode, ocr_budget, primitives_budget, text_tokens
from optictx.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "budget",
        help="token / KV-entry counts for an image or size (and compression ratio for a text)",
        description="Exact DeepSeek-OCR token counts per mode, text-vs-vision compression ratios, and the "
                    "visual-primitives pipeline, computed without a model.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE_OR_SIZE", help="an image file or a size like 1190x1684")
    p.add_argument("--mode", help=f"one of {', '.join(MODES)} (default: all)")
    p.add_argument("--max-crops", type=int, default=None,
                   help="Gundam tile cap (HF default 9; the official vLLM scripts use 6)")
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file: report its DeepSeek tokens and ratio")
    p.add_argument("--primitives", action="store_true",
                   help="show the visual-primitives pipeline (14-px patches, 3x3 merge, CSA) for the size")
    p.set_defaults(func=run)


def parse_size(spec: str) -> tuple[int, int]:
    """``WxH`` -> (w, h); otherwise ``spec`` is an image path and its upright size is read."""
    m = _SIZE.match(spec)
    if m and not Path(spec).exists():
        w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0:
            raise ConfigError(f"size {spec!r} must have positive sides")
        return w, h
    from optictx.preprocess import load_image  # PIL/torch only when a file is given

    return load_image(spec).size


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no text file at {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {e}") from None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if args.image is None and args.text is None:
        raise ConfigError("give an image, a size like 1190x1684, or --text FILE")
    size = parse_size(args.image) if args.image else None
    modes = [get_mode(args.mode, args.max_crops)] if args.mode else [get_mode(n, args.max_crops) for n in MODES]
    if args.primitives:
        if size is None:
            raise ConfigError("--primitives needs an image or a size")
        console.print(_primitives_table(*size))
        return 0
    if args.text is not None:
        console.print(_text_table(_read_text(args.text), modes, size, explicit=bool(args.mode)))
        return 0
    console.print(_image_table([ocr_budget(*size, m) for m in modes]))
    return 0


def _image_table(budgets: list[OCRBudget]):
    from rich.table import Table

    b0 = budgets[0]
    t = Table(title=f"DeepSeek-OCR budget for {b0.width}x{b0.height}")
    t.caption = "tiles: nw x nh; vision: paper count; slots: + row newlines + separator; valid: not padding"
    for col in ("mode", "view px", "tiles", "views", "vision", "slots", "valid", "px/token"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for b in budgets:
        m = b.mode
        t.add_row(m.name, f"{m.base_size}/{m.image_size}" if m.crop_mode else str(m.base_size),
                  f"{b.tiles[0]} x {b.tiles[1]}" if b.n_tiles else "-", str(b.n_views), str(b.vision_tokens),
                  str(b.decoder_slots), str(b.valid_vision_tokens), f"{b.pixels_per_vision_token:,.0f}")
    return t


def _text_table(text: str, modes, size, explicit: bool):
    from rich.table import Table

    n_text = text_tokens(text)
    t = Table(title=f"{n_text:,} DeepSeek text tokens vs vision tokens")
    for col in ("mode", "text tokens", "vision tokens", "compression"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for m in modes:
        if m.crop_mode and size is None:
            if explicit:
                raise ConfigError(f"mode {m.name!r} tiles by image size; also give an image or a size")
            continue
        n_vision = ocr_budget(*size, m).vision_tokens if size else m.global_side ** 2
        t.add_row(m.name, f"{n_text:,}", f"{n_vision:,}", f"{n_text / n_vision:.2f}x")
    return t


def _primitives_table(width: int, height: int):
    from rich.table import Table

    p = primitives_budget(width, height)
    t = Table(title=f"Visual primitives pipeline for {width}x{height}")
    t.add_column("stage")
    t.add_column("count", justify="right")
    t.add_column("what it is")
    t.add_row("input", f"{p.input_width}x{p.input_height} = {p.input_width * p.input_height:,} px",
              "sides rounded to a multiple of 42 px (14-px patch x 3x3 merge)")
    t.add_row("ViT patches", f"{p.patches:,}", "14x14-px patches")
    t.add_row("merged tokens", f"{p.merged_tokens:,}", "3x3 patches per token (42x42 px): what prefill sees")
    t.add_row("CSA entries", f"{p.csa_entries:,}", "ratio 4 compressed KV entries per CSA layer")
    t.add_row("HCA entries", f"{p.hca_entries:,}", "ratio 128 compressed KV entries per HCA layer")
    t.add_row("window", f"{p.window_entries:,}", "raw entries the 128-token sliding window keeps")
    t.add_row("px / KV entry", f"{p.pixels_per_kv_entry:,.0f}", "input pixels per CSA entry")
    return t
