"""model_args -> one config dataclass, with one-line errors for anything unknown or ill-typed.

Precedence (documented in the README): a value given in --model_args wins over the task's
per-request gen_kwargs (max_gen_toks, temperature), which win over the model's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .cache import check_cache
from .compat import check_compat
from .loading import IMPLS
from .models import FAMILIES
from .samplers import available_samplers, sampler_class, sampler_params
from .samplers.base import VALID_OF, _coerce
from .tiny import BUNDLED_DIR
from .utils import DLLMError


def _bundled() -> str:
    return str(BUNDLED_DIR)


@dataclass
class DLLMConfig:
    pretrained: str = ""  # "" = the bundled tiny model
    sampler: str = "confidence"
    block: int | None = None  # None: the model's default block (its config's dllm_block, else 32)
    gen_length: int | None = None  # None: the task's max_gen_toks, else the model's default
    steps: int | None = None  # top-k samplers: total steps; sets k = gen_length / steps
    temperature: float | None = None  # token proposal; None: the task's, else 0 (greedy)
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 8
    seed: int = 1234
    early_exit: bool = True
    max_length: int | None = None  # context limit; None: the model's declared maximum
    truncation: str = "left"  # too-long prompts: "left" (drop the oldest tokens) or "error"
    mc_num: int = 128  # loglikelihood: Monte-Carlo draws of the ELBO per request (LLaDA's default)
    mc_batch: int = 8  # loglikelihood: draws whose mask counts are stratified together (LLaDA: 8)
    trust_remote_code: bool = True
    impl: str = "auto"  # auto: native LLaDA / Dream, remote code for others; native; remote
    revision: str | None = None
    cache: str = "none"  # key/value cache across steps of a block: none, prefix, dual (lm_eval_dllm.cache)
    refresh: int = 0  # cache: steps between full forwards within a block; 0 = at block starts only
    window: int = 0  # cache=dual: positions after the block recomputed too; 0 = the block alone
    compat: str = "none"  # fast-dllm: reproduce Fast-dLLM's loop exactly (lm_eval_dllm.compat)
    sampler_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_args(cls, args: dict[str, Any]) -> "DLLMConfig":
        args = {k: v for k, v in args.items() if v is not None or k in ("block",)}
        args.pop("max_batch_size", None)  # lm-eval passes it; batches here are fixed-size
        if str(args.get("batch_size", "")).startswith("auto"):
            args["batch_size"] = 16
        hints = typing.get_type_hints(cls)
        own = {f.name for f in dataclasses.fields(cls)} - {"sampler_args"}
        sampler = str(args.get("sampler", cls.sampler))
        sampler_class(sampler)  # unknown sampler -> one-line error listing the valid ones
        # a sampler parameter whose name a model_arg of our own already takes (learned's policy
        # `temperature` vs the dLLM's token temperature) goes by another name in model_args
        alias = getattr(sampler_class(sampler), "model_arg_names", {})
        sparams = {a: alias.get(a, a) for a in (*alias, *(p for p in sampler_params(sampler)
                                                          if p not in alias.values()))}
        kw, sargs = {}, {}
        for k, v in args.items():
            if k in own:
                kw[k] = _coerce_arg(k, v, hints[k])
            elif k in sparams:
                sargs[sparams[k]] = v
            else:
                refuse_family_arg(k)
                valid = sorted(own) + [f"{p} ({sampler})" for p in sparams]
                raise DLLMError(f"unknown model_args key {k!r}; valid: {', '.join(valid)}")
        cfg = cls(**kw, sampler_args=sargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.gen_length is not None and self.gen_length <= 0:
            raise DLLMError(f"gen_length={self.gen_length} must be a positive integer; valid: 1, 2, ...")
        if self.block is not None and self.block <= 0:
            raise DLLMError(f"block={self.block} must be a positive integer; valid: a divisor of "
                            f"gen_length, or >= it for full diffusion")
        if self.steps is not None and self.steps <= 0:
            raise DLLMError(f"steps={self.steps} must be a positive integer; valid: 1, 2, ...")
        if self.steps is not None and "k" not in sampler_params(self.sampler):
            topk = [s for s in available_samplers() if "k" in sampler_params(s)]
            raise DLLMError(f"steps= applies to fixed-budget samplers only, not {self.sampler!r}; "
                            f"valid samplers: {', '.join(topk)}")
        if self.batch_size <= 0:
            raise DLLMError(f"batch_size={self.batch_size} must be positive; valid: 1, 2, ...")
        if self.max_length is not None and self.max_length <= 0:
            raise DLLMError(f"max_length={self.max_length} must be a positive integer; valid: 1, 2, ..., "
                            f"or unset for the model's declared maximum")
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise DLLMError(f"temperature={self.temperature} must be >= 0; valid: 0 (greedy) or more")
        if self.impl not in IMPLS:
            raise DLLMError(f"impl={self.impl!r}; valid: {', '.join(IMPLS)}")
        if self.mc_num <= 0:
            raise DLLMError(f"mc_num={self.mc_num} must be a positive integer; valid: 1, 2, ... (LLaDA: 128)")
        if self.mc_batch <= 0:
            raise DLLMError(f"mc_batch={self.mc_batch} must be a positive integer; valid: 1, 2, ... (LLaDA: 8)")
        check_cache(self.cache, self.refresh, self.window)
        check_compat(self.compat, self.refresh, self.window)
        if self.truncation not in ("left", "error"):
            raise DLLMError(f"truncation={self.truncation!r}; valid: left, error")

    def check_context(self, model_max: int | None) -> None:
        """gen_length must leave a prompt token of room in the context (checked before the weights)."""
        limit = self.max_length or model_max
        if self.gen_length is not None and limit is not None and self.gen_length >= limit:
            what = f"max_length={limit}" if self.max_length else f"the model's context of {limit} tokens"
            raise DLLMError(f"gen_length={self.gen_length} leaves no room for a prompt within {what}; "
                            f"valid: gen_length 1 to {limit - 1}")

    @property
    def pretrained_path(self) -> str:
        return self.pretrained or _bundled()


def refuse_family_arg(key: str) -> None:
    """A model_arg of some family's official generation that we do not do: say so and why."""
    for fam in FAMILIES.values():
        if key in fam.refused_args:
            raise DLLMError(f"model_args {key}: {fam.refused_args[key]}; valid: leave {key} unset")


def _coerce_arg(key: str, value: Any, typ: Any) -> Any:
    try:
        return _coerce("dllm", key, value, typ)
    except DLLMError:
        base = typing.get_args(typ)[0] if typing.get_args(typ) else typ
        raise DLLMError(f"model_args {key}={value!r} is not a valid {getattr(base, '__name__', base)}; "
                        f"valid: {VALID_OF.get(base, base)}") from None
