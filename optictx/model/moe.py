"""DeepSeekMoE: SwiGLU experts, a softmax (V2 / DeepSeek-OCR) or sigmoid+bias (V3) router, shared experts.

Key names match the official checkpoints: ``mlp.gate.weight``, ``mlp.experts.E.{gate,up,down}_proj.weight``,
``mlp.shared_experts.{gate,up,down}_proj.weight`` (the n shared experts are one MLP n× as wide), and for
``topk_method="noaux_tc"`` ``mlp.gate.e_score_correction_bias``.

Dispatch sorts the (token, expert) pairs by expert and runs one matmul per expert on its contiguous slice,
then ``index_add``s the weighted outputs back in fp32 — the official ``moe_infer`` scheme, but differentiable,
so the same code trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import DeepseekV2Config
from optictx.errors import ConfigError


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases.

    The projections are called as ``F.linear`` on their weights rather than as modules: the same
    arithmetic, without three module dispatches per call (a decode step runs ten of these MLPs).
    """

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(F.linear(x, self.gate_proj.weight)) * F.linear(x, self.up_proj.weight)
        return F.linear(h, self.down_proj.weight)


class MoEGate(nn.Module):
    """Router: fp32 logits -> scores -> (group-limited) top-k -> weights.

    * ``softmax`` (V2, DeepSeek-OCR): top-k of the probabilities, kept as they are unless
      ``norm_topk_prob``; × ``routed_scaling_factor``.
    * ``sigmoid`` (V3): with ``topk_method="noaux_tc"`` a per-expert ``e_score_correction_bias`` is added
      *for selection only* (aux-loss-free balancing); the weights come from the unbiased scores,
      renormalised when ``norm_topk_prob``, × ``routed_scaling_factor``.
    * ``n_group > 1``: experts form groups; only the best ``topk_group`` groups compete (group score = max
      score, or the sum of the top two biased scores under ``noaux_tc``, as in V3).
    """

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        if cfg.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"scoring_func {cfg.scoring_func!r} is not supported; use 'softmax' or 'sigmoid'")
        if cfg.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"topk_method {cfg.topk_method!r} is not supported; use 'greedy' or 'noaux_tc'")
        if cfg.n_routed_experts % cfg.n_group:
            raise ConfigError(f"n_routed_experts {cfg.n_routed_experts} is not divisible by n_group {cfg.n_group}")
        self.top_k = cfg.num_experts_per_tok
        self.n_routed = cfg.n_routed_experts
        self.scoring_func = cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, indices [N, k], scores [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            choice = self._limit_groups(choice)
        top = choice.topk(self.top_k, dim=-1, sorted=False)
        # selected on the scores themselves: topk's values are the weights (no gather)
        weights = top.values if choice is scores else scores.gather(1, top.indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return (weights * self.scale if self.scale != 1.0 else weights), top.indices, scores

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        groups = choice.view(choice.shape[0], self.n_group, -1)
        if self.e_score_correction_bias is None:
            group_score = groups.amax(-1)
        else:
            group_score = groups.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(self.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        return groups.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)

    @torch.no_grad()
    def nudge_bias(self, expert_counts: torch.Tensor, gamma: float = 1e-3) -> None:
        """V3 aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.e_score_correction_bias is None:
            raise ConfigError("nudge_bias needs topk_method='noaux_tc' (a selection bias)")
        load = expert_counts.float().to(self.e_score_correction_bias.device)
        self.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))


@dataclass
class RoutingStats:
    """What the last forward routed: the chosen experts and the load-balance loss term f·P·E.

    Counts are derived on demand: a decode step that never reads them does not pay for a bincount.
    """

    indices: torch.Tensor  # [N, k] long, detached
    n_experts: int
    balance_loss: torch.Tensor | None  # scalar fp32, differentiable via the router scores; training only

    @property
    def expert_counts(self) -> torch.Tensor:
        """[E] long: tokens routed to each expert."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.n_experts)


class MoE(nn.Module):
    """Routed experts + shared experts. ``last_stats`` holds routing statistics of the latest forward."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.gate = MoEGate(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.last_stats: RoutingStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        if x.shape[0] == 1 and not self.training:  # no balance loss wanted: skip the counts too
            routed, counts = self._single(x, weights, indices), None
        else:
            counts = torch.bincount(indices.reshape(-1), minlength=len(self.experts))
            routed = self._dispatch(x, weights, indices, counts)
        balance = self._balance_loss(counts, scores) if self.training else None
        self.last_stats = RoutingStats(indices, len(self.experts), balance)  # integer: never carries a gradient
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed.view(shape)

    def _single(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One token (a decode step): its k experts in ascending id order, summed in fp32 — the exact
        arithmetic of ``_dispatch`` (whose stable sort and ``index_add`` add them in that order onto zero),
        without the sort, bincount and scatter."""
        chosen, w = indices[0].tolist(), weights[0].unbind()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if not chosen else None
        for j in sorted(range(len(chosen)), key=chosen.__getitem__):
            y = self.experts[chosen[j]](x).float() * w[j]
            out = y if out is None else out + y
        return out.to(x.dtype)

    def _dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, one matmul per non-empty expert, weighted index_add in fp32."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if x.shape[0] == 0:
            return out.to(x.dtype)
        order = indices.reshape(-1).argsort(stable=True)
        token_of = order // self.top_k
        xs = x[token_of]
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # loop over experts, never over tokens
            if n:
                outs.append(self.experts[e](xs[start : start + n]))
                start += n
        ys = torch.cat(outs).float() * weights.reshape(-1)[order, None]
        return out.index_add(0, token_of, ys).to(x.dtype)

    def _balance_loss(self, counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Switch-style ``E · Σ f_i · P_i`` (f: fraction of routed slots, P: mean router probability)."""
        f = counts.float() / counts.sum().clamp(min=1)
        return len(self.experts) * (f * scores.mean(0)).sum()


def moe_balance_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the balance terms of every MoE layer's latest forward (multiply by ``aux_loss_alpha``)."""
    terms = [
        m.last_stats.balance_loss
        for m in model.modules()
        if isinstance(m, MoE) and m.last_stats is not None and m.last_stats.balance_loss is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())
