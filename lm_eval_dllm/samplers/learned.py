"""`learned`: a trained unmasking policy decides which positions to commit.

Jazbec et al., "Learning Unmasking Policies for Diffusion Language Models" (ICML 2026): a small
transformer over the dLLM's per-position confidences, trained with GRPO (`python -m train.grpo`).

    --model_args sampler=learned                       # the shipped policy for this model and block
    --model_args sampler=learned,policy=runs/grpo/best,mode=greedy
    --model_args sampler=learned,policy=modchain-B48-alpha3,mode=sample,policy_temperature=1.0

Per eligible position the policy gives p = sigmoid(logit / temperature) (`policy_temperature` in
--model_args, where `temperature` is the dLLM's own); `mode=sample` commits
each with probability p (per-sample seeded), `mode=greedy` commits those with p > cutoff (0.5, the
Bernoulli's mode, by default; a higher cutoff is more cautious: more NFE, fewer parallel commits).
Either way the highest-logit eligible position is committed when nothing else is. `mode=pl` draws
the commits as a Plackett-Luce sequence over logit / temperature (`plackett_luce.pl_sample`): a first
pick, then more in order until the STOP item (the policy's `stop_logit`) comes up — how a policy
trained with `--sampling pl` samples.

The paper's code (apple/ml-rl-dllm) names its sampling modes too, and they are accepted as such:
`mode=bernoulli-argmax` is `sample` and `mode=dpls` is `pl` (the same draws); `mode=bernoulli` is
its plain Bernoulli, which may commit nothing in a step (the forward is spent, the step counted);
as in the paper's loop, a block then gets at most block-size steps and what is left masked stays so.

mode, temperature and cutoff left unset come from the policy card's `recommended` entry (chosen on
the validation split by `python -m results recommend`), else the paper's evaluation defaults:
mode=sample (mode=pl for a policy trained with --sampling pl) at temperature 0.5 in
semi-autoregressive blocks (block < L) and 1.0 at full diffusion. Given ones always win. A card's temperature and cutoff apply only in the mode they were chosen for;
greedy runs at temperature 1 unless told (there a temperature only rescales the cutoff).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..utils import DLLMError
from ..plackett_luce import pl_sample
from .base import Action, Sampler, StepState, check_range, register_sampler, row_uniforms, top_k

log = logging.getLogger(__name__)
MODES = ("sample", "greedy", "pl", "bernoulli", "bernoulli-argmax", "dpls")
SAME_AS = {"bernoulli-argmax": "sample", "dpls": "pl"}  # the paper's names for our modes
SETTINGS = ("mode", "temperature", "cutoff", "alpha")


def paper_defaults(block: int, gen_length: int, sampling: str = "bernoulli") -> dict:
    """Where neither model_args nor the card say: the policy's own sampling (Bernoulli, or
    Plackett-Luce for a policy trained with it) at the paper's evaluation temperature, 0.5 for
    semi-autoregressive blocks and 1.0 at full diffusion (block >= L)."""
    return {"mode": "pl" if sampling == "pl" else "sample", "temperature": 0.5 if block < gen_length else 1.0,
            "cutoff": 0.5, "alpha": None}


def from_card(given: dict, card: dict | None) -> dict:
    """The settings a policy card supplies for the ones not given (None): its recommended mode,
    and its temperature (sampling modes) or cutoff (greedy) when the mode in use is the one they were
    chosen for. Depends on the card alone, so it can name a run (results.grid keys runs by it)."""
    rec = (card or {}).get("recommended") or {}
    if not rec.get("mode"):
        return {}
    alpha = {} if given.get("alpha") is not None or rec.get("alpha") is None else {"alpha": rec["alpha"]}
    if rec["mode"] not in MODES:  # a card written by a newer version, or by hand
        raise DLLMError(f"sampler 'learned': the policy card recommends mode={rec['mode']!r}; valid: "
                        f"{', '.join(MODES)} (or give mode= in model_args)")
    out = alpha | ({} if given.get("mode") is not None else {"mode": rec["mode"]})
    mode = given.get("mode") or rec["mode"]
    if mode == rec["mode"]:
        key = "cutoff" if mode == "greedy" else "temperature"
        if given.get(key) is None and rec.get(key) is not None:
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DLLMError(f"sampler 'learned': the policy card recommends {key}={value!r}; "
                                f"valid: a number (or give {key}= in model_args)")
            check_range("learned (policy card)", key, value, 0.0, 1.0 if key == "cutoff" else 1e6,
                        lo_open=True, hi_open=key == "cutoff")
            out[key] = value
    return out


def resolve_settings(given: dict, card: dict | None, block: int, gen_length: int,
                     sampling: str = "bernoulli") -> dict:
    """mode, temperature, cutoff in use: given > the card's `recommended` > paper defaults (greedy:
    temperature 1), plus `source`: where each came from."""
    card_part = from_card(given, card)
    out, source = {}, {}
    for k in SETTINGS:
        if given.get(k) is not None:
            out[k], source[k] = given[k], "given"
        elif k in card_part:
            out[k], source[k] = card_part[k], "card"
    base = paper_defaults(block, gen_length, sampling) | ({"temperature": 1.0} if out.get("mode") == "greedy" else {})
    for k in SETTINGS:
        if k not in out:
            out[k], source[k] = base[k], "default"
    return {**out, "source": source}


def parse_alpha(value) -> float | None:
    """A positive finite alpha from a number or its text, else None (a name, or nothing valid)."""
    try:
        a = float(value)
    except (TypeError, ValueError):
        return None
    return a if a > 0 and a != float("inf") else None


def resolve_alpha(value, policy) -> tuple[float | None, str]:
    """The number an alpha setting means for `policy`, and where it came from: None for a policy of
    one alpha (given one: an error), else the number, a card operating point, or the range's middle."""
    cfg = getattr(policy, "cfg", None)
    rng = getattr(cfg, "alpha_range", None)
    if rng is None:
        if value is not None:
            raise DLLMError(f"sampler 'learned': alpha={value} for a policy trained at one alpha; valid: an "
                            f"alpha-conditioned policy (train.grpo --alpha-range), or no alpha")
        return None, ""
    card = getattr(policy, "card", None) or {}
    points = card.get("operating_points") or {}
    if value is None:
        return math.sqrt(rng[0] * rng[1]), "the middle of the trained range"
    a = parse_alpha(value)
    if a is None:
        if value not in points:
            raise DLLMError(f"sampler 'learned': alpha={value!r} is not an operating point of this policy; "
                            f"valid: {', '.join(points) or '(the card names none)'}, or a number in "
                            f"[{rng[0]:g}, {rng[1]:g}]")
        a, where = parse_alpha(points[value]["alpha"]), f"operating point {value!r}"
    else:
        where = "given"
    if a is None or not rng[0] <= a <= rng[1]:
        raise DLLMError(f"sampler 'learned': alpha={value} is outside the range the policy was trained over; "
                        f"valid: a number in [{rng[0]:g}, {rng[1]:g}]"
                        + (f" or one of {', '.join(points)}" if points else ""))
    return a, where


