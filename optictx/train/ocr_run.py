"""Glue for `optictx train --config configs/ocr-tiny.json`: tokenizer, model, task, loop, export."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from optictx.config import preset
from optictx.errors import ConfigError
from optictx.tokenizer import Tokenizer, train_bpe
from optictx.train.loop import TrainConfig, barrier, init_distributed, train
from optictx.train.ocr_task import OCRTask, OCRTaskConfig, OCRTrainModule, ProbeSites


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_tokenizer(recipe: dict, out: Path) -> Tokenizer:
    """Train the BPE once per run (deterministic for a seed) and keep it in the run folder."""
    from optictx.data.corpus import tokenizer_training_text

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(folder)
    if recipe.get("init_from"):  # warm start: the tokenizer must be the one the weights were trained with
        tok = Tokenizer.from_pretrained(recipe["init_from"])
        tok.save(folder)
        return tok
    spec = recipe.get("tokenizer", {})
    texts = tokenizer_training_text(spec.get("seed", 0), spec.get("samples", 20000))
    tok = train_bpe(texts, vocab_size=spec.get("vocab_size", 4096))
    tok.save(folder)
    return tok


def apply_overrides(cfg, overrides: dict) -> None:
    """Recipe ``model_overrides`` {"sam": {...}, "clip": {...}, "language": {...}} on top of the preset."""
    targets = {"sam": cfg.vision_config.sam, "clip": cfg.vision_config.clip, "language": cfg.language_config}
    for part, values in overrides.items():
        if part not in targets:
            raise ConfigError(f"model_overrides: unknown part {part!r}; use sam, clip or language")
        for key, value in values.items():
            if not hasattr(targets[part], key):
                raise ConfigError(f"model_overrides.{part}: unknown key {key!r}")
            setattr(targets[part], key, tuple(value) if isinstance(value, list) else value)
    vision = cfg.vision_config
    cfg.projector_config.input_dim = vision.clip.width + vision.sam.downsample_channels[-1]
    cfg.projector_config.n_embed = cfg.language_config.hidden_size


def build_model(recipe: dict, tok: Tokenizer):
    from optictx.model.vlm import DeepseekOCRForCausalLM

    cfg = preset(recipe.get("model", "ocr-tiny"))
    apply_overrides(cfg, recipe.get("model_overrides", {}))
    cfg.language_config.vocab_size = tok.vocab_size
    cfg.language_config.bos_token_id, cfg.language_config.eos_token_id = tok.bos_id, tok.eos_id
    cfg.language_config.pad_token_id = tok.pad_id
    torch.manual_seed(recipe.get("train", {}).get("seed", 0))
    return cfg, DeepseekOCRForCausalLM(cfg, image_token_id=tok.image_token_id)


def prepare_ocr(recipe: dict, out: str | Path):
    """(train module, task, loop config) for a recipe; rank 0 writes the run folder, others wait for it."""
    out = Path(out)
    rank, _ = init_distributed()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        build_tokenizer(recipe, out)
    barrier()
    tok = build_tokenizer(recipe, out)
    cfg, model = build_model(recipe, tok)
    if rank == 0:
        cfg.save(out / "config.json")
    if recipe.get("init_from"):
        # Warm start from an exported model folder (e.g. the bundled weights): used only when the run has no
        # checkpoint yet; resuming from a checkpoint restores everything, optimizer included.
        from optictx.weights import load_into

        load_into(model, recipe["init_from"], dtype=torch.float32, device="cpu")
    task_cfg = OCRTaskConfig(**_fields(OCRTaskConfig, recipe.get("ocr", {})))
    net = OCRTrainModule(model, *ProbeSites.cells(task_cfg.page_size, task_cfg.grid))
    train_cfg = TrainConfig(out_dir=str(out), **_fields(TrainConfig, recipe.get("train", {})))
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {recipe.get('model')}: {n_params / 1e6:.2f}M parameters; vocab {tok.vocab_size}", flush=True)
    return net, OCRTask(tok, task_cfg), train_cfg


def run_ocr(recipe: dict, out: str | Path) -> dict:
    net, task, train_cfg = prepare_ocr(recipe, out)
    return train(net, task, train_cfg)


def export_run(run_dir: str | Path, dest: str | Path, dtype: str = "bfloat16") -> Path:
    """Latest checkpoint of a run -> a model folder (config.json, safetensors, tokenizer) like the official one."""
    from optictx.model.vlm import DeepseekOCRForCausalLM
    from safetensors.torch import load_file

    from optictx.train.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"no checkpoint in {run_dir}/checkpoints")
    recipe = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_pretrained(run_dir / "tokenizer")
    cfg, model = build_model(recipe, tok)
    # only the model's weights: the training-only probes may have changed shape since the run was made
    weights = {k[len("model."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
               if k.startswith("model.")}
    model.load_state_dict(weights)
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    dest = Path(dest)
    model.save_pretrained(dest, dtype=dtype)
    tok.save(dest)
    (dest / "training.json").write_text(json.dumps({"checkpoint_step": state["step"], "recipe": recipe}, indent=2)
                                        + "\n", encoding="utf-8")
    return dest
