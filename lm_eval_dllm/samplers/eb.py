"""`eb`: the entropy-bounded sampler — sort eligible positions by entropy (lowest first) and
commit the largest prefix U with sum_{U} H - max_{U} H <= gamma (always at least one).

Ben-Hamu et al., "Accelerated Sampling from Masked Diffusion Models via Entropy Bounded
Unmasking" (2025). A larger gamma commits more tokens per step (monotone by construction).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Sampler, StepState, check_range, register_sampler, sorted_gather, sorted_prefix


@register_sampler("eb")
class EntropyBoundedSampler(Sampler):
    @dataclass(frozen=True)
    class Config:
        gamma: float = 0.1  # error budget in nats

        def __post_init__(self):
            check_range("eb", "gamma", self.gamma, 0.0, float("inf"))

    def statistics(self) -> frozenset[str]:
        return frozenset({"entropy"})  # it reads the entropies

    def select(self, state: StepState):
        score = -state.entropy  # best (lowest entropy) first
        h = sorted_gather(state.entropy.float(), score, state.eligible).nan_to_num(posinf=0.0)
        h = h.masked_fill(~sorted_gather(state.eligible, score, state.eligible), 0.0)
        # sorted ascending, the max of a prefix is its last element: sum - max = sum of the others
        excl = h.cumsum(-1) - h  # (B, L) entropy of the prefix before position n
        return sorted_prefix(score, state.eligible, excl <= self.config.gamma)
