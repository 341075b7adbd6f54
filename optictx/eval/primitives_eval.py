"""Benchmarks of the visual-primitives models (issue 7; lineage §5.4, §7.4): held-out seeds, some unseen styles,
one row per training stage so each stage's gain is visible, and the ablation without primitives.

Metrics (greedy decoding, every number from the same held-out samples for every model):

* ``counting_em``     exact match of the last ``\\boxed{}`` (hard negatives and zero counts included);
* ``pointing_hit``    one-to-one point hit rate (a point inside a distinct target box) over images with targets;
* ``grounding_ap50``  AP@0.5 over all grounding images (one class; a model's boxes carry no confidence, so
                      each scores 1 and ties keep output order);
* ``spatial_acc``     Yes/No accuracy (balanced);
* ``maze_acc``        solvable/unsolvable ACC, balanced by construction (both twins of every pair), and per grid
                      tier ``maze_acc_<tier>`` (tiers beyond the training sizes test generalisation);
* ``path_acc``        ACC of the boxed end label;
* ``*_unseen``        the same on styles never trained on (scenes: gradient + noise, outlines; mazes: dark
                      paper, thick light walls; paths: dark paper, square markers);
* ``*_direct``        the ablation: the same questions with "Answer directly." (no primitives in the reasoning);
* ``uses_primitives_auto`` / ``direct_on_general``: without the trigger, how often the model cites primitives
                      on questions that need them, and answers directly on questions that do not.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from optictx.config import dataclass_from
from optictx.data import mazes, paths, scenes
from optictx.data.sample import DIRECT_SUFFIX, TRIGGER, Sample
from optictx.errors import ConfigError
from optictx.eval.metrics import average_precision_dataset, point_hit_rate
from optictx.primitives import parse_primitives
from optictx.rewards import accuracy_reward, answer_correct, check_syntax, score


@dataclass
class PrimitivesEvalConfig:
    seed: int = 7_000_001  # held out: training stages draw from small seeds
    counting: int = 100
    pointing: int = 100
    grounding: int = 100
    spatial: int = 100
    maze_pairs_per_tier: int = 50  # each pair gives one solvable and one unsolvable maze
    maze_tiers: tuple[str, ...] = ("easy", "medium")
    path: int = 100
    unseen: int = 50  # per task (counting, maze pairs, path) in the unseen styles
    general: int = 50
    direct_ablation: bool = True
    scene: dict = field(default_factory=dict)
    maze: dict = field(default_factory=dict)
    path_cfg: dict = field(default_factory=dict)
    max_new_tokens: dict = field(default_factory=lambda: {"counting": 200, "pointing": 160, "grounding": 200,
                                                          "spatial": 160, "maze": 900, "path": 200,
                                                          "general": 32})
    max_rows: int = 32

    def validate(self) -> "PrimitivesEvalConfig":
        bad = set(self.maze_tiers) - set(mazes.TIERS)
        if bad:
            raise ConfigError(f"unknown maze tiers {sorted(bad)}; expected some of {sorted(mazes.TIERS)}")
        return self


def _cfg(cls, values: dict, **extra):
    return dataclass_from(cls, {**values, **extra}, cls.__name__).validate()


def eval_sets(cfg: PrimitivesEvalConfig) -> dict[str, list[Sample]]:
    """Every held-out set, by name; a pure function of the config."""
    s = cfg.seed
    scene, scene_u = _cfg(scenes.SceneConfig, cfg.scene), _cfg(scenes.SceneConfig, cfg.scene, style="unseen")
    path, path_u = _cfg(paths.PathConfig, cfg.path_cfg), _cfg(paths.PathConfig, cfg.path_cfg, style="unseen")
    sets = {
        "counting": [scenes.counting(s, i, scene, "trigger") for i in range(cfg.counting)],
        "pointing": [scenes.pointing(s, i, scene, "trigger") for i in range(cfg.pointing)],
        "grounding": [scenes.grounding(s, i, scene, "trigger") for i in range(cfg.grounding)],
        "spatial": [scenes.spatial(s, i, scene, "trigger") for i in range(cfg.spatial)],
        "path": [paths.path(s, i, path, "trigger") for i in range(cfg.path)],
        "counting_unseen": [scenes.counting(s + 1, i, scene_u, "trigger") for i in range(cfg.unseen)],
        "path_unseen": [paths.path(s + 1, i, path_u, "trigger") for i in range(cfg.unseen)],
        "counting_auto": [scenes.counting(s + 2, i, scene, "auto") for i in range(cfg.general)],
        "general": [scenes.general(s, i, scene, "auto") for i in range(cfg.general)],
    }
    for tier in cfg.maze_tiers:
        lo, hi = mazes.TIERS[tier]
        mc = _cfg(mazes.MazeConfig, cfg.maze, sizes=tuple(range(lo, hi + 1)))
        sets[f"maze_{tier}"] = [mazes.maze(s, i, mc, "trigger") for i in range(2 * cfg.maze_pairs_per_tier)]
    lo, hi = mazes.TIERS[cfg.maze_tiers[0]]
    mu = _cfg(mazes.MazeConfig, cfg.maze, sizes=tuple(range(lo, hi + 1)), style="unseen")
    sets["maze_unseen"] = [mazes.maze(s + 1, i, mu, "trigger") for i in range(2 * cfg.unseen)]
    return sets


def _direct(sample: Sample) -> str:
    """The ablation prompt: the same question, no trigger, "Answer directly."."""
    return sample.prompt.removeprefix(TRIGGER) + DIRECT_SUFFIX


def _acc(samples, texts) -> float:
    return float(np.mean([answer_correct(s, t) for s, t in zip(samples, texts)])) if samples else float("nan")


def _pointing_hit(samples, texts) -> float:
    hits = []
    for s, t in zip(samples, texts):
        if not s.meta["boxes"]:
            continue
        pts = [c for p in parse_primitives(t) if p.kind == "point" for c in p.coords]
        hits.append(point_hit_rate(pts, gt_boxes=s.meta["boxes"], one_to_one=True))
    return float(np.mean(hits)) if hits else float("nan")


def _ap50(samples, texts) -> float:
    images = []
    for s, t in zip(samples, texts):
        boxes = [c for p in parse_primitives(t) if p.kind == "box" for c in p.coords]
        images.append((boxes, [1.0] * len(boxes), s.meta["boxes"]))
    return average_precision_dataset(images, iou_threshold=0.5)


def _uses(texts) -> float:
    return float(np.mean([check_syntax(t).spans > 0 for t in texts])) if texts else float("nan")


def task_of(set_name: str) -> str:
    return set_name.split("_")[0]


def evaluate_model(model, tok, sets: Mapping[str, list[Sample]], cfg: PrimitivesEvalConfig,
                   progress: bool = True) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Greedy outputs of one model on every set -> (metrics, outputs by set name)."""
    from optictx.train.primitives_task import rollouts

    def run(name: str, samples: list[Sample], prompts=None) -> list[str]:
        limit = cfg.max_new_tokens.get(task_of(name), 256)
        outs = rollouts(model, tok, samples, 1, max_new_tokens=limit, max_rows=cfg.max_rows, prompts=prompts,
                        progress=f"  {name}" if progress else None)
        return [o.texts[0] for o in outs]

    texts = {name: run(name, samples) for name, samples in sets.items() if samples}
    m: dict[str, float] = {}
    get = lambda n: (sets.get(n, []), texts.get(n, []))  # noqa: E731
    m["counting_em"] = _acc(*get("counting"))
    m["counting_em_unseen"] = _acc(*get("counting_unseen"))
    m["pointing_hit"] = _pointing_hit(*get("pointing"))
    m["grounding_ap50"] = _ap50(*get("grounding"))
    m["spatial_acc"] = _acc(*get("spatial"))
    m["path_acc"] = _acc(*get("path"))
    m["path_acc_unseen"] = _acc(*get("path_unseen"))
    maze_names = [n for n in sets if n.startswith("maze_") and n != "maze_unseen"]
    for n in maze_names:
        m[f"maze_acc_{n[5:]}"] = _acc(*get(n))
    all_maze = [(s, t) for n in maze_names for s, t in zip(*get(n))]
    m["maze_acc"] = _acc(*zip(*all_maze)) if all_maze else float("nan")
    m["maze_acc_unseen"] = _acc(*get("maze_unseen"))
    m["uses_primitives_auto"] = _uses(texts.get("counting_auto", []))
    m["direct_on_general"] = 1.0 - _uses(texts.get("general", [])) if texts.get("general") else float("nan")
    m["general_acc"] = _acc(*get("general"))
    m["mean_reward"] = float(np.mean([score(s, t).total for n, ss in sets.items() if n in texts
                                      for s, t in zip(ss, texts[n])]))
    if cfg.direct_ablation:
        for name in ("counting", "spatial", "path", *maze_names):
            samples = sets.get(name, [])
            if samples:
                out = run(f"{name}_direct", samples, [_direct(s) for s in samples])
                texts[f"{name}_direct"] = out
                key = {"counting": "counting_em_direct", "spatial": "spatial_acc_direct",
                       "path": "path_acc_direct"}.get(name, f"maze_acc_{name[5:]}_direct")
                m[key] = _acc(samples, out)
        direct_maze = [(s, t) for n in maze_names for s, t in zip(sets[n], texts.get(f"{n}_direct", []))]
        if direct_maze:
            m["maze_acc_direct"] = _acc(*zip(*direct_maze))
    return m, texts


