"""`factor`: Fast-dLLM's factor rule — with confidences sorted c_1 >= c_2 >= ..., commit the
largest n such that (n + 1) * (1 - c_n) < f (always at least the top one).

Wu et al., "Fast-dLLM" (2025), factor-based parallel decoding strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Sampler, StepState, check_range, register_sampler, sorted_gather, sorted_prefix


@register_sampler("factor")
class FactorSampler(Sampler):
    @dataclass(frozen=True)
    class Config:
        f: float = 1.0  # larger f commits more tokens per step

        def __post_init__(self):
            check_range("factor", "f", self.f, 0.0, float("inf"), lo_open=True)

    def statistics(self) -> frozenset[str]:
        return frozenset()  # it reads the confidences alone

    def select(self, state: StepState):
        c = sorted_gather(state.conf.float(), state.conf, state.eligible)  # (B, L) descending
        n = torch.arange(1, c.shape[1] + 1, device=c.device)[None, :]  # 1-based rank
        keep = (n + 1) * (1 - c) < self.config.f
        # the rule picks the largest n satisfying it; since c_n is non-increasing, (n+1)(1-c_n)
        # is non-decreasing, so "largest n" is the longest satisfying prefix
        return sorted_prefix(state.conf, state.eligible, keep)
