"""Training loop: exact resume, checkpoint crash-safety, a 2-process DDP run that keeps ranks identical, and
FSDP matching DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optictx.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def micro_recipe(max_steps: int) -> dict:
    """A model small enough to train a few steps in seconds, with the full OCR task (render, probes, guide)."""
    return {
        "task": "ocr",
        "model": "ocr-tiny",
        "model_overrides": {
            "sam": {"width": 32, "layers": 2, "heads": 2, "global_attn_indexes": [1], "downsample_channels": [32, 64],
                    "out_chans": 32},
            "clip": {"width": 64, "layers": 1, "heads": 2, "ffn_hidden_size": 128},
            "language": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "intermediate_size": 128, "moe_intermediate_size": 32,
                         "n_routed_experts": 4, "num_experts_per_tok": 2},
        },
        "tokenizer": {"vocab_size": 400, "seed": 0, "samples": 200},
        "train": {"max_steps": max_steps, "lr": 0.002, "warmup_steps": 2, "eval_every": 1000, "log_every": 1,
                  "ckpt_every_s": 0.0, "seed": 0},
        "ocr": {"batch_size": 2, "curriculum_steps": 4, "full_lines": 3, "eval_pages": 2,
                "eval_lines": [2], "eval_decode_pages": 1, "max_new_tokens": 5},
    }


def run_recipe(recipe: dict, out: Path) -> list[dict]:
    from optictx.train.ocr_run import run_ocr

    torch.manual_seed(0)
    run_ocr(recipe, out)
    import csv

    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


class _Stop(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Interrupt after 4 of 8 steps, resume from the checkpoint: every logged loss equals the uninterrupted run."""
    from optictx.train.loop import train
    from optictx.train.ocr_run import prepare_ocr

    rec = micro_recipe(8)
    full = run_recipe(rec, tmp_path / "full")
    net, task, cfg = prepare_ocr(rec, tmp_path / "split")
    real_loss = task.loss

    def loss(net_, batch, step):
        if step == 4:
            raise _Stop  # as if killed right after the step-4 checkpoint
        return real_loss(net_, batch, step)

    task.loss = loss
    with pytest.raises(_Stop):
        train(net, task, cfg, progress=False)
    rows = run_recipe(rec, tmp_path / "split")
    a = [float(r["loss"]) for r in full]
    b = [float(r["loss"]) for r in rows]
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_checkpoint_kill_during_save_keeps_previous(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt)
    # a half-written save (as left by SIGKILL) is ignored
    (tmp_path / ".tmp-step-0000002").mkdir()
    (tmp_path / ".tmp-step-0000002" / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    fresh = torch.nn.Linear(3, 2)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    assert state["step"] == 1
    assert torch.equal(fresh.weight, model.weight)


def test_checkpoint_keeps_last_n(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


TRAIN_SCRIPT = (
    "import sys, torch, torch.distributed as dist\n"
    "from optictx.commands.train import load_recipe\n"
    "from optictx.train.ocr_run import prepare_ocr\n"
    "from optictx.train.distributed import dist_info\n"
    "from optictx.train.loop import train\n"
    "from optictx.train.sharding import is_sharded\n"
    "net, task, cfg = prepare_ocr(load_recipe(sys.argv[1]), sys.argv[2])\n"
    "if len(sys.argv) > 3:  # as if killed once step int(argv[3]) was checkpointed\n"
    "    real_loss = task.loss\n"
    "    def loss(net_, batch, step):\n"
    "        if step == int(sys.argv[3]):\n"
    "            dist.destroy_process_group()\n"
    "            raise SystemExit(0)\n"
    "        return real_loss(net_, batch, step)\n"
    "    task.loss = loss\n"
    "train(net, task, cfg, progress=False)\n"
    "rank, world = dist_info()\n"
    "assert world == 2, world\n"
    "if not is_sharded(net):\n"
    "    flat = torch.cat([p.detach().flatten() for p in net.parameters()])\n"
    "    gathered = [torch.zeros_like(flat) for _ in range(world)]\n"
    "    dist.all_gather(gathered, flat)\n"
    "    if rank == 0:\n"
    "        assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()\n"
    "        print('RANKS_IDENTICAL')\n"
    "dist.destroy_process_group()\n"
)


def torchrun_train(tmp_path: Path, recipe: dict, out: Path, port: int, stop_at: int | None = None) -> str:
    """Train ``recipe`` into ``out`` with 2 processes (gloo, CPU), stopping before step ``stop_at`` if given;
    returns stdout."""
    script = tmp_path / "train2.py"
    script.write_text(TRAIN_SCRIPT)
    path = tmp_path / f"recipe-{out.name}.json"
    path.write_text(json.dumps(recipe))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(script), str(path), str(out)] + ([str(stop_at)] if stop_at else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    assert "RANKS_IDENTICAL" in torchrun_train(tmp_path, micro_recipe(3), tmp_path / "run", 29531)


def test_fsdp_matches_ddp_and_resumes_from_its_own_checkpoint(tmp_path):
    """FSDP (sharded parameters, 2 processes) stopped after 3 steps and resumed to 5: the step-5 checkpoint
    (gathered full tensors, single-process layout) equals an uninterrupted DDP run's, optimizer state too."""
    from safetensors.torch import load_file

    def recipe(fsdp: bool) -> dict:
        r = micro_recipe(5)
        r["train"].update(fsdp=fsdp, keep_checkpoints=5)
        return r

    torchrun_train(tmp_path, recipe(False), tmp_path / "ddp", 29532)
    torchrun_train(tmp_path, recipe(True), tmp_path / "fsdp", 29533, stop_at=3)
    assert latest_checkpoint(tmp_path / "fsdp" / "checkpoints").name == "step-0000003"
    torchrun_train(tmp_path, recipe(True), tmp_path / "fsdp", 29534)
    for name in ("model.safetensors", "optim.safetensors"):
        a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000005" / name))
        b = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-0000005" / name))
        assert a.keys() == b.keys() and len(a) > 20
        for k in a:
            assert a[k].shape == b[k].shape, k
            # summation order differs (sharded reduce-scatter vs all-reduce); Adam turns float noise in a
            # near-zero gradient into up to a few % of one lr-sized step (lr 2e-3)
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    ddp_rows = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()
    fsdp_rows = (tmp_path / "fsdp" / "metrics.csv").read_text().splitlines()
    assert len(ddp_rows) == len(fsdp_rows) == 6


def test_encoder_stage_trains_without_decoder_and_reports_probe_accuracy(tmp_path):
    rec = micro_recipe(2)
    rec["ocr"].update(stage="encoder", guide_weight=0.0)
    rec["train"]["eval_every"] = 2
    rows = run_recipe(rec, tmp_path / "stage1")
    assert "lm" not in rows[-1]  # the decoder never ran
    assert 0.0 <= float(rows[-1]["eval_glyph_acc"]) <= 1 and 0.0 <= float(rows[-1]["eval_token_acc"]) <= 1
    assert float(rows[-1]["glyph"]) > 0 and float(rows[-1]["token"]) > 0


def test_probe_sites_point_at_the_patch_and_token_under_each_character():
    """On a 256-px grid page, character (row r, col c) lies in SAM patch (r, c // 2) and vision token
    (r // 4, c // 8); the sites must say so, with the character's class, for every drawn character."""
    from optictx.data.ocr_pages import render_page
    from optictx.train.ocr_task import CHAR_INDEX, ProbeSites

    pages = [render_page("ab cd\nefgh", 256, 4), render_page("x" * 40 + " yz " * 60, 256, 4)]
    sites = ProbeSites.of(pages, 256, 4)
    expect = []
    for pi, page in enumerate(pages):
        for r, (text, _) in enumerate(page.lines):
            for c, ch in enumerate(text):
                expect.append(((pi * 16 + r) * 16 + c // 2, c % 2, (pi * 4 + r // 4) * 4 + c // 8,
                               (r % 4) * 8 + c % 8, CHAR_INDEX[ch]))
    got = list(zip(sites.patch_index.tolist(), sites.patch_cell.tolist(), sites.token_index.tolist(),
                   sites.token_cell.tolist(), sites.label.tolist()))
    assert got == expect
    assert ProbeSites.cells(256, 4) == (2, 32)
    assert max(sites.token_cell.tolist()) < 32 and max(sites.patch_index.tolist()) < 2 * 16 * 16


def test_patch_embedding_gradient_is_exact():
    """Canary for the oneDNN bug: the SAM-style 16x16/16 patch embedding's weight gradient must match float64
    once the training loop has configured the CPU backends (it was off by ~100% with oneDNN on)."""
    from optictx.train.loop import configure_cpu_backends

    enabled = torch.backends.mkldnn.enabled
    try:
        configure_cpu_backends()
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 192, 16, 16)
        x, g = torch.randn(8, 3, 256, 256), torch.randn(8, 192, 16, 16)
        (conv(x) * g).sum().backward()
        ref = torch.nn.Conv2d(3, 192, 16, 16).double()
        ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
        (ref(x.double()) * g.double()).sum().backward()
        err = (conv.weight.grad.double() - ref.weight.grad).abs().max() / ref.weight.grad.abs().max()
        assert err < 1e-5
    finally:
        torch.backends.mkldnn.enabled = enabled


def test_cursor_targets_name_the_cell_inside_the_vision_token():
    """The cursor target of a text token is the grid cell (row % 4, col % 8) of its first non-space character
    inside its vision token; a token after a line break points at the next line's first cell."""
    from optictx.data.ocr_pages import render_page
    from optictx.train.ocr_task import cursor_cells

    page = render_page("abcdefghij klm\nxyz", 256, 4)
    assert [t for t, _ in page.lines] == ["abcdefghij klm", "xyz"]
    cells = cursor_cells(page, 8, 4)
    assert cells[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]  # columns wrap every 8 cells
    assert cells[14] == 8  # the newline looks at row 1, column 0
    assert cells[15:] == [8, 9, 10]


def test_cursor_probe_trains_in_the_micro_run(tmp_path):
    rec = micro_recipe(2)
    rec["ocr"]["cursor_weight"] = 0.5
    rows = run_recipe(rec, tmp_path / "cursor")
    assert float(rows[-1]["cursor"]) > 0


def test_grid_vocabulary_run_warm_starts_from_a_bpe_run(tmp_path):
    """A grid-tagged recipe warm-started from a BPE model keeps the encoder and decoder layers, starts the token
    embeddings and lm_head fresh with factorized rows, and guides attention to the token each id is about."""
    from safetensors.torch import load_file

    from optictx.grid_tokenizer import GridTokenizer
    from optictx.train.ocr_run import export_run, prepare_ocr
    from optictx.train.ocr_task import slot_of_cell

    bpe = micro_recipe(1)
    run_recipe(bpe, tmp_path / "bpe")
    export_run(tmp_path / "bpe", tmp_path / "bpe-export", dtype="float32")
    rec = micro_recipe(1)
    rec["tokenizer"] = {"kind": "grid"}
    rec["init_from"] = str(tmp_path / "bpe-export")
    net, task, _ = prepare_ocr(rec, tmp_path / "grid")
    tok = task.tok
    assert isinstance(tok, GridTokenizer)
    exported = load_file(str(next((tmp_path / "bpe-export").glob("*.safetensors"))))
    own = net.model.state_dict()
    for key in ("model.sam_model.patch_embed.proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(own[key], exported[key])
    emb = own["model.embed_tokens.weight"]
    assert emb.shape[0] == tok.vocab_size != exported["model.embed_tokens.weight"].shape[0]
    a3, a4, b3, b4 = (tok.tag_ids[k] for k in (("a", 3), ("a", 4), ("b", 3), ("b", 4)))
    assert torch.allclose(emb[a3] - emb[a4], emb[b3] - emb[b4], atol=1e-6)

    batch = task.batch(0, 0, 0, 1)
    head = 1 + task.n_slots + len(task.prompt_ids)
    ids, tokens = tok.encode_lines([line for line, _ in task.source.page(0, task.level(0)).lines])
    assert batch["input_ids"][0, head:head + len(ids)].tolist() == ids
    assert batch["guide"][0, head - 1:head - 1 + len(ids)].tolist() == [1 + slot_of_cell(t, 4) for t in tokens]


def test_guided_attention_logprobs_are_the_modules_own_attention():
    """The guided loss must see the attention the layer really computes: recomputing every head's weights and
    applying them to the values reproduces the module's output; the loss is -log of the mass on the target."""
    from optictx.config import DeepseekV2Config
    from optictx.model.attention import MHAttention
    from optictx.train.guidance import guided_attention_loss, head_attention_logprobs

    torch.manual_seed(0)
    cfg = DeepseekV2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, use_mla=False)
    attn = MHAttention(cfg)
    x, pos = torch.randn(2, 7, 32), torch.arange(7).expand(2, 7)
    logp = head_attention_logprobs(attn, x, pos, heads=4)
    assert logp.shape == (2, 4, 7, 7)
    v = attn.v_proj(x).view(2, 7, 4, 8).transpose(1, 2)
    out = attn.o_proj((logp.exp() @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(out, attn(x, pos), atol=1e-5)
    targets = torch.full((2, 7), -1)
    targets[0, 3], targets[1, 6] = 1, 0
    want = -(logp[0, :, 3, 1].sum() + logp[1, :, 6, 0].sum()) / 8
    assert torch.allclose(guided_attention_loss(logp, targets), want)


def test_window_head_logprobs_are_a_v4_window_layers_own_attention():
    """The primitives model's guided loss reads a V4 layer (window only, ratio 0): with the sink switched off,
    its recomputed weights applied to the shared K=V reproduce the layer's output exactly."""
    import dataclasses

    from optictx.config import primitives_tiny
    from optictx.model.csa import CompressedSparseAttention, rope_angles, rope_last
    from optictx.train.guidance import window_head_logprobs

    torch.manual_seed(0)
    cfg = dataclasses.replace(primitives_tiny(), hidden_size=32, num_attention_heads=2, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, sliding_window=5)
    attn = CompressedSparseAttention(cfg, 0)
    with torch.no_grad():
        attn.attn_sink.fill_(-1e4)  # the sink takes no mass
    x, pos = torch.randn(2, 9, 32), torch.arange(9)[None]
    logp = window_head_logprobs(attn, x, pos, heads=2)
    assert logp.shape == (2, 2, 9, 9)
    assert torch.isinf(logp[0, 0, 8, :4]).all() and torch.isfinite(logp[0, 0, 8, 4:]).all()  # a 5-token window
    captured = {}
    attn._out = lambda o: captured.setdefault("o", o)
    attn(x, pos.expand(2, 9))
    cos, sin = rope_angles(pos.expand(2, 9), attn.rope_dim, attn.rope_theta)
    kv = rope_last(attn.kv_norm(attn.wkv(x)), cos, sin, attn.rope_dim)
    o = torch.einsum("bhqk,bkd->bqhd", logp.exp(), kv)
    want = rope_last(o, cos, sin, attn.rope_dim, inverse=True)
    assert torch.allclose(captured["o"], want, atol=1e-5)


def test_guided_loss_leaves_queries_whose_target_left_the_window_free():
    from optictx.train.guidance import guided_attention_loss

    logp = torch.full((1, 1, 4, 4), float("-inf"))
    logp[0, 0, 2, 1:3] = torch.tensor([0.5, 0.5]).log()
    logp[0, 0, 3, 2:4] = torch.tensor([0.25, 0.75]).log()
    targets = torch.tensor([[-1, -1, 1, 0]])  # key 0 is outside query 3's 2-token window
    loss = guided_attention_loss(logp, targets)
    assert torch.isfinite(loss) and torch.allclose(loss, torch.tensor(0.5).log().neg())
    assert guided_attention_loss(logp, torch.tensor([[-1, -1, -1, 0]])) == 0
