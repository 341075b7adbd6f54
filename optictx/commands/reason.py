"""`optictx reason IMAGE "question"`: think with visual primitives about one image.

    optictx reason maze.png "Is there a feasible way to get from the lime square to the gold circle? ..."
    optictx reason shapes.png "How many red circles are there?" --model runs/primitives-tiny/opd/model

Streams the reasoning as it is generated, draws every box and point it cites on the image (saved next to it
as ``<name>.reasoned.png``, or ``--out``), then prints the final answer and the image's cost in the KV cache:
merged ViT tokens and the entries each kind of attention layer keeps for them (``budget.primitives_budget``).
The trigger ``<|visual_thinking|>`` is prepended unless ``--no-trigger`` (the model then decides by itself
whether to think with primitives); ``--direct`` asks for an answer without primitives.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optictx.errors import WeightsError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "primitives-tiny"


def register(subparsers) -> None:
    p = subparsers.add_parser("reason", help="answer a question about an image, thinking with boxes and points",
                              description="Stream visual-primitive reasoning about IMAGE, draw the cited boxes and "
                                          "points, print the answer and the image's KV-cache entries.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    p.add_argument("--model", default=None, help=f"model folder (default: the bundled {DEFAULT_MODEL.name})")
    p.add_argument("--out", default=None, help="where to save the annotated image (default: next to IMAGE)")
    p.add_argument("--no-trigger", action="store_true", help="do not prepend <|visual_thinking|>")
    p.add_argument("--direct", action="store_true", help="append 'Answer directly.' (no primitives)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--json", action="store_true", help="print one JSON record at the end instead of the summary")
    p.set_defaults(func=run)


def build_prompt(question: str, trigger: bool = True, direct: bool = False) -> str:
    from optictx.data.sample import DIRECT_SUFFIX, TRIGGER

    prompt = question.strip()
    if direct:
        return prompt + DIRECT_SUFFIX
    return TRIGGER + prompt if trigger else prompt


def kv_summary(width: int, height: int, cfg) -> dict:
    """Image tokens and KV entries per attention kind for a ViT input of width×height px."""
    from optictx.budget import primitives_budget

    b = primitives_budget(width, height, cfg.patch_size, cfg.merge_size, 4, cfg.sliding_window)
    ratios = list(cfg.compress_ratios[: cfg.num_hidden_layers]) if cfg.attention == "csa" else []
    # V4 layers: ratio 0 keeps only its sliding window of raw entries, 4 is CSA, anything else HCA; every
    # compressing layer also keeps the window of raw entries for the most recent tokens.
    layers = [("window", min(cfg.sliding_window, b.merged_tokens)) if r == 0 else
              ("CSA" if r == 4 else "HCA", b.merged_tokens // r) for r in ratios]
    return {"input": [b.input_width, b.input_height], "patches": b.patches, "image_tokens": b.merged_tokens,
            "csa_entries": b.csa_entries, "attention": cfg.attention, "layers": layers}


def run(args: argparse.Namespace) -> int:
    import torch

    from optictx.generate import GenerationConfig, stream
    from optictx.preprocess import load_image
    from optictx.primitives import draw_blocks, parse_primitives
    from optictx.rewards import final_answer
    from optictx.train.primitives_task import image_tensor, load_model, n_image_tokens, prompt_ids

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        raise WeightsError(f"no primitives model at {folder}: train one with `optictx train --config "
                           "configs/primitives-tiny.json` and pass --model RUN/opd/model")
    model, tok = load_model(folder, device=args.device)
    image = load_image(args.image)
    pixels = image_tensor(image, model.config)
    prompt = build_prompt(args.question, not args.no_trigger, args.direct)
    ids = torch.tensor(prompt_ids(tok, n_image_tokens(pixels, model.config), prompt))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    text_stream = stream(model, ids, tok, gen, prefill={"pixel_values": [pixels]})
    pieces = []
    for delta in text_stream:
        pieces.append(delta)
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    text = "".join(pieces)
    prims = parse_primitives(text)
    src = Path(args.image)
    out = Path(args.out) if args.out else src.with_name(src.stem + ".reasoned.png")
    draw_blocks(image, prims).save(out)
    answer = final_answer(text)
    kv = kv_summary(pixels.shape[-1], pixels.shape[-2], model.config)
    record = {"answer": answer, "primitives": [{"kind": p.kind, "label": p.label, "coords": p.coords}
                                               for p in prims],
              "annotated": str(out), "kv": kv, "text": text}
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
        return 0
    n_boxes = sum(len(p.coords) for p in prims if p.kind == "box")
    n_points = sum(len(p.coords) for p in prims if p.kind == "point")
    shown = answer if answer is not None else "(no \\boxed{} answer)"
    print(f"\n\nanswer: {shown}")
    print(f"cited: {n_boxes} boxes, {n_points} points -> {out}")
    layers = ", ".join(f"{kind} {n}" for kind, n in kv["layers"]) or f"{kv['attention']} {kv['image_tokens']} each"
    print(f"image: {image.width}x{image.height} px -> ViT input {kv['input'][0]}x{kv['input'][1]} -> "
          f"{kv['patches']} patches -> {kv['image_tokens']} tokens -> KV entries per layer: {layers}")
    return 0
