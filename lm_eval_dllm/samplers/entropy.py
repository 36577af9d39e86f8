"""`entropy`: commit the k positions whose predictive distribution has the lowest entropy.

Ben-Hamu et al. (2025) and Dream's `entropy` remasking order (Ye et al., "Dream 7B", 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import StepState, register_sampler
from .topk import TopKConfig, TopKSampler


@register_sampler("entropy")
class EntropySampler(TopKSampler):
    @dataclass(frozen=True)
    class Config(TopKConfig):
        _name = "entropy"

    def statistics(self) -> frozenset[str]:
        return frozenset({"entropy"})  # it reads the entropies

    def scores(self, state: StepState):
        return -state.entropy
