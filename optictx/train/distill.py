"""Unified RFT data and on-policy distillation (lineage §5.3 steps 3-4).

* **Unified RFT**: both experts roll out over the data pool (``grpo.screen``); keep every *normal* prompt
  plus a random 5% of the *easy* ones (against forgetting), train on their correct rollouts with the SFT
  loss, from the base pretrained checkpoint (``primitives_task.PrimitivesSFTTask`` with ``records``).
* **On-policy distillation**: L_OPD(θ) = Σ_i w_i · KL(π_θ ‖ π_{E_i}) — the *reverse* KL, on the student's own
  sampled rollouts, over the full vocabulary at every completion position:
  KL_t = Σ_v p_θ(v) (log p_θ(v) − log p_E(v)). It is zero exactly when the student equals the teacher.
  The paper does not give w_i; ours route each task to the teachers that are experts in it (``tasks``)
  with a weight each, normalised per sample [mine]. Like GKD-style trainers, the sampling of the rollout
  itself is not differentiated: the per-token full-vocabulary KL carries the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from optictx.errors import ConfigError
from optictx.tokenizer import Tokenizer
from optictx.train.grpo import PoolEntry, rollout_batch
from optictx.train.primitives_task import Mixture, Record, greedy_scores, rollouts

# ----------------------------------------------------------------------------- losses


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over ``mask`` [B, T] of KL(p_student ‖ p_teacher) over the vocabulary -> [B]."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)


def opd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · KL(π_θ ‖ π_E_i), averaged over sequences. ``weights`` [n_teachers, B] (per-sample routing)."""
    if len(teacher_logits) != weights.shape[0]:
        raise ConfigError(f"{len(teacher_logits)} teachers but weights for {weights.shape[0]}")
    per_seq = torch.stack([reverse_kl(student_logits, t, mask) for t in teacher_logits])  # [n, B]
    return (weights.to(per_seq) * per_seq).sum(0).mean()


# ----------------------------------------------------------------------------- unified RFT


def rft_records(pools: Sequence[Sequence[PoolEntry]], easy_fraction: float = 0.05, seed: int = 0,
                per_prompt: int = 2) -> list[Record]:
    """Expert rollouts -> SFT records: all normal prompts + ``easy_fraction`` of easy ones, correct rollouts only.

    Up to ``per_prompt`` distinct correct texts per (expert, prompt); the easy subset is a seeded draw, so the
    same pools always give the same records.
    """
    if not 0 <= easy_fraction <= 1:
        raise ConfigError(f"easy_fraction must be in [0, 1], got {easy_fraction}")
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    for pool in pools:
        for entry in pool:
            bucket = entry.bucket
            if bucket == "hard" or (bucket == "easy" and rng.random() >= easy_fraction):
                continue
            texts = list(dict.fromkeys(t for t, ok in zip(entry.texts, entry.correct) if ok))[:per_prompt]
            out += [Record(entry.task, entry.seed, entry.index, entry.mode, t) for t in texts]
    return out


# ----------------------------------------------------------------------------- the OPD task


@dataclass
class Teacher:
    name: str
    model: nn.Module
    weight: float = 1.0
    tasks: tuple[str, ...] | None = None  # None: a teacher for every task


@dataclass
class OPDConfig:
    seed: int = 0
    prompts_per_step: int = 4
    rollouts_per_prompt: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_len: int = 1024
    eval_samples: int = 16
    eval_seed: int = 1_000_003


def teacher_weights(teachers: Sequence[Teacher], tasks: Sequence[str]) -> torch.Tensor:
    """[n_teachers, B]: each sample's weights over the teachers that cover its task, summing to 1."""
    w = torch.tensor([[t.weight if t.tasks is None or task in t.tasks else 0.0 for task in tasks]
                      for t in teachers], dtype=torch.float32)
    total = w.sum(0)
    if (total <= 0).any():
        missing = sorted({task for task, s in zip(tasks, total.tolist()) if s <= 0})
        raise ConfigError(f"no teacher covers task(s) {missing}; list them in a teacher's 'tasks' or use null")
    return w / total


class OPDTask:
    """Task protocol of ``train.loop``: student rollouts in ``batch``, reverse KL to the teachers in ``loss``."""

    def __init__(self, tok: Tokenizer, student: nn.Module, teachers: Sequence[Teacher], mixture: Mixture,
                 cfg: OPDConfig):
        if not teachers:
            raise ConfigError("on-policy distillation needs at least one teacher")
        self.tok, self.student, self.teachers, self.mixture, self.cfg = tok, student, list(teachers), mixture, cfg
        for t in self.teachers:
            t.model.eval()
            for p in t.model.parameters():
                p.requires_grad_(False)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        cfg = self.cfg
        base = ((step * 64 + micro) * world + rank) * cfg.prompts_per_step
        samples = [self.mixture.sample(cfg.seed, base + i) for i in range(cfg.prompts_per_step)]
        groups = rollouts(self.student, self.tok, samples, cfg.rollouts_per_prompt,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed * 1_000_003 + base)
        batch = rollout_batch(self.tok, groups, cfg.max_len)
        tasks = [g.sample.task for g in groups for _ in g.token_ids]
        batch["weights"] = teacher_weights(self.teachers, tasks)
        return batch

    def loss(self, net: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
        mask = batch["labels"][:, 1:] != -100
        student = net(**inputs).logits[:, :-1]
        with torch.no_grad():
            for t in self.teachers:  # follow the student if the loop moved it to a GPU
                t.model.to(student.device)
            teachers = [t.model(**inputs).logits[:, :-1] for t in self.teachers]
        loss = opd_loss(student, teachers, batch["weights"], mask)
        return loss, {"loss": float(loss.detach()), "tokens": float(mask.sum())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        samples = [self.mixture.sample(self.cfg.eval_seed, i) for i in range(self.cfg.eval_samples)]
        return greedy_scores(getattr(model, "module", model), self.tok, samples, self.cfg.max_new_tokens)
