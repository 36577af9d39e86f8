"""Shared base of the fixed-budget samplers: commit the k best eligible positions per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Sampler, StepState, check_range, top_k


@dataclass(frozen=True)
class TopKConfig:
    k: int = 1  # tokens committed per step (NFE = L / k when k divides the block)

    def __post_init__(self):
        check_range(self._name, "k", self.k, 1, float("inf"))

    _name = "top-k"


class TopKSampler(Sampler):
    """Subclasses define `scores(state)`; higher is committed first."""

    def scores(self, state: StepState) -> torch.Tensor:
        raise NotImplementedError

    def select(self, state: StepState) -> torch.Tensor:
        return top_k(self.scores(state), state.eligible, self.config.k)