def _sampling(policy) -> str:
    return getattr(getattr(policy, "cfg", None), "sampling", "bernoulli")


@register_sampler("learned")
class LearnedSampler(Sampler):
    # in --model_args `temperature` is the dLLM's token temperature: the policy's is policy_temperature
    model_arg_names = {"policy_temperature": "temperature"}

    @dataclass(frozen=True)
    class Config:
        policy: str = ""  # a policy folder; "" picks the shipped one for the model and block
        # None: the card's recommended value, else the paper's default (module docstring)
        mode: str | None = None  # sample | greedy | pl
        temperature: float | None = None
        cutoff: float | None = None  # greedy: commit where p > cutoff
        # an alpha-conditioned policy's point on the accuracy-speed curve: a number in the range it was
        # trained over, or a name of its card's `operating_points` (chosen on validation); None: the
        # card's recommended alpha, else the middle of the range (geometric)
        alpha: str | None = None

        def __post_init__(self):
            if self.mode is not None and self.mode not in MODES:
                raise DLLMError(f"sampler 'learned': mode={self.mode!r}; valid: {', '.join(MODES)}")
            if self.temperature is not None:
                check_range("learned", "temperature", self.temperature, 0.0, float("inf"), lo_open=True)
            if self.cutoff is not None:
                check_range("learned", "cutoff", self.cutoff, 0.0, 1.0, lo_open=True, hi_open=True)
            if self.alpha is not None and parse_alpha(self.alpha) is None and not self.alpha.isidentifier():
                raise DLLMError(f"sampler 'learned': alpha={self.alpha!r}; valid: a number > 0 or the name of "
                                f"an operating point on the policy card")
            if self.cutoff is not None and self.cutoff != 0.5 and self.mode != "greedy":
                raise DLLMError(f"sampler 'learned': cutoff={self.cutoff} needs mode=greedy (sampling "
                                f"commits with probability p); valid: mode=greedy,cutoff=<0..1>")

    def __init__(self, config=None, policy=None):
        super().__init__(config)
        self.policy = policy  # an UnmaskPolicy: handed in (training) or set by the caller
        self._live = policy is not None and not self.config.policy  # training's own policy
        self.settings: dict | None = None  # in use: resolved by `attach` for the batch's (block, L)
        self.row_alpha: torch.Tensor | None = None  # training: one alpha per row of the decoded batch
        self.resolved: dict[tuple, dict] = {}  # (block, L) -> settings, for the run's record

    @classmethod
    def from_policy(cls, policy, mode: str = "sample", temperature: float = 1.0) -> "LearnedSampler":
        return cls(cls.Config(mode=mode, temperature=temperature), policy=policy)

    def wanted_policy(self) -> str | None:
        return None if self._live else self.config.policy

    def attach(self, policy, block: int, gen_length: int) -> None:
        """Use `policy` at (block, L); the settings not given resolve from its card (logged once)."""
        self.policy = policy
        given = {k: getattr(self.config, k) for k in SETTINGS}
        self.settings = resolve_settings(given, getattr(policy, "card", None), block, gen_length,
                                         _sampling(policy))
        self._resolve_alpha()
        if (block, gen_length) not in self.resolved:
            self.resolved[(block, gen_length)] = self.settings
            log.info("sampler learned at block %d, L %d: %s", block, gen_length, ", ".join(
                f"{k}={self.settings[k]} ({self.settings['source'][k]})" for k in SETTINGS
                if self.settings[k] is not None))

    def _in_use(self) -> dict:
        if self.settings is None:  # a policy handed in, never attached (training): its own shape
            cfg = self.policy.cfg
            self.settings = resolve_settings({k: getattr(self.config, k) for k in SETTINGS},
                                             getattr(self.policy, "card", None), cfg.block or 1,
                                             cfg.gen_length or cfg.block or 1, _sampling(self.policy))
            if self.row_alpha is None:
                self._resolve_alpha()
        return self.settings

    def _resolve_alpha(self) -> None:
        """settings["alpha"]: the number in use (None for a policy of one alpha), and its source."""
        value, src = self.settings["alpha"], self.settings["source"]["alpha"]
        a, where = resolve_alpha(value, self.policy)
        self.settings["alpha"] = a
        self.settings["source"]["alpha"] = where if where and src != "card" else src

    def top_probs(self) -> int:
        return getattr(self.policy, "top_probs", 0)

    def reads_hidden(self) -> bool:
        return getattr(self.policy, "reads_hidden", False)

    def logits(self, state: StepState) -> torch.Tensor:
        if self.policy is None:
            raise DLLMError("sampler 'learned' has no policy; valid: policy=<folder from train.grpo>")
        alpha = self._in_use()["alpha"] if self.row_alpha is None else (
            self.row_alpha if state.rows is None else self.row_alpha[state.rows.cpu()])
        with torch.no_grad():
            # a policy of one alpha is called as before alpha existed (stand-ins define step_logits(state))
            out = self.policy.step_logits(state) if alpha is None else self.policy.step_logits(state, alpha)
            return out.to(state.conf.device)

    def may_commit_nothing(self) -> bool:
        return self.policy is not None and self._in_use()["mode"] == "bernoulli"

    def select(self, state: StepState) -> Action:
        """The step's commits; in mode pl with their order (Action.rank), which training replays."""
        logits = self.logits(state).float()  # (b, L)
        use = self._in_use()
        mode = SAME_AS.get(use["mode"], use["mode"])
        if mode == "pl":
            u = row_uniforms(state.generators, 2 * logits.shape[1] + 1, logits.device)
            rank = pl_sample(logits / use["temperature"], state.eligible, self.policy.cfg.stop_logit, u)
            return Action(rank >= 0, rank)
        prob = torch.sigmoid(logits / use["temperature"])
        if mode == "greedy":
            act = prob > use["cutoff"]
        else:
            act = row_uniforms(state.generators, prob.shape[1], prob.device) < prob
        act = act & state.eligible
        if mode == "bernoulli":  # the paper's plain Bernoulli: nothing forced
            return Action(act)
        none = ~act.any(-1)
        if none.any():  # always commit at least the highest-logit eligible position
            act = act | (top_k(logits, state.eligible, 1) & none[:, None])
        return Action(act)
