"""Pure GRPO helpers: group advantages and the clipped policy-gradient loss (no model, no I/O)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """r - mean of its group (rollouts of one prompt are contiguous); no std division (as the paper)."""
    r = rewards.view(-1, group)
    return (r - r.mean(-1, keepdim=True)).flatten()


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's clipped surrogate, negated and averaged: inputs are per (rollout, step), shape (N,)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps, 1 + eps) * adv
    return -torch.minimum(unclipped, clipped).mean()
