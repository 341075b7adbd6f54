"""GRPO for the visual-primitive specialists (lineage §5.3 step 2, §6.1), on the generic training loop.

* **Data selection** (paper): the SFT model rolls out N times on every prompt of a pool; a prompt is *easy*
  when all N are correct, *hard* when none is, *normal* otherwise (1 ≤ k < N). Only normal prompts train.
  :func:`screen` does the rollouts (its results also feed unified RFT), :func:`normal_mask` the bucketing.
* **Objective** (DeepSeekMath/R1 form, as the VLM-R1 and Visual-RFT trainers): G completions per prompt,
  rewards r_i = format + quality + accuracy, advantages A_i = (r_i − mean_G r) / (std_G r + 1e-4) with the
  sample standard deviation (Bessel, as TRL's trainer), the same A_i on every token of completion i;
  per-token loss −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL_t with ρ = π_θ/π_old and the k3 estimator
  KL_t = exp(ref − logp) − (ref − logp) − 1; averaged over each completion's tokens, then over completions.
* One policy update per rollout batch (μ = 1, as the reference scripts), so π_old is the policy that sampled:
  ρ = 1 in value and its gradient is ∇log π_θ. The reference policy is the frozen SFT model (β = 0.04).
* Exact resume: rollouts sample with a seed derived from (seed, step, micro, rank) and the restored weights,
  so a resumed run draws the same completions an uninterrupted one would have.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from optictx.errors import ConfigError
from optictx.rewards import score
from optictx.tokenizer import Tokenizer
from optictx.train.primitives_task import Mixture, Rollout, greedy_scores, make_sample, rollouts

# ----------------------------------------------------------------------------- maths


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards -> [P, G] advantages, normalised within each group (sample std, Bessel-corrected)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ConfigError(f"rewards must be [prompts, group >= 2], got {list(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def difficulty(n_correct: int, n: int) -> str:
    """The paper's buckets: easy = all N correct, hard = none, normal = 1 ≤ k < N."""
    if not 0 <= n_correct <= n:
        raise ConfigError(f"{n_correct} correct out of {n} rollouts is impossible")
    return "easy" if n_correct == n else "hard" if n_correct == 0 else "normal"


def normal_mask(correct: torch.Tensor) -> torch.Tensor:
    """[P, G] bool -> [P] bool: the prompts GRPO keeps."""
    k = correct.sum(dim=1)
    return (k >= 1) & (k < correct.shape[1])


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) on tokens sampled from π_θ: exp(d) − d − 1, d = ref − logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio GRPO loss over [B, T] token log-probs; ``advantages`` [B]; ``mask`` [B, T] completion tokens."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + beta * kl
    per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    loss = per_seq.mean()
    n = mask.sum().clamp(min=1)
    kl = kl.detach()
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(logp.dtype)
    return loss, {"kl": float((kl * mask).sum() / n), "clip_frac": float((clipped * mask).sum() / n)}


def completion_logprobs(net: nn.Module, batch: dict) -> torch.Tensor:
    """Log-prob of every label token under ``net`` ([B, T]; positions without a label are 0).

    Logits at t predict the label at t+1, so the result is aligned with ``labels[:, 1:]``.
    """
    logits = net(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (labels != -100)


# ----------------------------------------------------------------------------- rollouts -> batches


@dataclass
class PoolEntry:
    """One prompt of the screening pool: its id, the rollouts, whether each was correct, and their rewards."""

    task: str
    seed: int
    index: int
    mode: str
    texts: list[str]
    correct: list[bool]
    rewards: list[float]

    @property
    def bucket(self) -> str:
        return difficulty(sum(self.correct), len(self.correct))


def screen(model: nn.Module, tok: Tokenizer, mixture: Mixture, seed: int, indices: Sequence[int], n: int,
           *, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
           sampling_seed: int = 0) -> list[PoolEntry]:
    """Roll every prompt of the pool out ``n`` times and score the rollouts (difficulty bucketing, RFT data)."""
    samples = [mixture.sample(seed, i) for i in indices]
    outs = rollouts(model, tok, samples, n, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=sampling_seed)
    pool = []
    for o in outs:
        rs = [score(o.sample, t) for t in o.texts]
        pool.append(PoolEntry(o.sample.task, o.sample.seed, o.sample.index, o.sample.mode, o.texts,
                              [r.correct for r in rs], [r.total for r in rs]))
    return pool


def save_pool(pool: Sequence[PoolEntry], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in pool), encoding="utf-8")
    tmp.replace(path)


def load_pool(path: str | Path) -> list[PoolEntry]:
    with open(path, encoding="utf-8") as f:
        return [PoolEntry(**json.loads(line)) for line in f if line.strip()]


