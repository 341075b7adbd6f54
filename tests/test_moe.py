"""MoE dispatch equals a per-token reference loop; gate semantics (softmax V2, sigmoid+bias V3, groups)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from optictx.config import DeepseekV2Config, ocr_tiny
from optictx.model.moe import MLP, MoE, MoEGate, moe_balance_loss


def _cfg(**kw) -> DeepseekV2Config:
    base = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2)
    return dataclasses.replace(ocr_tiny().language_config, **(base | kw))


def _reference_gate(gate: MoEGate, x: torch.Tensor, cfg: DeepseekV2Config):
    """Token by token, straight from the reference text (§5.2 / lineage §1.4)."""
    out_w, out_i = [], []
    for row in x:
        s = row.float() @ gate.weight.float().T
        s = s.softmax(-1) if cfg.scoring_func == "softmax" else s.sigmoid()
        sel = s.clone()
        if cfg.topk_method == "noaux_tc":
            sel = sel + gate.e_score_correction_bias
        if cfg.n_group > 1:
            g = sel.view(cfg.n_group, -1)
            gs = g.topk(2).values.sum(-1) if cfg.topk_method == "noaux_tc" else g.max(-1).values
            keep = set(gs.topk(cfg.topk_group).indices.tolist())
            sel = torch.stack([v if e // g.shape[1] in keep else torch.tensor(float("-inf"))
                               for e, v in enumerate(sel)])
        idx = sel.topk(cfg.num_experts_per_tok).indices
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        out_w.append(w * cfg.routed_scaling_factor)
        out_i.append(idx)
    return out_w, out_i


def _reference_moe(moe: MoE, x: torch.Tensor, cfg: DeepseekV2Config) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    ws, ids = _reference_gate(moe.gate, flat, cfg)
    rows = []
    for tok, w, idx in zip(flat, ws, ids):
        y = sum(wi * moe.experts[int(e)](tok[None])[0] for wi, e in zip(w, idx))
        rows.append(y + moe.shared_experts(tok[None])[0])
    return torch.stack(rows).view_as(x)


GATES = {
    "softmax_v2": dict(),
    "softmax_renorm_scaled": dict(norm_topk_prob=True, routed_scaling_factor=2.0),
    "sigmoid_bias_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                            routed_scaling_factor=2.5),
    "sigmoid_bias_groups": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                routed_scaling_factor=2.5, n_group=4, topk_group=2),
    "softmax_groups": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_moe_matches_per_token_loop(name):
    torch.manual_seed(0)
    cfg = _cfg(**GATES[name])
    moe = MoE(cfg).eval()
    if moe.gate.e_score_correction_bias is not None:
        # a strong bias must change *which* experts are picked but never the weights' source
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts))
    x = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        got, want = moe(x), _reference_moe(moe, x, cfg)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    counts = moe.last_stats.expert_counts
    assert counts.shape == (cfg.n_routed_experts,) and int(counts.sum()) == 14 * cfg.num_experts_per_tok


def test_softmax_gate_keeps_raw_probabilities():
    """DeepSeek-OCR: norm_topk_prob False -> weights are raw softmax probabilities (sum < 1)."""
    torch.manual_seed(1)
    gate = MoEGate(_cfg())
    x = torch.randn(5, 32)
    w, idx, scores = gate(x)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, scores.gather(1, idx))
    assert bool((w.sum(-1) < 1).all())


def test_bias_changes_selection_not_weights():
    torch.manual_seed(2)
    cfg = _cfg(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False, num_experts_per_tok=2)
    gate = MoEGate(cfg)
    x = torch.randn(4, 32)
    gate.e_score_correction_bias.zero_()
    gate.e_score_correction_bias[[5, 6]] = 100.0  # force experts 5 and 6
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [5, 6]
    torch.testing.assert_close(w, torch.sigmoid(x @ gate.weight.T).gather(1, idx))


def test_nudge_bias_moves_towards_balance():
    gate = MoEGate(_cfg(scoring_func="sigmoid", topk_method="noaux_tc"))
    counts = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])
    gate.nudge_bias(counts, gamma=0.1)
    assert gate.e_score_correction_bias[0] == pytest.approx(-0.1)
    assert gate.e_score_correction_bias[1] == pytest.approx(0.1)


def test_shared_experts_are_one_wide_mlp_with_official_names():
    moe = MoE(_cfg())
    keys = set(moe.state_dict())
    assert "shared_experts.gate_proj.weight" in keys and "experts.7.down_proj.weight" in keys
    assert moe.shared_experts.gate_proj.weight.shape == (2 * 16, 32)
    assert "gate.e_score_correction_bias" not in keys  # only for noaux_tc


def test_training_balance_loss_and_gradients():
    torch.manual_seed(3)
    cfg = _cfg()
    moe = MoE(cfg).train()
    x = torch.randn(3, 5, cfg.hidden_size, requires_grad=True)
    y = moe(x)
    loss = y.square().mean() + 0.01 * moe_balance_loss(moe)
    loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert x.grad is not None
    # balance term: E * sum(f * P); uniform routing would give exactly 1
    bal = moe.last_stats.balance_loss
    assert 0 < float(bal.detach()) < cfg.n_routed_experts
    with torch.no_grad():
        moe.eval()
        torch.testing.assert_close(moe(x), y)  # statistics never change outputs


def test_mlp_swiglu():
    torch.manual_seed(4)
    m = MLP(6, 10)
    x = torch.randn(3, 6)
    want = m.down_proj.weight @ (torch.nn.functional.silu(m.gate_proj.weight @ x.T) * (m.up_proj.weight @ x.T))
    torch.testing.assert_close(m(x), want.T)


def test_moe_builds_from_the_primitives_config():
    """The visual-primitives model reuses this MoE with its V3-style config (sigmoid, noaux_tc, renorm)."""
    from optictx.config import primitives_tiny

    cfg = primitives_tiny()
    moe = MoE(cfg)
    assert moe.gate.e_score_correction_bias is not None and len(moe.experts) == cfg.n_routed_experts
    w, _, _ = moe.gate(torch.randn(4, cfg.hidden_size))
    torch.testing.assert_close(w.sum(-1), torch.full((4,), cfg.routed_scaling_factor))
