"""`confidence`: LLaDA's low-confidence remasking — commit the k most confident positions per step.

Nie et al., "Large Language Diffusion Models" (2025), Algorithm "low-confidence remasking".
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import StepState, register_sampler
from .topk import TopKConfig, TopKSampler


@register_sampler("confidence")
class ConfidenceSampler(TopKSampler):
    @dataclass(frozen=True)
    class Config(TopKConfig):
        _name = "confidence"

    def statistics(self) -> frozenset[str]:
        return frozenset()  # it reads the confidences alone

    def scores(self, state: StepState):
        return state.conf
