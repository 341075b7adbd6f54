"""Glue for ``optictx train --config configs/primitives-*.json``: the whole visual-primitives pipeline of
lineage §5.3 as a list of recipe stages, each trained (or resumed) with the generic loop::

    pretrain (boxes + points) ─┬─ sft_grounding ── grpo_grounding ─┐
                               ├─ sft_pointing ─── grpo_pointing ──┼─ rft (from pretrain, on both experts'
                               └─ sft_direct (ablation)            │   filtered rollouts) ── opd (both experts)

A stage is ``{"name", "kind": "sft"|"grpo"|"rft"|"opd", "init": <earlier stage or null>, "tasks": {...},
"modes": {...}, "scene"/"maze"/"path": {...overrides of recipe "data"}, "train": {...TrainConfig},
"sft"/"grpo"/"opd": {...task config}}``. Each writes ``OUT/<name>/`` (checkpoints, metrics.csv, loss.png) and
exports ``OUT/<name>/model`` (config.json, model.safetensors, tokenizer) when done; a finished stage is skipped
on the next call, an unfinished one resumes from its last checkpoint. The BPE is trained once per run on
prompts and answers of every stage's mixture. With ``"eval"`` in the recipe, every stage (or the ``"stages"``
listed there) is evaluated on the same held-out sets at the end (``OUT/eval/stage_table.md``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from optictx.config import dataclass_from
from optictx.errors import ConfigError
from optictx.tokenizer import Tokenizer, train_bpe
from optictx.train.distributed import init_distributed
from optictx.train.loop import TrainConfig, train
from optictx.train.primitives_task import (Mixture, PrimitivesSFTTask, PrimitivesTrainModule, SFTConfig, load_model,
                                           read_records, save_model, tokenizer_texts)

KINDS = ("sft", "grpo", "rft", "opd")


# ----------------------------------------------------------------------------- recipe pieces


def stage_mixture(recipe: dict, stage: dict) -> Mixture:
    """The stage's tasks/modes over the recipe's generator configs (stage keys override ``data``)."""
    data = recipe.get("data", {})
    tasks = stage.get("tasks")
    if not tasks:
        raise ConfigError(f"stage {stage.get('name')!r} needs a non-empty 'tasks' mixture")
    kwargs: dict[str, Any] = {"tasks": tasks}
    if "modes" in stage:
        kwargs["modes"] = stage["modes"]
    for part in ("scene", "maze", "path"):
        kwargs[part] = {**data.get(part, {}), **stage.get(part, {})}
    return Mixture(**kwargs)


def stage_inputs(stage: dict) -> list[str]:
    """The earlier stages a stage starts from: its init, RFT experts and OPD teachers."""
    refs = [stage.get("init")] + list(stage.get("experts", [])) + [t.get("stage") for t in stage.get("teachers", [])]
    return [r for r in refs if r is not None]


def check_recipe(recipe: dict) -> list[dict]:
    """Validate the stage graph before any training starts (a typo must not waste hours)."""
    stages = recipe.get("stages")
    if not stages:
        raise ConfigError("a primitives recipe needs a non-empty 'stages' list")
    seen: set[str] = set()
    for st in stages:
        name, kind = st.get("name"), st.get("kind")
        if not name or name in seen:
            raise ConfigError(f"stage names must be unique and non-empty, got {name!r}")
        if kind not in KINDS:
            raise ConfigError(f"stage {name}: kind {kind!r} is not one of {KINDS}")
        for ref in stage_inputs(st):
            if ref not in seen:
                raise ConfigError(f"stage {name} refers to {ref!r}, which is not an earlier stage")
        if kind in ("grpo", "opd") and not st.get("init"):
            raise ConfigError(f"stage {name}: {kind} starts from a trained stage ('init')")
        if kind == "rft" and not st.get("experts"):
            raise ConfigError(f"stage {name}: rft needs 'experts' (stages whose rollouts it trains on)")
        if kind == "opd" and not st.get("teachers"):
            raise ConfigError(f"stage {name}: opd needs 'teachers'")
        stage_mixture(recipe, st)
        seen.add(name)
    return stages


def build_tokenizer(recipe: dict, out: Path) -> Tokenizer:
    """One BPE per run, trained on prompts and answers of every stage's mixture (kept in ``OUT/tokenizer``)."""
    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(folder)
    spec = recipe.get("tokenizer", {})
    n, seed = spec.get("samples", 3000), spec.get("seed", 0)
    stages = recipe["stages"]
    texts: list[str] = []
    for k, st in enumerate(stages):
        texts += tokenizer_texts(stage_mixture(recipe, st), seed + k, max(1, n // len(stages)))
    tok = train_primitives_bpe(texts, spec.get("vocab_size", 4096), spec.get("individual_digits", True))
    tok.save(folder)
    return tok


def train_primitives_bpe(texts: list[str], vocab_size: int, individual_digits: bool = True) -> Tokenizer:
    """Byte-level BPE with the official special tokens; with ``individual_digits`` every digit is its own token.

    The paper writes coordinates as plain digits and does not say how they tokenize. Plain BPE splits 0-999
    irregularly ("12"+"3", "456", "9"+"9"+"9"), so a tiny model must learn a different spelling per number;
    one token per digit makes every coordinate three regular steps, hundreds digit first (coarse position).
    """
    if not individual_digits:
        return train_bpe(texts, vocab_size=vocab_size)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from optictx.tokenizer import SPECIAL_TOKENS

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def model_config(recipe: dict, tok: Tokenizer):
    from optictx.config import PrimitivesConfig, preset

    cfg = preset(recipe.get("model", "primitives-tiny"))
    if not isinstance(cfg, PrimitivesConfig):
        raise ConfigError(f"model {recipe.get('model')!r} is not a primitives preset")
    for key, value in recipe.get("model_overrides", {}).items():
        if not hasattr(cfg, key):
            raise ConfigError(f"model_overrides: PrimitivesConfig has no {key!r}")
        setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
    cfg.vocab_size, cfg.image_token_id = tok.vocab_size, tok.image_token_id
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    return cfg


def _fresh_or_init(recipe: dict, stage: dict, out: Path, tok: Tokenizer):
    from optictx.model.reasoner import PrimitivesModel

    if stage.get("init"):
        model, _ = load_model(out / stage["init"] / "model")
        return model.train()
    torch.manual_seed(recipe.get("seed", 0))
    return PrimitivesModel(model_config(recipe, tok))


def _train_config(stage: dict, folder: Path) -> TrainConfig:
    return dataclass_from(TrainConfig, {"out_dir": str(folder), **stage.get("train", {})}, f"{stage['name']}.train")


def _data_seed(recipe: dict, index: int, stage: dict) -> int:
    """Distinct sample streams per stage unless the recipe pins one."""
    return int(stage.get("seed", recipe.get("seed", 0) * 1000 + 17 * (index + 1)))


# ----------------------------------------------------------------------------- stages


def _sft(recipe, stage, index, out, tok, folder):
    model = _fresh_or_init(recipe, stage, out, tok)
    cfg = dataclass_from(SFTConfig, {"seed": _data_seed(recipe, index, stage), **stage.get("sft", {})},
                         f"{stage['name']}.sft")
    records = read_records(folder / "records.jsonl") if stage["kind"] == "rft" else None
    task = PrimitivesSFTTask(tok, model.config, stage_mixture(recipe, stage), cfg, records)
    return (PrimitivesTrainModule(model) if task.auxiliary else model), task


def _screen_pool(recipe, stage, index, out, tok, folder, expert: str, gcfg) -> list:
    """The expert's rollouts over the stage's prompt pool (cached: screening is the expensive part)."""
    from optictx.train.grpo import load_pool, save_pool, screen

    path = folder / f"pool_{expert}.jsonl"
    if path.is_file():
        return load_pool(path)
    model, _ = load_model(out / expert / "model")
    mixture = stage_mixture(recipe, stage)
    pool = screen(model, tok, mixture, _data_seed(recipe, index, stage), range(gcfg.pool_size),
                  gcfg.screen_rollouts, max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                  top_p=gcfg.top_p, sampling_seed=gcfg.seed)
    save_pool(pool, path)
    return pool


def _grpo(recipe, stage, index, out, tok, folder):
    from optictx.train.grpo import GRPOConfig, GRPOTask

    gcfg = dataclass_from(GRPOConfig, stage.get("grpo", {}), f"{stage['name']}.grpo").validate()
    pool = _screen_pool(recipe, stage, index, out, tok, folder, stage["init"], gcfg)
    buckets = {b: sum(e.bucket == b for e in pool) for b in ("easy", "normal", "hard")}
    print(f"[{stage['name']}] screened {len(pool)} prompts: {buckets}", flush=True)
    if not buckets["normal"]:
        return None, f"no normal prompt among {len(pool)} screened ({buckets})"
    policy = _fresh_or_init(recipe, stage, out, tok)
    reference, _ = load_model(out / stage["init"] / "model")
    return policy, GRPOTask(tok, policy, reference, stage_mixture(recipe, stage), gcfg, pool)


def _rft(recipe, stage, index, out, tok, folder):
    from optictx.train.distill import rft_records
    from optictx.train.grpo import GRPOConfig

    gcfg = dataclass_from(GRPOConfig, stage.get("screen", {}), f"{stage['name']}.screen").validate()
    records_path = folder / "records.jsonl"
    if not records_path.is_file():
        pools = [_screen_pool(recipe, stage, index, out, tok, folder, e, gcfg) for e in stage["experts"]]
        records = rft_records(pools, stage.get("easy_fraction", 0.05), gcfg.seed, stage.get("per_prompt", 2))
        records_path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
        print(f"[{stage['name']}] {len(records)} RFT records from {[len(p) for p in pools]} screened prompts",
              flush=True)
    if not read_records(records_path):
        return None, "no expert rollout passed the RFT filter"
    return _sft(recipe, stage, index, out, tok, folder)


def _opd(recipe, stage, index, out, tok, folder):
    from optictx.train.distill import OPDConfig, OPDTask, Teacher

    cfg = dataclass_from(OPDConfig, {"seed": _data_seed(recipe, index, stage), **stage.get("opd", {})},
                         f"{stage['name']}.opd")
    teachers = []
    for t in stage["teachers"]:
        model, _ = load_model(out / t["stage"] / "model")
        tasks = tuple(t["tasks"]) if t.get("tasks") else None
        teachers.append(Teacher(t["stage"], model, float(t.get("weight", 1.0)), tasks))
    student = _fresh_or_init(recipe, stage, out, tok)
    return student, OPDTask(tok, student, teachers, stage_mixture(recipe, stage), cfg)


BUILDERS = {"sft": _sft, "grpo": _grpo, "rft": _rft, "opd": _opd}


def run_stage(recipe: dict, stage: dict, index: int, out: Path, tok: Tokenizer) -> dict:
    folder = out / stage["name"]
    done = folder / "model" / "config.json"
    metrics_path = folder / "stage.json"
    if done.is_file():
        print(f"[{stage['name']}] already done", flush=True)
        return json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    folder.mkdir(parents=True, exist_ok=True)
    model, task = BUILDERS[stage["kind"]](recipe, stage, index, out, tok, folder)
    if model is None:  # nothing to train on: honest skip or error, as the recipe asks
        reason = task
        if stage.get("on_empty", "error") != "skip":
            raise ConfigError(f"stage {stage['name']}: {reason}; set \"on_empty\": \"skip\" to pass the init model "
                              "through unchanged (smoke runs)")
        print(f"[{stage['name']}] SKIPPED: {reason}; its model is a copy of {stage['init']}", flush=True)
        shutil.copytree(out / stage["init"] / "model", folder / "model", dirs_exist_ok=True)
        metrics = {"skipped": reason}
    else:
        n = sum(p.numel() for p in model.parameters())
        print(f"[{stage['name']}] {stage['kind']} from {stage.get('init') or 'scratch'}: {n / 1e6:.2f}M params",
              flush=True)
        metrics = train(model, task, _train_config(stage, folder))
        inner = model.model if isinstance(model, PrimitivesTrainModule) else model  # training-only heads stay out
        save_model(inner, tok, folder / "model", recipe.get("export_dtype", "float32"))
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


# oneDNN: on the AVX2 CPUs we train on, torch 2.13's oneDNN (mkldnn) Conv2d backward returns wrong weight
# gradients for patch embeddings (kernel = stride = 14 or 16): relative errors of 1-100x, sometimes inf/NaN, in
# 8 of 8 trials for [4,3,126,126] -> 64, [8,3,252,252] -> 256 and [2,3,256,256] -> 96 channels against a float64
# reference; with oneDNN off the error is ~2e-7 and a step is not slower (measured faster). A wrong patch
# gradient leaves the ViT blind (the swapped-image gap stays 0), so the pipeline runs with oneDNN off.
def run_primitives(recipe: dict, out: str | Path, stages: list[str] | None = None,
                   max_steps: int | None = None) -> dict:
    """Run (or resume) the recipe's stages in order, then the stage-table evaluation if the recipe has "eval".

    ``stages`` restricts the run to those names (their inputs must already be done); ``max_steps`` caps every
    stage's ``train.max_steps`` (quick trials of a long recipe; a top-level ``"train": {"max_steps": N}``, as
    ``optictx train --max-steps N`` writes it, means the same). Returns {stage: last logged metrics}
    (+ "eval": {stage: metrics}).
    """
    out = Path(out)
    all_stages = check_recipe(recipe)
    max_steps = max_steps if max_steps is not None else recipe.get("train", {}).get("max_steps")
    if max_steps is not None:
        recipe = cap_steps(recipe, max_steps)
        all_stages = recipe["stages"]
    if stages is not None:
        unknown = sorted(set(stages) - {st["name"] for st in all_stages})
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; the recipe has {[st['name'] for st in all_stages]}")
        _check_inputs_done(all_stages, stages, Path(out))
    _, world = init_distributed()
    if world > 1:
        raise ConfigError("the primitives pipeline runs in one process (rollouts are per process); drop torchrun")
    with torch.backends.mkldnn.flags(enabled=False):  # see the oneDNN note above
        return _run(recipe, out, all_stages, stages)




def _check_inputs_done(all_stages: list[dict], stages: list[str], out: Path) -> None:
    """A stage picked alone needs every stage it starts from (init, experts, teachers) done or picked too."""
    picked = set(stages)
    for st in all_stages:
        if st["name"] not in picked:
            continue
        for ref in stage_inputs(st):
            if ref not in picked and not (out / ref / "model" / "config.json").is_file():
                raise ConfigError(f"stage {st['name']} starts from {ref!r}, which is not done in {out}; "
                                  f"add it to the stages to train")


def cap_steps(recipe: dict, max_steps: int) -> dict:
    """A copy of the recipe whose every stage trains at most ``max_steps`` steps."""
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    recipe = json.loads(json.dumps(recipe))
    for st in recipe["stages"]:
        train_cfg = st.setdefault("train", {})
        train_cfg["max_steps"] = min(int(train_cfg.get("max_steps", max_steps)), int(max_steps))
    return recipe


def _run(recipe: dict, out: Path, all_stages: list[dict], stages: list[str] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    tok = build_tokenizer(recipe, out)
    results: dict[str, Any] = {}
    for index, stage in enumerate(all_stages):
        if stages is not None and stage["name"] not in stages:
            continue
        results[stage["name"]] = run_stage(recipe, stage, index, out, tok)
    if recipe.get("eval") is not None and stages is None:
        from optictx.eval.primitives_eval import evaluate_primitives, resolve_models

        spec = dict(recipe["eval"])
        models = resolve_models([out], spec.pop("stages", None))  # "stages": evaluate only these
        results["eval"] = evaluate_primitives(models, out / "eval", spec)
        print((out / "eval" / "stage_table.md").read_text(encoding="utf-8"), flush=True)
    return results


def export_stage(run_dir: str | Path, stage: str, dest: str | Path, dtype: str = "bfloat16") -> Path:
    """A finished stage's model -> a shippable folder (e.g. ``optictx/weights/primitives-tiny``, bf16)."""
    src = Path(run_dir) / stage / "model"
    model, tok = load_model(src)
    dest = save_model(model, tok, dest, dtype)
    recipe_path = Path(run_dir) / "recipe.json"
    info = {"stage": stage, "run": str(run_dir)}
    if recipe_path.is_file():
        info["recipe"] = json.loads(recipe_path.read_text(encoding="utf-8"))
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return dest
