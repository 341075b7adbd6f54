"""GRPO: advantage maths and the clipped/KL loss on fixed numbers worked out by hand, the normal-prompt filter,
rollout batches, and a 2-step GRPO run through the generic loop on a random micro model."""
import copy
import math

import pytest
import torch

from optictx.errors import ConfigError
from optictx.train import grpo
from optictx.train.loop import TrainConfig, train


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    a = grpo.group_advantages(r)
    s1 = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    assert a[0].tolist() == pytest.approx([0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4)] * 1 + [-0.5 / (s1 + 1e-4),
                                                                                     0.5 / (s1 + 1e-4)])
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group with one reward teaches nothing
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 3)
    assert a[2].tolist() == pytest.approx([2.25 / (s3 + 1e-4)] + [-0.75 / (s3 + 1e-4)] * 3)
    with pytest.raises(ConfigError):
        grpo.group_advantages(torch.ones(3))


def test_normal_prompt_filter_and_buckets():
    correct = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert grpo.normal_mask(correct).tolist() == [False, False, True, True]
    assert [grpo.difficulty(k, 4) for k in (4, 0, 1, 3)] == ["easy", "hard", "normal", "normal"]
    with pytest.raises(ConfigError):
        grpo.difficulty(5, 4)


def test_k3_and_clipped_loss_by_hand():
    ln = math.log
    logp = torch.tensor([[ln(0.5), ln(0.25)], [ln(0.5), ln(0.9)]])
    old = torch.tensor([[ln(0.4), ln(0.25)], [ln(0.4), ln(0.1)]])
    ref = torch.tensor([[ln(0.5), ln(0.5)], [ln(0.5), ln(0.1)]])
    mask = torch.tensor([[True, True], [True, False]])  # row 2's second token is padding
    kl2 = 2 - ln(2) - 1  # exp(ln 2) - ln 2 - 1
    assert grpo.k3_kl(logp, ref)[0].tolist() == pytest.approx([0.0, kl2])
    # A = +1: ratio 1.25 is clipped to 1.2 (the min picks the clipped term); A = -1: the unclipped -1.25 wins
    loss, stats = grpo.grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, beta=0.04)
    row1 = (-1.2 + (-1.0 + 0.04 * kl2)) / 2
    row2 = 1.25
    assert float(loss) == pytest.approx((row1 + row2) / 2)
    assert stats["clip_frac"] == pytest.approx(2 / 3) and stats["kl"] == pytest.approx(kl2 / 3)
    # clip-higher: eps_high = 0.3 keeps ratio 1.25 for a positive advantage
    loss_hi, _ = grpo.grpo_loss(logp[:1], old[:1], ref[:1], torch.tensor([1.0]), mask[:1], 0.2, 0.3, beta=0.0)
    assert float(loss_hi) == pytest.approx(-(1.25 + 1.0) / 2)


def test_gradient_is_advantage_weighted_log_prob_gradient_when_on_policy():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3], [4, 0, 1]])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.tensor([0.7, -1.3])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.04)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (ref,) = torch.autograd.grad(-(adv[:, None] * logp).mean(1).mean(), logits)  # KL term: zero gradient at ref
    assert torch.allclose(g, ref, atol=1e-6)


# ----------------------------------------------------------------------------- micro model


def _pool(mixture):
    e = lambda i, ok: grpo.PoolEntry("counting", 0, i, "trigger", ["x"] * 2, ok, [0.0, 0.0])  # noqa: E731
    return [e(0, [True, True]), e(1, [False, False]), e(2, [True, False]), e(3, [False, True])]


def test_rollout_batch_supervises_completions_and_eos(micro_reasoner):
    tok, model, mixture = micro_reasoner
    from optictx.train.primitives_task import rollouts

    (g,) = rollouts(model, tok, [mixture.sample(0, 0)], 2, max_new_tokens=5, temperature=1.0, seed=3)
    assert len(g.texts) == 2 and all(1 <= len(t) <= 5 for t in g.token_ids)
    b = grpo.rollout_batch(tok, [g], max_len=1000)
    for row, (toks, stopped) in enumerate(zip(g.token_ids, g.stopped)):
        lab = b["labels"][row]
        sup = lab[lab != -100].tolist()
        assert sup == toks + ([tok.eos_id] if stopped else [])  # EOS only where the policy sampled it
        assert stopped == (len(toks) < 5)
        assert (b["input_ids"][row, : len(g.prompt)] == torch.tensor(g.prompt)).all()
    again = rollouts(model, tok, [mixture.sample(0, 0)], 2, max_new_tokens=5, temperature=1.0, seed=3)
    assert again[0].token_ids == g.token_ids  # seeded sampling: replayable rollouts


def test_grpo_task_keeps_only_normal_prompts_and_runs_two_steps(micro_reasoner, tmp_path):
    tok, model, mixture = micro_reasoner
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    cfg = grpo.GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=6, eval_samples=2)
    task = grpo.GRPOTask(tok, policy, reference, mixture, cfg, _pool(mixture))
    assert sorted(p.index for p in task.prompts) == [2, 3]
    batch = task.batch(0, 0, 0, 1)
    assert batch["input_ids"].shape[0] == 2 and batch["advantages"].shape == (2,)
    loss, parts = task.loss(policy, batch, 0)
    assert torch.isfinite(loss) and parts["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at start
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logs = train(policy, task, TrainConfig(out_dir=str(tmp_path), max_steps=2, lr=1e-2, warmup_steps=1,
                                           eval_every=100, log_every=1), progress=False)
    assert logs["step"] == 2 and "eval_correct" in logs and "reward" in logs
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the policy moved...
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.state_dict().items())  # ...not the ref
    with pytest.raises(ConfigError):
        grpo.GRPOTask(tok, policy, reference, mixture, cfg, _pool(mixture)[:2])  # only easy and hard prompts
