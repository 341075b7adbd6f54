"""`optictx train --config FILE`: train (or resume) a model; `optictx train export RUN --out DIR`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from optictx.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or resume a model from a JSON recipe (see configs/)",
                       description="Train (or resume, when OUT already holds checkpoints) from a JSON recipe. "
                                   "Multi-process: torchrun --nproc_per_node=N -m optictx.cli train ...")
    p.add_argument("--config", required=False, help="JSON recipe, e.g. configs/ocr-tiny.json")
    p.add_argument("--out", default=None, help="run folder (checkpoints, metrics.csv, loss.png); default runs/<name>")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--export", metavar="RUN", default=None,
                   help="instead of training, export the latest checkpoint of RUN as a model folder (--to)")
    p.add_argument("--to", default=None, help="destination folder for --export")
    p.add_argument("--dtype", default="bfloat16", help="dtype of exported weights (bfloat16 keeps them small)")
    p.add_argument("--stage", default="opd", help="for a primitives run: which stage to export (default opd)")
    p.add_argument("--only", default=None, metavar="STAGE[,STAGE]",
                   help="for a primitives recipe: train only these stages (the stages they start from must be done "
                        "in OUT) and skip the stage-table evaluation")
    p.set_defaults(func=run)


def load_recipe(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid JSON: {e}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export:
        from optictx.train.ocr_run import export_run

        if not args.to:
            raise ConfigError("--export needs --to DIR")
        run_recipe = Path(args.export) / "recipe.json"
        if run_recipe.is_file() and load_recipe(run_recipe).get("task") == "primitives":
            from optictx.train.primitives_run import export_stage

            path = export_stage(args.export, args.stage, args.to, dtype=args.dtype)
        else:
            path = export_run(args.export, args.to, dtype=args.dtype)
        print(f"exported {args.export} -> {path}")
        return 0
    if not args.config:
        raise ConfigError("give --config FILE (see configs/) or --export RUN --to DIR")
    recipe = load_recipe(args.config)
    if args.max_steps:
        recipe.setdefault("train", {})["max_steps"] = args.max_steps
    out = args.out or os.path.join("runs", Path(args.config).stem)
    task = recipe.get("task")
    if args.only and task != "primitives":
        raise ConfigError("--only selects stages of a primitives recipe; an OCR recipe has one training run")
    if task == "ocr":
        from optictx.train.ocr_run import run_ocr

        metrics = run_ocr(recipe, out)
    elif task == "primitives":
        from optictx.train.primitives_run import run_primitives

        only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        metrics = run_primitives(recipe, out, stages=only)
    else:
        raise ConfigError(f"unknown task {task!r} in {args.config}; expected 'ocr' or 'primitives'")
    print(json.dumps(metrics, indent=2))
    return 0
