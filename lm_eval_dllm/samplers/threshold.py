"""`threshold`: Fast-dLLM's confidence-aware parallel decoding — commit every position whose
confidence is at least tau, and always at least the most confident one.

Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and
Parallel Decoding" (2025), threshold strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Sampler, StepState, check_range, register_sampler, top_k


@register_sampler("threshold")
class ThresholdSampler(Sampler):
    @dataclass(frozen=True)
    class Config:
        tau: float = 0.9  # commit positions with confidence >= tau

        def __post_init__(self):
            check_range("threshold", "tau", self.tau, 0.0, 1.0, lo_open=True)

    def statistics(self) -> frozenset[str]:
        return frozenset()  # it reads the confidences alone

    def select(self, state: StepState):
        above = state.eligible & (state.conf >= self.config.tau)
        return above | top_k(state.conf, state.eligible, 1)
