"""The primitives pipeline glue: recipe validation, mixtures, model folders, the stage table, `optictx reason`,
and (slow) the whole smoke recipe end to end."""
import json

import numpy as np
import pytest
import torch

from optictx.cli import main
from optictx.data import mazes
from optictx.errors import ConfigError
from optictx.eval.primitives_eval import stage_table
from optictx.model.reasoner import PrimitivesModel
from optictx.tokenizer import train_bpe
from optictx.train.primitives_run import check_recipe
from optictx.train.primitives_task import Mixture, load_model, prompt_ids, save_model, tokenizer_texts

STAGE = {"name": "a", "kind": "sft", "init": None, "tasks": {"counting": 1}}


def test_recipe_checks_catch_mistakes_before_training():
    check_recipe({"stages": [STAGE]})
    bad = [
        [],
        [STAGE | {"kind": "dpo"}],
        [STAGE, STAGE],
        [STAGE | {"init": "later"}],
        [STAGE, {"name": "g", "kind": "grpo", "tasks": {"counting": 1}}],  # GRPO from nothing
        [STAGE, {"name": "r", "kind": "rft", "init": "a", "tasks": {"counting": 1}}],  # no experts
        [STAGE, {"name": "o", "kind": "opd", "init": "a", "tasks": {"counting": 1}}],  # no teachers
        [STAGE | {"tasks": {"knitting": 1}}],
        [STAGE | {"scene": {"side": 100}}],
    ]
    for stages in bad:
        with pytest.raises(ConfigError):
            check_recipe({"stages": stages})
    for f in ("configs/primitives-smoke.json", "configs/primitives-tiny.json", "configs/primitives-tiny-short.json"):
        check_recipe(json.load(open(f)))


def test_cap_steps_bounds_every_stage_without_touching_the_original():
    from optictx.train.primitives_run import cap_steps

    recipe = json.load(open("configs/primitives-tiny.json"))
    capped = cap_steps(recipe, 5)
    assert [s["train"]["max_steps"] for s in capped["stages"]] == [5] * len(recipe["stages"])
    assert recipe["stages"][0]["train"]["max_steps"] == 2000
    assert cap_steps({"stages": [{"train": {"max_steps": 3}}]}, 5)["stages"][0]["train"]["max_steps"] == 3
    with pytest.raises(ConfigError):
        cap_steps(recipe, 0)


def test_mixture_draws_are_deterministic_and_follow_the_weights():
    mix = Mixture({"counting": 3, "general": 1}, modes={"trigger": 1, "auto": 1})
    draws = [mix.draw(0, i) for i in range(400)]
    assert draws == [mix.draw(0, i) for i in range(400)]
    share = sum(t == "counting" for t, _ in draws) / 400
    assert 0.68 <= share <= 0.82
    assert {m for _, m in draws} == {"trigger", "auto"}
    per_task = Mixture({"counting": 1, "maze": 1}, modes={"counting": {"direct": 1}, "maze": {"trigger": 1}})
    assert all((t, m) in {("counting", "direct"), ("maze", "trigger")} for t, m in
               (per_task.draw(1, i) for i in range(50)))
    with pytest.raises(ConfigError):
        Mixture({"counting": 1}, modes={"shouting": 1})


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory, micro_config):
    mixture = Mixture({"maze": 1, "general": 1})
    tok = train_bpe(tokenizer_texts(mixture, 0, 40), vocab_size=300)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("micro") / "model"
    model = PrimitivesModel(micro_config(tok))
    save_model(model, tok, folder)
    return folder, model, tok


def test_model_folder_round_trip(micro_folder):
    folder, model, tok = micro_folder
    loaded, tok2 = load_model(folder)
    assert tok2.vocab_size == tok.vocab_size and loaded.config == model.config
    ids = torch.tensor([prompt_ids(tok, 36, "hello")])
    pix = [torch.randn(3, 252, 252)]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pix).logits, model.eval()(input_ids=ids,
                                                                                          pixel_values=pix).logits)


