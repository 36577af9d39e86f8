"""`learned`: a trained unmasking policy decides which positions to commit.

Jazbec et al., "Learning Unmasking Policies for Diffusion Language Models" (ICML 2026): a small
transformer over the dLLM's per-position confidences, trained with GRPO (`python -m train.grpo`).

    --model_args sampler=learned                       # the shipped policy for this model and block
    --model_args sampler=learned,policy=runs/grpo/best,mode=greedy

Per eligible position the policy gives p = sigmoid(logit / temperature); `mode=sample` commits
each with probability p (per-sample seeded), `mode=greedy` commits those with p > cutoff (0.5, the
Bernoulli's mode, by default; a higher cutoff is more cautious: more NFE, fewer parallel commits).
Either way the highest-logit eligible position is committed when nothing else is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..utils import DLLMError
from .base import Sampler, StepState, check_range, register_sampler, top_k

log = logging.getLogger(__name__)


@register_sampler("learned")
class LearnedSampler(Sampler):
    @dataclass(frozen=True)
    class Config:
        policy: str = ""  # a policy folder; "" picks the shipped one for the model and block
        mode: str = "sample"  # sample | greedy
        temperature: float = 1.0
        cutoff: float = 0.5  # greedy: commit where p > cutoff

        def __post_init__(self):
            if self.mode not in ("sample", "greedy"):
                raise DLLMError(f"sampler 'learned': mode={self.mode!r}; valid: sample, greedy")
            check_range("learned", "temperature", self.temperature, 0.0, float("inf"), lo_open=True)
            check_range("learned", "cutoff", self.cutoff, 0.0, 1.0, lo_open=True, hi_open=True)
            if self.cutoff != 0.5 and self.mode != "greedy":
                raise DLLMError(f"sampler 'learned': cutoff={self.cutoff} needs mode=greedy (sampling "
                                f"commits with probability p); valid: mode=greedy,cutoff=<0..1>")

    def __init__(self, config=None, policy=None):
        super().__init__(config)
        self.policy = policy  # a live UnmaskPolicy (training) or None (loaded by bind)
        self._bound: tuple | None = None

    @classmethod
    def from_policy(cls, policy, mode: str = "sample", temperature: float = 1.0) -> "LearnedSampler":
        return cls(cls.Config(mode=mode, temperature=temperature), policy=policy)

    def bind(self, *, model_id: str, block: int, gen_length: int, device) -> None:
        """Load the policy that fits this model and block (once per distinct setting)."""
        key = (model_id, block, gen_length)
        if self._bound == key or (self.policy is not None and self._bound is None and not self.config.policy):
            self._bound = key
            return
        from policies import resolve_policy
        from ..policy import UnmaskPolicy

        path = resolve_policy(self.config.policy, model_id=model_id, block=block, gen_length=gen_length)
        self.policy = UnmaskPolicy.load(path, device=device)
        cfg = self.policy.cfg
        if cfg.base_model and cfg.base_model != model_id:
            log.warning("policy %s was trained on %s, used here with %s (transfer across models)",
                        path, cfg.base_model, model_id)
        if cfg.block and min(cfg.block, cfg.gen_length or cfg.block) != min(block, gen_length):
            log.warning("policy %s was trained with block %d, used here with block %d (transfer "
                        "across block sizes)", path, cfg.block, block)
        self._bound = key

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
        prob = torch.sigmoid(logits / self.config.temperature)
        if self.config.mode == "greedy":
            act = prob > self.config.cutoff
        else:
            u = torch.stack([torch.rand(prob.shape[1], generator=g, device=g.device)
                             for g in state.generators]).to(prob.device)
            act = u < prob
        act = act & state.eligible
        none = ~act.any(-1)
        if none.any():  # always commit at least the highest-logit eligible position
            act = act | (top_k(logits, state.eligible, 1) & none[:, None])
        return act
