"""Pure GRPO helpers: group advantages and the clipped policy-gradient loss (no model, no I/O)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """r - mean of its group (rollouts of one prompt are contiguous); no std division (as the paper)."""
    r = rewards.view(-1, group)
    return (r - r.mean(-1, keepdim=True)).flatten()


def relative_advantages(log_rewards: torch.Tensor) -> torch.Tensor:
    """Per row (a prompt's group, (k, G) log-rewards): r / mean(r) - 1, the gain relative to the
    group's mean reward, computed in log space, so a group whose rewards are all tiny (a large NFE
    penalty) weighs as much as one near 1 and none underflows. A group with no reward at all: 0."""
    top = log_rewards.max(-1, keepdim=True).values
    w = torch.exp(log_rewards - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # max 1 (or all 0)
    m = w.mean(-1, keepdim=True)
    return torch.where(m > 0, w / m.clamp_min(torch.finfo(w.dtype).tiny) - 1, torch.zeros_like(w))


def mixed_advantages(policy_rewards: torch.Tensor, expert_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert steering's advantages: policy_rewards (k, G) and expert_rewards (k, E) of k prompts
    form k groups of G + E; each reward minus its group's mean over all G + E. Returns the
    policy rollouts' (k, G) and the expert rollouts' (k, E) advantages."""
    r = torch.cat([policy_rewards, expert_rewards], dim=1)  # (k, G + E)
    a = r - r.mean(-1, keepdim=True)
    return a[:, :policy_rewards.shape[1]], a[:, policy_rewards.shape[1]:]


def expert_mixture(logp: torch.Tensor, group: int, experts: int) -> torch.Tensor:
    """Expert steering's off-policy correction (the paper's code, `es_thresholds`): an expert
    rollout is scored as a draw from the group's mixture, (G / (G + E)) pi_theta + (1 / (G + E))
    delta_expert, where the expert's own (deterministic) rule gives its action probability 1. Per
    step: log(G/(G+E) * exp(logp) + 1/(G+E)). Applied to the new and the old log-probabilities
    alike, so the ratio compares mixtures; its gradient is pi_theta's, damped where the policy
    already agrees little with the expert."""
    n = group + experts
    return torch.logaddexp(logp + torch.log(torch.tensor(group / n, dtype=logp.dtype)),
                           torch.log(torch.tensor(1.0 / n, dtype=logp.dtype)).expand_as(logp))


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float,
                    row: torch.Tensor | None = None, total: torch.Tensor | float | None = None) -> torch.Tensor:
    """PPO's clipped surrogate, negated and averaged: inputs are per (rollout, step), shape (N,).

    Without `row`, the mean over all (rollout, step) terms: a rollout weighs as much
    as its number of steps, so slow rollouts outweigh fast ones. With `row` (each term's rollout
    index), the mean over each rollout's steps, then over rollouts: every rollout weighs the same.

    `total`: divide the sum by this instead of by this batch's count of terms (or rollouts) — the
    count over every process's share when the batch is split, so the shares add up to the mean
    one process would take over the whole batch."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps, 1 + eps) * adv
    terms = -torch.minimum(unclipped, clipped)
    if row is not None:
        rows, inverse = torch.unique(row, return_inverse=True)
        per_rollout = torch.zeros(len(rows), dtype=terms.dtype, device=terms.device).index_add_(0, inverse, terms)
        steps = torch.bincount(inverse, minlength=len(rows)).to(terms.dtype)
        terms = per_rollout / steps  # (rollouts,)
    return terms.mean() if total is None else terms.sum() / total


def loss_count(row: torch.Tensor, per_rollout: bool) -> int:
    """What clipped_pg_loss averages over in this batch: its rollouts, or its (rollout, step) terms."""
    return int(torch.unique(row).numel()) if per_rollout else int(row.numel())
