"""`learned`: a trained unmasking policy decides which positions to commit.

Jazbec et al., "Learning Unmasking Policies for Diffusion Language Models" (ICML 2026): a small
transformer over the dLLM's per-position confidences, trained with GRPO (`python -m train.grpo`).

    --model_args sampler=learned                       # the shipped policy for this model and block
    --model_args sampler=learned,policy=runs/grpo/best,mode=greedy

Per eligible position the policy gives p = sigmoid(logit / temperature); `mode=sample` commits
each with probability p (per-sample seeded), `mode=greedy` commits those with p > cutoff (0.5, the
Bernoulli's mode, by default; a higher cutoff is more cautious: more NFE, fewer parallel commits).
Either way the highest-logit eligible position is committed when nothing else is. `mode=pl` draws
the commits as a Plackett-Luce sequence over logit / temperature (`policy.pl_sample`): a first
pick, then more in order until the STOP item (the policy's `stop_logit`) comes up — how a policy
trained with `--sampling pl` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils import DLLMError
from ..plackett_luce import pl_sample
from .base import Sampler, StepState, check_range, register_sampler, row_uniforms, top_k


MODES = ("sample", "greedy", "pl")


@register_sampler("learned")
class LearnedSampler(Sampler):
    @dataclass(frozen=True)
    class Config:
        policy: str = ""  # a policy folder; "" picks the shipped one for the model and block
        mode: str = "sample"  # sample | greedy | pl
        temperature: float = 1.0
        cutoff: float = 0.5  # greedy: commit where p > cutoff

        def __post_init__(self):
            if self.mode not in MODES:
                raise DLLMError(f"sampler 'learned': mode={self.mode!r}; valid: {', '.join(MODES)}")
            check_range("learned", "temperature", self.temperature, 0.0, float("inf"), lo_open=True)
            check_range("learned", "cutoff", self.cutoff, 0.0, 1.0, lo_open=True, hi_open=True)
            if self.cutoff != 0.5 and self.mode != "greedy":
                raise DLLMError(f"sampler 'learned': cutoff={self.cutoff} needs mode=greedy (sampling "
                                f"commits with probability p); valid: mode=greedy,cutoff=<0..1>")

    def __init__(self, config=None, policy=None):
        super().__init__(config)
        self.policy = policy  # an UnmaskPolicy: handed in (training) or set by the caller
        self._live = policy is not None and not self.config.policy  # training's own policy

    @classmethod
    def from_policy(cls, policy, mode: str = "sample", temperature: float = 1.0) -> "LearnedSampler":
        return cls(cls.Config(mode=mode, temperature=temperature), policy=policy)

    def wanted_policy(self) -> str | None:
        return None if self._live else self.config.policy

    def logits(self, state: StepState) -> torch.Tensor:
        if self.policy is None:
            raise DLLMError("sampler 'learned' has no policy; valid: policy=<folder from train.grpo>")
        p = next(self.policy.parameters())
        with torch.no_grad():
            return self.policy.logits_for(state.conf.to(p.device), state.margin.to(p.device),
                                          state.entropy.to(p.device), state.masked.to(p.device),
                                          state.eligible.to(p.device)).to(state.conf.device)

    def select(self, state: StepState) -> torch.Tensor:
        logits = self.logits(state).float()  # (b, L)
        if self.config.mode == "pl":
            u = row_uniforms(state.generators, 2 * logits.shape[1] + 1, logits.device)
            self.last_rank = pl_sample(logits / self.config.temperature, state.eligible,
                                       self.policy.cfg.stop_logit, u)
            return self.last_rank >= 0
        prob = torch.sigmoid(logits / self.config.temperature)
        if self.config.mode == "greedy":
            act = prob > self.config.cutoff
        else:
            act = row_uniforms(state.generators, prob.shape[1], prob.device) < prob
        act = act & state.eligible
        none = ~act.any(-1)
        if none.any():  # always commit at least the highest-logit eligible position
            act = act | (top_k(logits, state.eligible, 1) & none[:, None])
        return act
