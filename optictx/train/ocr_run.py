"""Glue for `optictx train --config configs/ocr-tiny.json`: tokenizer, model, task, loop, export."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from optictx.config import dataclass_from, preset
from optictx.errors import ConfigError
from optictx.grid_tokenizer import GridTokenizer
from optictx.tokenizer import Tokenizer, train_bpe
from optictx.train.distributed import barrier, init_distributed
from optictx.train.loop import TrainConfig, train
from optictx.train.ocr_task import OCRTask, OCRTaskConfig, OCRTrainModule, ProbeSites


def build_tokenizer(recipe: dict, out: Path) -> Tokenizer:
    """Train the BPE once per run (deterministic for a seed) and keep it in the run folder."""
    from optictx.data.corpus import tokenizer_training_text

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(folder)
    spec = recipe.get("tokenizer", {})
    if spec.get("kind") == "grid":  # cell-tagged characters (optictx.grid_tokenizer): nothing to train
        from optictx.grid_tokenizer import build_grid_tokenizer

        tok = build_grid_tokenizer()
        tok.save(folder)
        return tok
    if recipe.get("init_from"):  # warm start: the tokenizer must be the one the weights were trained with
        tok = Tokenizer.from_pretrained(recipe["init_from"])
        tok.save(folder)
        return tok
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
    model = DeepseekOCRForCausalLM(cfg, image_token_id=tok.image_token_id)
    if isinstance(tok, GridTokenizer):
        factorized_init(model, tok)
    return cfg, model


@torch.no_grad()
def factorized_init(model, tok: "GridTokenizer") -> None:
    """Start every tagged character's embedding and output row as (its character's) + (its cell's) vector.

    The 3,040 tags are 95 characters x 32 cells; sharing the character part from the start lets what is learnt
    about "e" at one cell carry to the other 31 instead of learning 32 unrelated rows.
    """
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        std = float(weight.std())
        chars = {ch: torch.randn(weight.shape[1]) * std / 2**0.5 for ch in {k for k, _ in tok.tag_ids}}
        cells = torch.randn(tok.geom.cells, weight.shape[1]) * std / 2**0.5
        for (ch, cell), i in tok.tag_ids.items():
            weight[i] = chars[ch] + cells[cell]


def warm_start(model, folder: str | Path) -> None:
    """Load an exported model folder into ``model``; token embeddings and the output head are kept as they are
    when the vocabularies differ (e.g. a BPE model's encoder and decoder layers under the grid vocabulary)."""
    from optictx.weights import checkpoint_files, iter_tensors, load_into, read_header

    own = model.state_dict()
    vocab_keys = {"model.embed_tokens.weight", "lm_head.weight"}
    files = checkpoint_files(folder)  # shapes from the headers: the tensors are read once, below
    shapes = {k: tuple(read_header(f)[k]["shape"]) for k, f in files.items() if k in vocab_keys}
    if all(shape == tuple(own[k].shape) for k, shape in shapes.items()):
        load_into(model, folder, dtype=torch.float32, device="cpu")
        return
    found = dict(iter_tensors(folder, torch.float32, "cpu"))
    print(f"init_from {folder}: another vocabulary; token embeddings and lm_head start fresh", flush=True)
    missing = own.keys() - found.keys() - vocab_keys
    if missing:
        raise ConfigError(f"init_from {folder} lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in found.items() if k not in vocab_keys}, strict=False)


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
        warm_start(model, recipe["init_from"])
    task_cfg = dataclass_from(OCRTaskConfig, recipe.get("ocr"), "ocr")
    net = OCRTrainModule(model, *ProbeSites.cells(task_cfg.page_size, task_cfg.grid))
    if recipe.get("init_probes_from"):
        # the probes of a warm start's own run (a checkpoint folder): fresh probes would send noise into
        # an encoder that already sees every glyph until they relearn
        from safetensors.torch import load_file

        found = load_file(str(Path(recipe["init_probes_from"]) / "model.safetensors"))
        probes = {k: v for k, v in found.items() if k.split(".")[0] in ("glyph_probe", "token_probe")}
        if not probes:
            raise ConfigError(f"init_probes_from {recipe['init_probes_from']}: no probe weights")
        net.load_state_dict(probes, strict=False)
    train_cfg = dataclass_from(TrainConfig, {"out_dir": str(out), **recipe.get("train", {})}, "train")
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {recipe.get('model')}: {n_params / 1e6:.2f}M parameters; vocab {tok.vocab_size}", flush=True)
    return net, OCRTask(tok, task_cfg), train_cfg


def run_ocr(recipe: dict, out: str | Path) -> dict:
    net, task, train_cfg = prepare_ocr(recipe, out)
    return train(net, task, train_cfg)


def export_run(run_dir: str | Path, dest: str | Path, dtype: str = "bfloat16") -> Path:
    """Latest checkpoint of a run -> a model folder (config.json, safetensors, tokenizer) like the official one."""
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