def test_reason_streams_draws_and_reports_kv_entries(micro_folder, tmp_path, capsys):
    folder, model, tok = micro_folder
    image = tmp_path / "maze.png"
    mazes.maze(0, 0, mazes.MazeConfig(sizes=(5,))).image.save(image)  # 252 px: 6x6 = 36 tokens
    out = tmp_path / "drawn.png"
    code = main(["reason", str(image), "Is there a way?", "--model", str(folder), "--max-new-tokens", "6",
                 "--out", str(out), "--json"])
    assert code == 0 and out.is_file()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["kv"]["image_tokens"] == 36 and record["kv"]["layers"] == [["window", 16], ["CSA", 9]]
    assert record["annotated"] == str(out)
    code = main(["reason", str(image), "q", "--model", str(tmp_path / "nowhere")])
    assert code != 0 and "no primitives model" in capsys.readouterr().err


def test_stage_table_formats_percentages_and_gaps():
    table = stage_table({"sft": {"counting_em": 0.5, "maze_acc": float("nan")}, "grpo": {"counting_em": 0.625}})
    lines = table.splitlines()
    assert lines[0] == "| stage | counting_em | maze_acc |"
    assert lines[2] == "| sft | 50.0 | – |" and lines[3] == "| grpo | 62.5 | – |"


@pytest.mark.slow
def test_smoke_recipe_runs_every_stage_and_the_stage_table(tmp_path):
    from optictx.train.primitives_run import run_primitives

    recipe = json.load(open("configs/primitives-smoke.json"))
    results = run_primitives(recipe, tmp_path)
    names = [s["name"] for s in recipe["stages"]]
    assert all((tmp_path / n / "model" / "config.json").is_file() for n in names)
    assert set(results["eval"]) == set(recipe["eval"]["stages"])
    assert all(np.isfinite(r["mean_reward"]) for r in results["eval"].values())
    assert (tmp_path / "eval" / "stage_table.md").is_file()
    again = run_primitives(recipe, tmp_path)  # every stage is done: nothing retrains
    assert set(again) >= set(names)


def test_grpo_rft_and_opd_stages_run_from_cached_screening_pools(tmp_path):
    """A random model has no normal prompt, so the pools the stages would screen are written by hand."""
    from optictx.train.grpo import PoolEntry, save_pool
    from optictx.train.primitives_run import _data_seed, run_primitives

    smoke = json.load(open("configs/primitives-smoke.json"))
    one = {"max_steps": 1, "warmup_steps": 1, "eval_every": 100, "log_every": 1}
    tasks = {"counting": 1, "general": 1}
    stages = [
        {"name": "base", "kind": "sft", "init": None, "tasks": tasks, "train": one,
         "sft": {"batch_size": 2, "eval_samples": 2, "eval_decode": 1, "max_new_tokens": 4}},
        {"name": "expert", "kind": "grpo", "init": "base", "tasks": tasks, "train": one,
         "grpo": {"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 4, "pool_size": 2,
                  "screen_rollouts": 2, "eval_samples": 1}},
        {"name": "unified", "kind": "rft", "init": "base", "experts": ["expert"], "tasks": tasks, "train": one,
         "screen": {"pool_size": 2, "screen_rollouts": 2}, "easy_fraction": 0.0,
         "sft": {"batch_size": 2, "eval_samples": 2, "eval_decode": 0}},
        {"name": "student", "kind": "opd", "init": "unified", "teachers": [{"stage": "expert"}], "tasks": tasks,
         "train": one, "opd": {"prompts_per_step": 1, "rollouts_per_prompt": 2, "max_new_tokens": 4,
                               "eval_samples": 1}},
    ]
    recipe = {k: smoke[k] for k in ("model", "model_overrides", "tokenizer", "data")} | {"stages": stages}
    for name, index, expert in (("expert", 1, "base"), ("unified", 2, "expert")):
        seed = _data_seed(recipe, index, stages[index])
        pool = [PoolEntry("counting", seed, 0, "trigger", ["\\boxed{1}", "\\boxed{2}"], [True, False], [1.0, 0.0]),
                PoolEntry("general", seed, 1, "auto", ["\\boxed{3}", "\\boxed{3}"], [True, True], [1.0, 1.0])]
        (tmp_path / name).mkdir(parents=True)
        save_pool(pool, tmp_path / name / f"pool_{expert}.jsonl")
    results = run_primitives(recipe, tmp_path)
    assert all((tmp_path / s["name"] / "model" / "config.json").is_file() for s in stages)
    assert "skipped" not in json.dumps(results)
    assert results["expert"]["step"] == 1 and "kl" in results["expert"]
    records = (tmp_path / "unified" / "records.jsonl").read_text().splitlines()
    assert [json.loads(r)["text"] for r in records] == ["\\boxed{1}"]  # the normal prompt's correct rollout only


