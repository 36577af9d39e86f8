"""The sampler interface, its registry, and the helpers every sampler shares.

A sampler decides, at each denoising step, which masked positions of the current block to
commit. It never calls the model and never touches caches: the decode loop hands it a
`StepState` (per-position statistics of the model's proposal) and gets back its action: an
`Action` (the commit mask, plus the commit order for a sampler whose commits come in one), or,
from a sampler with no order to tell, the bare (B, L) bool mask.

Contract (checked by the loop): for every row that still has masked positions in the current
block, the returned mask commits at least one of them and nothing outside them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..utils import DLLMError


@dataclass
class StepState:
    """What a sampler sees at one step. Shapes: B = rows still decoding, L = generation length."""

    conf: torch.Tensor  # (B, L) probability of the proposed token x0
    margin: torch.Tensor | None  # (B, L) top-1 minus top-2 probability (None unless statistics() names it)
    entropy: torch.Tensor | None  # (B, L) entropy of the predictive distribution, nats (likewise)
    masked: torch.Tensor  # (B, L) bool, still masked before this step's commit
    eligible: torch.Tensor  # (B, L) bool, masked and inside the current block
    generators: list[torch.Generator]  # one per row, seeded per sample (batch-invariant)
    top: torch.Tensor | None = None  # (B, L, K) probabilities of the K most likely tokens (K: top_probs())
    steps: torch.Tensor | None = None  # (B,) decode steps (forwards) each row took before this one
    hidden: torch.Tensor | None = None  # (B, L, D) the dLLM's last hidden states (reads_hidden())
    block_start: int = 0  # the current block: generated positions [block_start, block_start + block_size)
    block_size: int = 0
    rows: torch.Tensor | None = None  # (B,) which rows of the decoded batch these are (None: all, in order)
    x0: torch.Tensor | None = None  # (B, L) long, the proposed tokens (what a commit writes; conf is their probability)


@dataclass(frozen=True)
class Action:
    """What a sampler commits at one step."""

    commit: torch.Tensor  # (B, L) bool, the positions committed
    # (B, L) long, the order of the commits (-1 = not committed), for a sampler whose commits come
    # in an order (Plackett-Luce); the decode loop records it for training to replay. None: unordered
    rank: torch.Tensor | None = None

    @classmethod
    def of(cls, out: Action | torch.Tensor) -> Action:
        """A sampler's return value as an Action: a bare bool mask is an unordered commit."""
        return out if isinstance(out, Action) else cls(out)


