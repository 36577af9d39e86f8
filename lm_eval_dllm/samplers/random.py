"""`random`: commit k uniformly random masked positions per step (the original MDLM/LLaDA order).

Austin et al. (D3PM, 2021); Sahoo et al. (MDLM, 2024); LLaDA's `remasking="random"`.
Each row draws from its own generator, seeded per sample, so a row's result does not depend on
which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import StepState, register_sampler, row_uniforms
from .topk import TopKConfig, TopKSampler


@register_sampler("random")
class RandomSampler(TopKSampler):
    @dataclass(frozen=True)
    class Config(TopKConfig):
        _name = "random"

    def statistics(self) -> frozenset[str]:
        return frozenset()  # it reads neither

    def scores(self, state: StepState):
        return row_uniforms(state.generators, state.conf.shape[1], state.conf.device)  # (B, L)
