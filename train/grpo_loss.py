"""Pure GRPO helpers: group advantages and the clipped policy-gradient loss (no model, no I/O)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """r - mean of its group (rollouts of one prompt are contiguous); no std division (as the paper)."""
    r = rewards.view(-1, group)
    return (r - r.mean(-1, keepdim=True)).flatten()


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float,
                    row: torch.Tensor | None = None, total: torch.Tensor | float | None = None) -> torch.Tensor:
    """PPO's clipped surrogate, negated and averaged: inputs are per (rollout, step), shape (N,).

    Without `row`, the mean over all (rollout, step) terms (the paper's): a rollout weighs as much
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