def stage_table(results: Mapping[str, Mapping[str, float]], columns: list[str] | None = None) -> str:
    """Markdown table: one row per model/stage, one column per metric (percentages)."""
    cols = columns or ["counting_em", "pointing_hit", "grounding_ap50", "spatial_acc", "maze_acc", "path_acc",
                       "counting_em_unseen", "maze_acc_unseen", "path_acc_unseen", "counting_em_direct",
                       "maze_acc_direct", "path_acc_direct", "uses_primitives_auto", "direct_on_general"]
    cols = [c for c in cols if any(c in r for r in results.values())]
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| stage | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for name, r in results.items()]
    return "\n".join(lines)


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of b - a over the same samples, with a paired bootstrap 95% interval (resampling samples, so
    what both models found easy or hard cancels out)."""
    d = np.asarray(b, float) - np.asarray(a, float)
    if not len(d):
        return {"n": 0, "a": float("nan"), "b": float("nan"), "diff": float("nan"), "lo": float("nan"),
                "hi": float("nan")}
    boots = d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"n": len(d), "a": float(np.mean(a)), "b": float(np.mean(b)), "diff": float(d.mean()),
            "lo": float(lo), "hi": float(hi)}


def paired_comparison(sets: Mapping[str, list[Sample]], base: Mapping[str, list[str]],
                      other: Mapping[str, list[str]]) -> dict[str, dict[str, dict]]:
    """{set: {"reward": ..., "correct": ...}}: the task's accuracy reward (what GRPO optimises, with partial
    credit) and exact correctness of one model against a baseline, paired on the same held-out samples."""
    out = {}
    for name, samples in sets.items():
        if name not in base or name not in other:
            continue
        ra = [accuracy_reward(s, t) for s, t in zip(samples, base[name])]
        rb = [accuracy_reward(s, t) for s, t in zip(samples, other[name])]
        out[name] = {"reward": paired_difference([r[0] for r in ra], [r[0] for r in rb]),
                     "correct": paired_difference([float(r[1]) for r in ra], [float(r[1]) for r in rb])}
    return out


def paired_table(name_a: str, name_b: str, comparison: Mapping[str, Mapping[str, dict]]) -> str:
    lines = [f"{name_b} vs {name_a}, paired on the same samples (95% bootstrap interval of the difference):",
             "| set | n | reward a | reward b | diff [95% CI] | correct a | correct b | diff [95% CI] |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for set_name, c in comparison.items():
        r, k = c["reward"], c["correct"]
        lines.append(f"| {set_name} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} [{r['lo']:+.3f}, "
                     f"{r['hi']:+.3f}] | {100 * k['a']:.1f} | {100 * k['b']:.1f} | {100 * k['diff']:+.1f} "
                     f"[{100 * k['lo']:+.1f}, {100 * k['hi']:+.1f}] |")
    return "\n".join(lines)


def stage_models(run_dir: str | Path) -> dict[str, Path]:
    """The exported model of every finished stage of a ``run_primitives`` folder, in recipe order."""
    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.json"
    if not recipe_path.is_file():
        raise ConfigError(f"{run_dir} has no recipe.json; is it a primitives run folder?")
    recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    found = {}
    for stage in recipe.get("stages", []):
        folder = run_dir / stage["name"] / "model"
        if (folder / "config.json").is_file():
            found[stage["name"]] = folder
    return found


def evaluate_primitives(models: Mapping[str, str | Path] | str | Path, out: str | Path | None = None,
                        cfg: PrimitivesEvalConfig | dict | None = None, progress: bool = True,
                        device: str = "cpu", baseline: str | None = None) -> dict[str, dict[str, float]]:
    """Evaluate one model folder, a {name: folder} mapping, or every stage of a run folder (a stage table).

    Writes ``primitives_eval.json``, ``stage_table.md`` and the raw outputs (``outputs/<model>.jsonl``) to
    ``out`` when given. With ``baseline`` (one of the models), every other model is also compared with it
    sample by sample (:func:`paired_comparison`; in the JSON under "paired" and printed). Returns {model name:
    metrics}.
    """
    from optictx.train.primitives_task import load_model

    if isinstance(cfg, dict):
        cfg = dataclass_from(PrimitivesEvalConfig, cfg, "eval")
    cfg = (cfg or PrimitivesEvalConfig()).validate()
    if isinstance(models, (str, Path)):
        models = resolve_models([models])
    if not models:
        raise ConfigError("no model to evaluate (no finished stage in the run folder?)")
    if baseline is not None and baseline not in models:
        raise ConfigError(f"--baseline {baseline!r} is not one of the evaluated models: {sorted(models)}")
    sets = eval_sets(cfg)
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, dict[str, list[str]]] = {}
    out_dir = Path(out) if out is not None else None
    for name, folder in models.items():
        if progress:
            print(f"evaluating {name} ({folder})", flush=True)
        model, tok = load_model(folder, device=device)
        metrics, texts = evaluate_model(model, tok, sets, cfg, progress)
        results[name] = metrics
        outputs[name] = {k: v for k, v in texts.items() if k in sets}  # the ablation's prompts differ
        if out_dir is not None:
            path = out_dir / "outputs" / f"{name}.jsonl"  # "run/stage" when several runs: one folder per run
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for set_name, outs in texts.items():
                    base = set_name.removesuffix("_direct")
                    for s, t in zip(sets[base], outs):
                        f.write(json.dumps({"set": set_name, "task": s.task, "seed": s.seed, "index": s.index,
                                            "answer": s.answer, "output": t}, ensure_ascii=False) + "\n")
    paired = {name: paired_comparison(sets, outputs[baseline], outputs[name])
              for name in models if baseline is not None and name != baseline}
    for name, comparison in paired.items():
        print(paired_table(baseline, name, comparison), flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"config": asdict(cfg), "results": results, **({"paired": paired} if paired else {})}
        (out_dir / "primitives_eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        table = stage_table(results) + "".join(f"\n\n{paired_table(baseline, n, c)}" for n, c in paired.items())
        (out_dir / "stage_table.md").write_text(table + "\n", encoding="utf-8")
    return results


SIZE_TASKS = ("counting", "pointing", "grounding", "spatial", "path")


def register_cli(ev) -> None:
    from optictx.commands.reason import DEFAULT_MODEL

    p = ev.add_parser("primitives", help="counting / pointing / grounding / maze / path-tracing accuracy",
                      description="Greedy answers of visual-primitives models on held-out scenes, mazes and "
                                  "paths (and unseen styles): counting EM, pointing hit rate, grounding AP@0.5, "
                                  "maze and path accuracy, with and without primitives. Give a run folder to "
                                  "get its stage table (every finished stage).")
    p.add_argument("models", nargs="*", metavar="MODEL_OR_RUN",
                   help=f"model folders and/or primitives run folders (default: the bundled {DEFAULT_MODEL.name})")
    p.add_argument("--stages", default=None, help="only these stages of a run folder, comma separated")
    p.add_argument("--tasks", default=",".join(SIZE_TASKS),
                   help=f"which of {','.join(SIZE_TASKS)} to run (mazes: --maze-pairs)")
    p.add_argument("--samples", type=int, default=100, help="held-out samples per task (default 100)")
    p.add_argument("--maze-pairs", type=int, default=50, help="solvable/unsolvable maze pairs per tier (default 50)")
    p.add_argument("--maze-tiers", default="easy,medium", help="maze tiers, comma separated")
    p.add_argument("--unseen", type=int, default=50, help="samples per task in unseen styles")
    p.add_argument("--general", type=int, default=50, help="general questions (does it skip primitives?)")
    p.add_argument("--no-direct", action="store_true", help="skip the 'Answer directly.' ablation")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="compare every other model with this one (a stage or model name) on the same samples: "
                        "accuracy reward and exactness, mean difference with a paired bootstrap 95%% interval")
    p.add_argument("--out", default="out/eval-primitives", help="folder for primitives_eval.json, stage_table.md")
    p.set_defaults(func=run_cli)


def resolve_models(paths: Sequence[str | Path], stages: Sequence[str] | None = None) -> dict[str, Path]:
    """{name: model folder} for model folders and run folders (every finished stage, or only ``stages``)."""
    models: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if (path / "recipe.json").is_file():
            found = stage_models(path)
            for name in stages or found:
                if name not in found:
                    raise ConfigError(f"{path} has no finished stage {name!r}; finished: {sorted(found)}")
                models[name if len(paths) == 1 else f"{path.name}/{name}"] = found[name]
        elif (path / "config.json").is_file():
            models[path.name] = path
        else:
            raise ConfigError(f"{path} is neither a model folder (config.json) nor a primitives run (recipe.json)")
    return models


def run_cli(args) -> int:
    from optictx.commands.reason import DEFAULT_MODEL

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = set(tasks) - set(SIZE_TASKS)
    if bad or min(args.samples, args.maze_pairs, args.unseen, args.general) < 0:
        raise ConfigError(f"--tasks takes some of {','.join(SIZE_TASKS)} (got {sorted(bad)}); sizes must be >= 0")
    tiers = tuple(t.strip() for t in args.maze_tiers.split(",") if t.strip())
    if not tiers:
        raise ConfigError("--maze-tiers needs at least one tier (easy, medium, hard, nightmare)")
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    models = resolve_models(args.models or [DEFAULT_MODEL], stages)
    spec = {t: (args.samples if t in tasks else 0) for t in SIZE_TASKS}
    spec.update(maze_pairs_per_tier=args.maze_pairs, unseen=args.unseen, general=args.general,
                direct_ablation=not args.no_direct, maze_tiers=tiers)
    results = evaluate_primitives(models, args.out, spec, baseline=args.baseline)
    print(stage_table(results))
    print(f"wrote {Path(args.out) / 'stage_table.md'}")
    return 0
