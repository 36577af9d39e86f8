"""Reproduce a reference implementation's decode exactly where ours differs from it by design.

    lm_eval --model dllm --model_args sampler=threshold,tau=0.9,block=32,cache=dual,compat=fast-dllm ...

`compat=none` (the default) is this package's loop. `compat=fast-dllm` makes the loop behave as
Fast-dLLM's `generate`, `generate_with_prefix_cache` and `generate_with_dual_cache` (NVlabs/Fast-dLLM
v1, llada/generate.py) do, so that its tokens and NFE are reproduced (tests/test_fast_dllm.py):

- no early exit: a row decodes every block, even after it has committed EOS;
- the mask token may be proposed: its logit is not suppressed in the argmax (a position whose
  argmax is the mask token stays masked and is decided again);
- the no-op forward: with a cache, a block that its first (full) forward filled costs one more
  forward that commits nothing (their loop tests "block filled?" only after a cached forward);
- the softmax and confidences in float64: in float32 confidences near 1 round to 1.0 and tie, so
  a top-k or threshold choice among them can differ.

What it cannot change: `window` and `refresh` (Fast-dLLM has neither: refused with compat), and
sampling noise at temperature > 0 (Fast-dLLM draws float64 Gumbel noise from torch's global
generator; ours comes from per-row generators). docs/models.md lists the differences and their
measured effect on the bundled task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .utils import DLLMError


@dataclass(frozen=True)
class Compat:
    """What the decode loop does where implementations differ."""

    early_exit: bool = True  # a row stops once it has committed a stop token (and all before it)
    suppress_mask: bool = True  # the mask token is never proposed
    noop_forward: bool = False  # cache: one forward committing nothing after a block its first forward filled
    stats_dtype: torch.dtype = torch.float32  # of the softmax and the confidences the sampler ranks


COMPAT = {"none": Compat(),
          "fast-dllm": Compat(early_exit=False, suppress_mask=False, noop_forward=True, stats_dtype=torch.float64)}


def check_compat(compat: str | Compat, refresh: int = 0, window: int = 0) -> Compat:
    """The Compat of a `compat=` value (a Compat passes as it is: benchmarks.compat measures one
    difference at a time); one-line DLLMError for unknown values or settings the reference lacks."""
    if isinstance(compat, Compat):
        return compat
    if compat not in COMPAT:
        raise DLLMError(f"compat={compat!r}; valid: {', '.join(COMPAT)}")
    if compat != "none" and (refresh or window):
        key, value = ("window", window) if window else ("refresh", refresh)
        raise DLLMError(f"{key}={value} has no counterpart in compat={compat}; valid: {key}=0, or compat=none")
    return COMPAT[compat]