def row_uniforms(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """(rows, *shape) uniform draws in [0, 1), row i from generators[i] on that generator's own
    device (torch refuses a CUDA generator for a CPU draw), then moved to `device`: a row's draw
    never depends on which rows share its batch. Every per-row random draw goes through here."""
    if len(generators) == 1:  # one row: no stacked copy (a row of LLaDA's noise is 130 MB)
        return torch.rand(shape, generator=generators[0], device=generators[0].device)[None].to(device)
    return torch.stack([torch.rand(shape, generator=g, device=g.device) for g in generators]).to(device)


STATISTICS = frozenset({"margin", "entropy"})  # the StepState statistics a sampler may do without


class Sampler:
    """Base class. Subclasses set `Config` (a frozen dataclass) and implement `select`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None  # type: ignore[assignment]

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def select(self, state: StepState) -> Action | torch.Tensor:  # an Action, or its (B, L) bool commit mask
        raise NotImplementedError

    def wanted_policy(self) -> str | None:
        """A sampler that runs a trained policy names it here ("": the shipped one for the model
        and block); the caller loads it and calls `attach` (samplers do no I/O). None: no policy."""
        return None

    def may_commit_nothing(self) -> bool:
        """True for a sampler whose step may commit nothing (the paper's plain Bernoulli): the loop
        then allows empty steps and gives a block at most block-size steps, as the paper's loop does."""
        return False

    def statistics(self) -> frozenset[str]:
        """Which of StepState's `margin` and `entropy` `select` reads (a subset of STATISTICS); the
        decode computes only those, and hands None for the others. Each is a pass over the whole
        vocabulary at every position: for a 126k-157k vocabulary, more than the forward of a small
        model. Default: both (a sampler that says nothing gets everything)."""
        return STATISTICS

    def top_probs(self) -> int:
        """How many of each position's most likely tokens' probabilities `select` reads
        (StepState.top); 0: none."""
        return 0

    def reads_hidden(self) -> bool:
        """Whether `select` reads the dLLM's last hidden states (StepState.hidden: after its final
        norm, where its logits come from; only models that expose them, decode.diffuse says which)."""
        return False

    def attach(self, policy, block: int, gen_length: int) -> None:
        """The caller hands over the policy it loaded for `wanted_policy`, before decoding at (block, L)."""
        self.policy = policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


_REGISTRY: dict[str, type[Sampler]] = {}


def register_sampler(name: str):
    """Class decorator: make a Sampler subclass available as `sampler=<name>`."""

    def deco(cls: type[Sampler]) -> type[Sampler]:
        if not (isinstance(cls, type) and issubclass(cls, Sampler)):
            raise TypeError(f"@register_sampler({name!r}) needs a Sampler subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"sampler {name!r}: Config must be a dataclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"sampler name {name!r} is already registered by {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_samplers() -> list[str]:
    return sorted(_REGISTRY)


def sampler_class(name: str) -> type[Sampler]:
    """A registered name, or "module:Class" (imported on demand, e.g. your own my_samplers.py)."""
    if name not in _REGISTRY and ":" in name:
        _import_sampler(name)
    if name not in _REGISTRY:
        raise DLLMError(f"unknown sampler {name!r}; valid: {', '.join(available_samplers())}, "
                        f"or module:Class of your own Sampler subclass")
    return _REGISTRY[name]


def _import_sampler(spec: str) -> None:
    mod_name, _, cls_name = spec.partition(":")
    try:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            if os.getcwd() in sys.path:  # the `lm_eval` script does not put the cwd on sys.path
                raise
            sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
        cls = getattr(mod, cls_name)
    except (ImportError, AttributeError) as e:
        raise DLLMError(f"cannot import sampler {spec!r} ({e}); valid: "
                        f"{', '.join(available_samplers())}, or module:Class") from None
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise DLLMError(f"sampler {spec!r} is not a Sampler subclass; valid: {', '.join(available_samplers())}")
    _REGISTRY[spec] = cls


def sampler_params(name: str) -> dict[str, Any]:
    """The parameters of a sampler with their defaults."""
    cls = sampler_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls.Config)}


def _coerce(sampler: str, key: str, value: Any, typ: Any) -> Any:
    """Turn a model_args string into the field's type, with a one-line error."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes"):
                return True
            if str(value).lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value)) if not isinstance(value, (int, float)) else int(value)
        if typ is float:
            number = float(value)
            if not math.isfinite(number):  # nan, inf: no setting means them
                raise ValueError
            return number
        if typ is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise DLLMError(
        f"sampler {sampler!r}: parameter {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}; "
        f"valid: {VALID_OF.get(typ, getattr(typ, '__name__', typ))}"
    )


VALID_OF = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}


def make_sampler(name: str, params: dict[str, Any] | None = None) -> Sampler:
    """Build a registered sampler from (possibly string-valued) params; unknown keys fail loudly."""
    cls = sampler_class(name)
    params = dict(params or {})
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(params) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise DLLMError(f"sampler {name!r} has no parameter {unknown[0]!r}; valid: {valid}")
    kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in params.items()}
    try:
        config = cls.Config(**kwargs)
    except DLLMError:
        raise
    except (TypeError, ValueError) as e:
        raise DLLMError(f"sampler {name!r}: {e}") from None
    return cls(config)


def check_range(sampler: str, key: str, value: float, lo: float, hi: float,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a one-line DLLMError unless lo <(=) value <(=) hi."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise DLLMError(f"sampler {sampler!r}: {key}={value} is out of range; valid: {rng}")


# ---------------------------------------------------------------- shared selection helpers

NEG = float("-inf")


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Scores to sort: at least float32, float64 kept (compat=fast-dllm's confidences, which tell
    apart probabilities that float32 rounds to 1)."""
    return scores if scores.dtype == torch.float64 else scores.float()


def top_k(scores: torch.Tensor, eligible: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the k highest-scoring eligible positions of each row (fewer if fewer exist).

    k may be an int or a (B,) tensor; rows keep at least one commit whenever they have an
    eligible position. Ties break towards the lower position (stable sort).
    """
    B, L = scores.shape
    s = _ranked(scores).masked_fill(~eligible, NEG)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, L)
    kk = torch.as_tensor(k, device=scores.device).expand(B).clamp(min=1)  # (B,)
    n = torch.minimum(kk, eligible.sum(-1))  # (B,)
    take = torch.arange(L, device=scores.device)[None, :] < n[:, None]  # (B, L) in sorted order
    out = torch.zeros_like(eligible)
    out.scatter_(1, order, take)
    return out & eligible


def sorted_prefix(scores: torch.Tensor, eligible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Commit, per row, the longest prefix of eligible positions in descending score order.

    `keep` is a (B, L) bool in *sorted* order saying whether the n-th best (0-based) may be
    committed; the prefix stops at the first False. The best position is always committed.
    """
    s = _ranked(scores).masked_fill(~eligible, NEG)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, L)
    n_elig = eligible.sum(-1, keepdim=True)  # (B, 1)
    idx = torch.arange(s.shape[1], device=s.device)[None, :]
    ok = keep & (idx < n_elig)
    ok[:, 0] = n_elig[:, 0] > 0  # always at least the top one
    prefix = ok.long().cumprod(-1).bool()  # stop at the first refusal
    out = torch.zeros_like(eligible)
    out.scatter_(1, order, prefix)
    return out & eligible


def sorted_gather(values: torch.Tensor, scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """values reordered like `sorted_prefix` orders positions (ineligible ones last)."""
    s = _ranked(scores).masked_fill(~eligible, NEG)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    return values.gather(1, order)
