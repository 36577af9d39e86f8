"""`margin`: commit the k positions with the largest top-1 minus top-2 probability margin.

Kim et al., "Train for the Worst, Plan for the Best: Understanding Token Ordering in Masked
Diffusions" (2025), margin-based adaptive inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import StepState, register_sampler
from .topk import TopKConfig, TopKSampler


@register_sampler("margin")
class MarginSampler(TopKSampler):
    @dataclass(frozen=True)
    class Config(TopKConfig):
        _name = "margin"

    def statistics(self) -> frozenset[str]:
        return frozenset({"margin"})  # it reads the margins

    def scores(self, state: StepState):
        return state.margin
