"""On-policy distillation: reverse KL by hand, zero when student == teacher and positive otherwise, teacher
routing weights, an OPD step on a micro model; unified-RFT record selection (normal + 5% easy, correct only)."""
import copy
import math

import pytest
import torch

from optictx.errors import ConfigError
from optictx.model.reasoner import PrimitivesModel
from optictx.train import distill
from optictx.train.grpo import PoolEntry
from optictx.train.primitives_task import PrimitivesSFTTask, SFTConfig


def test_reverse_kl_by_hand_and_direction():
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.25, 0.75]]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(distill.reverse_kl(s, t, mask)) == pytest.approx(want)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(distill.reverse_kl(t, s, mask)) == pytest.approx(forward)  # KL is not symmetric
    assert want != pytest.approx(forward)


def test_reverse_kl_is_zero_iff_equal_and_respects_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert distill.reverse_kl(logits, logits, mask).abs().max() < 1e-6
    assert distill.reverse_kl(logits, logits + 7.0, mask).abs().max() < 1e-5  # a shift is the same distribution
    other = torch.randn(3, 5, 11)
    assert (distill.reverse_kl(logits, other, mask) > 0).all()
    masked = mask.clone()
    masked[:, 3:] = False
    diff = logits.clone()
    diff[:, 3:] = other[:, 3:]  # differences only where the mask is off
    assert distill.reverse_kl(logits, diff, masked).abs().max() < 1e-6


def test_opd_loss_weights_teachers():
    torch.manual_seed(1)
    s, t1, t2 = torch.randn(3, 2, 4, 7).unbind(0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.25], [0.0, 0.75]])
    kl1, kl2 = distill.reverse_kl(s, t1, mask), distill.reverse_kl(s, t2, mask)
    want = ((kl1[0]) + (0.25 * kl1[1] + 0.75 * kl2[1])) / 2
    assert float(distill.opd_loss(s, [t1, t2], w, mask)) == pytest.approx(float(want))
    teachers = [distill.Teacher("g", None, 2.0, ("counting", "spatial")), distill.Teacher("p", None, 1.0, None)]
    w = distill.teacher_weights(teachers, ["counting", "maze"])
    assert torch.allclose(w, torch.tensor([[2 / 3, 0.0], [1 / 3, 1.0]]))
    with pytest.raises(ConfigError):
        distill.teacher_weights(teachers[:1], ["maze"])


def test_rft_keeps_all_normal_some_easy_no_hard_and_only_correct_texts():
    def entry(i, ok):
        return PoolEntry("counting", 0, i, "trigger", [f"t{i}-{k}" for k in range(len(ok))], ok, [0.0] * len(ok))

    normal = [entry(i, [True, False, True, True]) for i in range(10)]
    easy = [entry(100 + i, [True, True, True, True]) for i in range(400)]
    hard = [entry(900 + i, [False] * 4) for i in range(10)]
    recs = distill.rft_records([normal + easy + hard], easy_fraction=0.05, seed=0, per_prompt=2)
    by_index = {}
    for r in recs:
        by_index.setdefault(r.index, []).append(r.text)
    assert all(by_index[i] == [f"t{i}-0", f"t{i}-2"] for i in range(10))  # correct rollouts only
    n_easy = sum(1 for i in by_index if 100 <= i < 500)
    assert 8 <= n_easy <= 35  # ~5% of 400
    assert not any(i >= 900 for i in by_index)
    assert recs == distill.rft_records([normal + easy + hard], easy_fraction=0.05, seed=0, per_prompt=2)


def test_opd_task_is_zero_against_itself_and_trains_towards_a_different_teacher(micro_reasoner):
    tok, model, mixture = micro_reasoner
    student = copy.deepcopy(model)
    cfg = distill.OPDConfig(prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=5)
    same = distill.OPDTask(tok, student, [distill.Teacher("self", copy.deepcopy(model))], mixture, cfg)
    batch = same.batch(0, 0, 0, 1)
    loss, parts = same.loss(student, batch, 0)
    assert abs(float(loss.detach())) < 1e-5 and parts["tokens"] > 0
    torch.manual_seed(5)
    other = PrimitivesModel(model.config)
    task = distill.OPDTask(tok, student, [distill.Teacher("other", other)], mixture, cfg)
    loss, _ = task.loss(student, batch, 0)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in other.parameters())  # teachers are frozen


def test_sft_task_on_rft_records_trains_on_the_record_text(micro_reasoner):
    tok, model, mixture = micro_reasoner
    from optictx.train.primitives_task import Record

    recs = [Record("counting", 0, 1, "trigger", "I count. \\boxed{1}"), Record("general", 0, 2, "auto", "\\boxed{7}")]
    task = PrimitivesSFTTask(tok, model.config, mixture, SFTConfig(batch_size=2), records=recs)
    b = task.batch(0, 0, 0, 1)
    texts = sorted(tok.decode([t for t in row.tolist() if t != -100]) for row in b["labels"])
    assert texts == sorted([r.text + tok.hf.id_to_token(tok.eos_id) for r in recs])
    with pytest.raises(ConfigError):
        PrimitivesSFTTask(tok, model.config, mixture, SFTConfig(), records=[])