def test_only_trains_the_picked_stages_once_their_inputs_are_done(tmp_path, capsys):
    from optictx.train.primitives_run import run_primitives

    smoke = json.load(open("configs/primitives-smoke.json"))
    one = {"max_steps": 1, "warmup_steps": 1, "eval_every": 100, "log_every": 1}
    sft = {"batch_size": 2, "eval_samples": 2, "eval_decode": 0}
    stages = [{"name": "base", "kind": "sft", "init": None, "tasks": {"counting": 1}, "train": one, "sft": sft},
              {"name": "more", "kind": "sft", "init": "base", "tasks": {"counting": 1}, "train": one, "sft": sft}]
    recipe = {k: smoke[k] for k in ("task", "model", "model_overrides", "tokenizer", "data", "eval")} | {"stages": stages}
    with pytest.raises(ConfigError, match="not done"):
        run_primitives(recipe, tmp_path, stages=["more"])
    with pytest.raises(ConfigError, match="unknown stage"):
        run_primitives(recipe, tmp_path, stages=["mor"])
    assert set(run_primitives(recipe, tmp_path, stages=["base"])) == {"base"}  # no stage table either
    assert not (tmp_path / "more").exists() and not (tmp_path / "eval").exists()
    recipe_file = tmp_path / "recipe-in.json"
    recipe_file.write_text(json.dumps(recipe))
    assert main(["train", "--config", str(recipe_file), "--out", str(tmp_path), "--only", "more"]) == 0
    assert (tmp_path / "more" / "model" / "config.json").is_file() and not (tmp_path / "eval").exists()
    assert main(["train", "--config", "configs/ocr-tiny.json", "--out", str(tmp_path / "o"), "--only", "x"]) != 0
    assert "--only" in capsys.readouterr().err