def rollout_batch(tok: Tokenizer, groups: Sequence[Rollout], max_len: int) -> dict:
    """Prompt + completion (+ EOS when it stopped there) sequences, right-padded; labels on completions only.

    Only tokens the policy sampled are scored: a completion cut by ``max_new_tokens`` gets no EOS.
    """
    ids, labels, pix = [], [], []
    for g in groups:
        for toks, stopped in zip(g.token_ids, g.stopped or [True] * len(g.token_ids)):
            body = list(toks) + ([tok.eos_id] if stopped else [])
            seq = (g.prompt + body)[:max_len]
            lab = ([-100] * len(g.prompt) + body)[:max_len]
            ids.append(seq)
            labels.append(lab)
            pix.append(g.pixels)
    t = max(map(len, ids))
    pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])  # noqa: E731
    return {"input_ids": pad(ids, tok.pad_id), "labels": pad(labels, -100), "pixel_values": pix}


# ----------------------------------------------------------------------------- the task


@dataclass
class GRPOConfig:
    seed: int = 0
    group_size: int = 8  # G (VLM-R1 default)
    prompts_per_step: int = 2
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low gives DAPO's clip-higher
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_len: int = 1024
    pool_size: int = 64  # prompts screened by the SFT model before training
    screen_rollouts: int = 8  # N of the paper's difficulty bucketing
    eval_samples: int = 16
    eval_seed: int = 1_000_003

    def validate(self) -> "GRPOConfig":
        if self.group_size < 2 or self.screen_rollouts < 2:
            raise ConfigError("group_size and screen_rollouts must be >= 2 (advantages need a group)")
        if self.prompts_per_step < 1 or self.pool_size < 1:
            raise ConfigError("prompts_per_step and pool_size must be >= 1")
        return self


class GRPOTask:
    """Task protocol of ``train.loop``; ``batch`` rolls the current policy out on normal prompts."""

    def __init__(self, tok: Tokenizer, policy: nn.Module, reference: nn.Module, mixture: Mixture,
                 cfg: GRPOConfig, prompts: Sequence[PoolEntry]):
        self.tok, self.policy, self.reference, self.mixture, self.cfg = tok, policy, reference, mixture, cfg.validate()
        self.prompts = [p for p in prompts if p.bucket == "normal"]
        if not self.prompts:
            raise ConfigError("no normal prompt in the screening pool (all easy or all hard): enlarge pool_size, "
                              "or train the SFT stage longer")
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.reference.eval()

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        cfg = self.cfg
        base = ((step * 64 + micro) * world + rank) * cfg.prompts_per_step
        order = np.random.default_rng([cfg.seed, base // len(self.prompts)]).permutation(len(self.prompts))
        chosen = [self.prompts[int(order[(base + i) % len(self.prompts)])] for i in range(cfg.prompts_per_step)]
        samples = [make_sample(p.task, p.seed, p.index, p.mode, self.mixture.config(p.task)) for p in chosen]
        groups = rollouts(self.policy, self.tok, samples, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + base)
        scored = [[score(g.sample, t) for t in g.texts] for g in groups]
        rewards = torch.tensor([[r.total for r in row] for row in scored])
        correct = torch.tensor([[r.correct for r in row] for row in scored])
        batch = rollout_batch(self.tok, groups, cfg.max_len)
        device = next(self.policy.parameters()).device  # the loop may have moved the policy to a GPU
        self.reference.to(device)
        with torch.no_grad():
            batch["ref_logp"] = completion_logprobs(self.reference, {k: v.to(device) if torch.is_tensor(v) else v
                                                                     for k, v in batch.items()})
        batch["advantages"] = group_advantages(rewards).reshape(-1)
        batch["stats"] = {"reward": float(rewards.mean()), "correct": float(correct.float().mean()),
                          "normal": float(normal_mask(correct).float().mean()),
                          "completion_len": float(np.mean([len(t) for g in groups for t in g.token_ids]))}
        return batch

    def loss(self, net: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        logp = completion_logprobs(net, batch)
        mask = batch["labels"][:, 1:] != -100
        loss, stats = grpo_loss(logp, logp.detach(), batch["ref_logp"], batch["advantages"], mask,
                                self.cfg.eps_low, self.cfg.eps_high, self.cfg.beta)
        return loss, {"loss": float(loss.detach()), "tokens": float(mask.sum()), **stats, **batch["stats"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Greedy correctness and reward on held-out prompts of the stage's mixture."""
        samples = [self.mixture.sample(self.cfg.eval_seed, i) for i in range(self.cfg.eval_samples)]
        return greedy_scores(getattr(model, "module", model), self.tok, samples, self.cfg.max_new_tokens)