def test_export_stage_writes_a_bf16_folder_that_loads(micro_folder, tmp_path):
    from optictx.train.primitives_run import export_stage

    folder, model, tok = micro_folder
    run = tmp_path / "run"
    (run / "opd").mkdir(parents=True)
    import shutil

    shutil.copytree(folder, run / "opd" / "model")
    dest = export_stage(run, "opd", tmp_path / "ship")
    from safetensors import safe_open

    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    loaded, _ = load_model(dest)
    assert torch.allclose(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    assert json.loads((dest / "training.json").read_text())["stage"] == "opd"


def test_patch_embedding_gradient_is_exact_with_onednn_off():
    """The pipeline trains with oneDNN off because its Conv2d weight gradient is wrong on our CPUs (see
    primitives_run); this is the canary that the setting it relies on gives the float64 answer."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 64, 14, stride=14)
    x = torch.rand(4, 3, 126, 126) * 2 - 1
    with torch.backends.mkldnn.flags(enabled=False):
        y = conv(x)
        g = torch.randn_like(y)
        y.backward(g)
    w = conv.weight.detach().double().requires_grad_()
    torch.nn.functional.conv2d(x.double(), w, None, stride=14).backward(g.double())
    assert float((conv.weight.grad.double() - w.grad).abs().max() / w.grad.abs().max()) < 1e-5


def test_grounding_auxiliaries_targets_and_gradients(micro_folder):
    from optictx.train.primitives_task import (PrimitivesSFTTask, PrimitivesTrainModule, SFTConfig,
                                               appearance_targets, pointer_targets)

    folder, model, tok = micro_folder
    cfg = model.config  # block2x2 order
    pixels = torch.zeros(3, 126, 126)
    pixels[0, 84:, 84:] = 1.0  # the bottom-right 42x42 cell is red-ish
    app = appearance_targets(pixels, cfg)
    assert app.shape == (9, 27)
    # 3x3 tokens in block2x2 order: cell (0,0),(0,1),(1,0),(1,1), then the right column, then the bottom row
    assert app[8].view(9, 3)[:, 0].eq(1).all() and app[:8].abs().sum() == 0
    answer = "<|point|>[[900,900],[100,500]]<|/point|>"
    head = 20
    targets = pointer_targets(tok, answer, head, pixels, cfg)
    assert [slot for _, slot, _, _, _ in targets] == [8, 2]  # (2,2) -> last slot; (row 1, col 0) -> slot 2
    assert [(x, y) for _, _, x, y, _ in targets] == [(900 / 999, 900 / 999), (100 / 999, 500 / 999)]
    starts = [a for a, _ in tok.hf.encode(answer, add_special_tokens=False).offsets]
    for (q, _, _, _, _), digit_at in zip(targets, (answer.index("900"), answer.index("100"))):
        assert starts[q - head + 1] == digit_at  # the next token starts the group's first number

    mixture = Mixture({"pointing": 1}, scene={"side": 126, "max_objects": 3, "max_count": 2, "zero_prob": 0.0})
    task = PrimitivesSFTTask(tok, cfg, mixture, SFTConfig(batch_size=2, appearance_weight=1.0, pointer_weight=1.0,
                                                           coord_weight=1.0))
    batch = task.batch(0, 0, 0, 1)
    assert len(batch["pointers"]) >= 2
    # guided positions: from each group's pointer position to the one before its last digit, on its slot
    guide = batch["guide"]
    for row, q, slot in batch["pointers"].tolist():
        assert guide[row, q] == slot
    written = tok.decode(batch["input_ids"][:, 1:][guide[:, :-1] >= 0].tolist())
    assert set(written) <= set("0123456789,") and written.count(",") >= len(batch["pointers"])
    net = PrimitivesTrainModule(model).train()
    loss, parts = task.loss(net, batch, 0)
    assert parts["appearance"] > 0 and parts["pointer"] > 0 and parts["coord"] > 0
    assert parts["loss"] == pytest.approx(parts["lm"] + parts["appearance"] + parts["pointer"] + parts["coord"],
                                          rel=1e-5)
    task.cfg.guide_weight = 1.0
    _, parts = task.loss(net, batch, 0)
    assert parts["guide"] == 0  # the micro model's 16-token window no longer holds the image at the answer
    attns = [layer.self_attn for layer in model.layers]
    windows = [a.window for a in attns]
    try:
        for a in attns:
            a.window = 1024
        _, parts = task.loss(net, batch, 0)
    finally:
        for a, w in zip(attns, windows):
            a.window = w
    assert parts["guide"] > 0
    assert parts["loss"] == pytest.approx(sum(parts[k] for k in ("lm", "appearance", "pointer", "coord", "guide")),
                                          rel=1e-5)
    loss.backward()
    for p in (net.appearance.weight, net.ptr_q.weight, net.ptr_k.weight, net.coord.weight,
              model.vision.vit.patch_embed.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()


def test_primitives_bpe_spells_every_digit_and_keeps_the_special_ids():
    from optictx.train.primitives_run import train_primitives_bpe

    mixture = Mixture({"maze": 1, "counting": 1})
    tok = train_primitives_bpe(tokenizer_texts(mixture, 0, 30), vocab_size=400)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (0, 1, 2, 3)
    text = "<|point|>[[123,45],[999,7]]<|/point|> \\boxed{True}"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digits = [tok.hf.id_to_token(i) for i in ids if tok.hf.id_to_token(i).isdigit()]
    assert digits == list("12345999" "7")
    assert tok.token_id("<|point|>") in ids


def test_bundled_primitives_model_looks_at_the_image():
    """The shipped ``primitives-tiny`` reads its image: on held-out scenes, teacher-forced boxes and points cost
    less with their own image than with another scene's. A blind model (what the first 500 steps without
    guided attention gave: 0.002–0.027 nats) has a gap of ~0; the short run's weights (shipped until 2026-11-30)
    measured 0.198, the shipped long-pretrained ones 0.806."""
    from pathlib import Path

    from optictx.train.primitives_task import PrimitivesSFTTask, SFTConfig

    folder = Path(__file__).resolve().parent.parent / "optictx" / "weights" / "primitives-tiny"
    model, tok = load_model(folder)
    task = PrimitivesSFTTask(tok, model.config, Mixture({"grounding": 1, "pointing": 1}, modes={"trigger": 1}),
                             SFTConfig(batch_size=16, eval_samples=32, eval_decode=0, eval_seed=5_000_011))
    with torch.backends.mkldnn.flags(enabled=False):
        logs = task.evaluate(model, 0)
    assert logs["gap"] > 0.5, logs
    assert json.loads((folder / "training.json").read_text())["stage"] == "sft_pointing"


def test_eval_primitives_cli_writes_a_table_and_refuses_bad_arguments(micro_folder, tmp_path, capsys):
    folder, _, _ = micro_folder
    out = tmp_path / "ev"
    code = main(["eval", "primitives", str(folder), "--tasks", "counting,path", "--samples", "2", "--maze-pairs", "0",
                 "--unseen", "0", "--general", "0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "primitives_eval.json").read_text())["results"]
    assert set(results) == {folder.name} and 0 <= results[folder.name]["counting_em"] <= 1
    assert "counting_em" in (out / "stage_table.md").read_text()
    for bad in (["--tasks", "knitting"], ["--samples", "-1"], ["--maze-tiers", ""]):
        assert main(["eval", "primitives", str(folder), *bad, "--out", str(out)]) != 0
    assert main(["eval", "primitives", str(tmp_path / "nowhere")]) != 0
    assert "neither a model folder" in capsys.readouterr().err
    # two run folders: their stages are named run/stage, and each run's outputs get their own folder
    import shutil

    runs = [tmp_path / "r1", tmp_path / "r2"]
    for run in runs:
        shutil.copytree(folder, run / "sft" / "model")
        (run / "recipe.json").write_text(json.dumps({"stages": [{"name": "sft"}]}))
    assert main(["eval", "primitives", *map(str, runs), "--tasks", "counting", "--samples", "1", "--maze-pairs", "0",
                 "--unseen", "0", "--general", "0", "--no-direct", "--out", str(out)]) == 0
    assert set(json.loads((out / "primitives_eval.json").read_text())["results"]) == {"r1/sft", "r2/sft"}
    assert (out / "outputs" / "r1" / "sft.jsonl").is_file() and (out / "outputs" / "r2" / "sft.jsonl").is_file()
    # --baseline: the same weights twice are paired to a difference of exactly zero
    assert main(["eval", "primitives", *map(str, runs), "--tasks", "counting", "--samples", "2", "--maze-pairs", "0",
                 "--unseen", "0", "--general", "0", "--no-direct", "--baseline", "r1/sft", "--out", str(out)]) == 0
    paired = json.loads((out / "primitives_eval.json").read_text())["paired"]["r2/sft"]["counting"]
    assert paired["reward"]["n"] == 2 and paired["reward"]["diff"] == paired["correct"]["diff"] == 0.0
    assert "r2/sft vs r1/sft, paired" in (out / "stage_table.md").read_text()
    assert main(["eval", "primitives", *map(str, runs), "--baseline", "sft", "--out", str(out)]) != 0
    assert "not one of the evaluated models" in capsys.readouterr().err


def test_paired_comparison_scores_both_models_on_the_same_samples():
    from optictx.data.scenes import counting
    from optictx.eval.primitives_eval import paired_comparison, paired_difference

    samples = [counting(7, i) for i in range(6)]
    truth = [f"\\boxed{{{s.answer}}}" for s in samples]
    off_by_one = [f"\\boxed{{{int(s.answer) + 1}}}" for s in samples]
    c = paired_comparison({"counting": samples}, {"counting": off_by_one}, {"counting": truth})["counting"]
    assert c["correct"]["a"] == 0.0 and c["correct"]["b"] == 1.0 and c["correct"]["diff"] == 1.0
    assert c["reward"]["b"] == pytest.approx(0.7) and 0 < c["reward"]["a"] < 0.7
    assert c["reward"]["lo"] <= c["reward"]["diff"] <= c["reward"]["hi"]
    # one of four samples gained: a resample holds it k times, k ~ Binomial(4, 1/4); P(k = 0) = 32% puts the
    # 2.5% quantile at 0, P(k >= 3) = 5.1% and P(k = 4) = 0.4% put the 97.5% quantile at 3/4
    d = paired_difference([0, 1, 0, 1], [1, 1, 0, 1])
    assert d["diff"] == 0.25 and d["lo"] == 0.0 and d["hi"] == 0.75
