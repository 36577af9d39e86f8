"""Forward strategies of the one decode loop: no cache, or a block-wise key/value cache.

    lm_eval --model dllm --model_args sampler=threshold,tau=0.9,block=8,cache=dual,window=8 --tasks modchain
    python -m benchmarks.kv_cache                     # time per forward: none / prefix / dual (and window)

The decode loop (`decode.diffuse`) calls `start_block(lo, hi, first)` when a block starts, naming the
canvas columns [lo, hi) to recompute: the block's, and for Dream, whose logit at i predicts token
i + 1, also the column before the block (so every logit the block needs is fresh, and so are the
keys/values of all the block's tokens), and `first`, the first column whose logits it ever reads
(the output layer, 126k floats per position for LLaDA, runs from there on only); then
`step(ids, attn, rows)` once per step, which returns a `Step`: logits for a span of columns, where
they start and where the forward's computation started; and `release()` when the decode ends.

- none: every step is a full forward over the canvas (span = everything).
- prefix: the first step of a block is a full forward that also keeps every layer's keys/values;
  later steps recompute [lo, end of canvas) and reuse the kept keys/values of [0, lo) (the prompt
  and the committed blocks before this one).
- dual: as prefix, but later steps recompute only [lo, hi + window) and reuse the kept keys/values
  of the prefix and of the rest of the suffix (the later, still masked blocks). window=0 is
  Fast-dLLM's dual cache (the block alone).

Reused keys/values are those of the last full forward, so they miss what was committed since
("approximate cache", as Fast-dLLM's): prefix tokens do not change within a block, but their
keys/values depend on the block's tokens through attention. `refresh=n` redoes the full forward
every n steps within a block.

The loop keeps the statistics of positions outside the span from the last forward that computed
them (decode.diffuse), so a sampler or a learned policy that reads the whole canvas sees those.

Why `window`: in dual what goes stale is the suffix. Its mask positions carry the model's plan of
what follows (on the bundled task: does the chain stop at the result 0 just committed, so that
`#### 0` comes next?); their keys/values from the block's first forward predate what the block
committed since, and the block's positions read them. Recomputing the positions right after the
block (window = the block size) restores cache=none's accuracy on the bundled model at B = 8,
where `refresh` cannot help much (blocks there take one or two steps): see
results/bundled/cache_accuracy.md; `python -m benchmarks.kv_cache` times what it costs.

Given keys/values computed from the current canvas, a span forward equals the full forward on the
span (tests/test_cache.py), so any accuracy difference comes only from the staleness.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .models import FAMILIES, NativeDLLM
from .tiny import TinyDLLMModel
from .utils import DLLMError

CACHE_MODES = ("none", "prefix", "dual")
KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, T, Dh) keys (after RoPE) and values of one layer
# (ids, attn, positions, past_kv, return_kv) -> (logits, kv of the span or None)
SpanForward = Callable[..., tuple[torch.Tensor, list[KV] | None]]


class Step(NamedTuple):
    """What a strategy's step returns: logits of columns [start, start + logits.shape[1]), the
    span's end; the forward ran on columns [computed, that end) (before the output layer)."""

    logits: torch.Tensor  # (b, span, V)
    start: int
    computed: int


def check_cache(cache: str, refresh: int, window: int = 0) -> None:
    if cache not in CACHE_MODES:
        raise DLLMError(f"cache={cache!r}; valid: {', '.join(CACHE_MODES)}")
    if refresh < 0:
        raise DLLMError(f"refresh={refresh} must be >= 0; valid: 0 (never within a block), 1, 2, ...")
    if window < 0:
        raise DLLMError(f"window={window} must be >= 0; valid: 0 (the block alone), 1, 2, ... (e.g. the block size)")
    if window and cache != "dual":  # prefix already recomputes everything after the block
        raise DLLMError(f"window={window} applies to cache=dual only, not cache={cache}; valid: window=0, "
                        f"or cache=dual")


def check_cache_support(cache: str, supported: bool, what: str) -> None:
    """The one refusal of a cache the model cannot run (read from the family before weights load,
    and from the loaded model's class)."""
    if cache != "none" and not supported:
        models = ", ".join(f"{f.name}{' (impl=auto or native)' if f.native else ''}"
                           for f in FAMILIES.values() if f.cache)
        raise DLLMError(f"cache={cache} is not supported by {what}; valid: cache=none, or a model "
                        f"that supports it: {models}")


def span_forward(model) -> SpanForward | None:
    """The model's forward over a span with reused keys/values, if its class has one."""
    if isinstance(model, NativeDLLM):
        def native(ids, attn, pos, past, ret, out_from=0, **kw):  # kw: block (block-diffusion attention)
            return model(ids, attn, pos, past, ret, out_from=out_from, **kw)
        return native
    if isinstance(model, TinyDLLMModel):
        def run(ids, attn, pos, past, ret, out_from=0):
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_kv=past, return_kv=ret,
                        out_from=out_from)
            return out.logits, out.kv
        return run
    return None


class HiddenTap:
    """The dLLM's last hidden states, read where they are made: the output of its final norm (the
    output layer's input) at each forward, while on. Its columns are the step's logits' columns.
    The decode loop turns it on for a sampler that reads them (`Sampler.reads_hidden`) and off
    after; off, no hook is installed."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.handle = module, None
        self.last: torch.Tensor | None = None  # (b, span, D) of the last forward

    def set(self, on: bool) -> None:
        if on and self.handle is None:
            self.handle = self.module.register_forward_hook(self._keep)
        elif not on and self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.last = None

    def _keep(self, _module, _args, out: torch.Tensor) -> None:
        self.last = out


def hidden_tap(model) -> HiddenTap | None:
    """A tap on the final norm of a model whose forward is ours (native, bundled); None for others."""
    if isinstance(model, NativeDLLM):
        return HiddenTap(model.norm)
    if isinstance(model, TinyDLLMModel):
        return HiddenTap(model.ln_f)
    return None


def positions_from(attn: torch.Tensor) -> torch.Tensor:
    """(B, T) RoPE positions counted from each row's first real token (0 on left padding)."""
    return (attn.long().cumsum(-1) - 1).clamp(min=0)


class FullForward:
    """cache=none, and any plain `forward(ids, attn) -> logits`: every step sees everything.

    Logits are computed only from column `first` on (start_block's: where the generated region's
    logits start), through `project(ids, attn, out_from)` where the model can (span_forward's
    models), else cut from the plain forward's. A block-diffusion family's blocks (attend_blocks)
    reach the model as its attention's blocks."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 project: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None):
        self.forward, self.project, self.first = forward, project, 0
        self.block = 0  # > 0: block-diagonal-causal attention over blocks of this size (LLaDA2)
        self.tap: HiddenTap | None = None  # the model's hidden states, where it exposes them (model_forward)

    def attend_blocks(self, size: int) -> None:
        """This decode's blocks are the attention's blocks (a block-diffusion family)."""
        self.block = size

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, out_from: int = 0) -> torch.Tensor:
        """(B, T - out_from, V) logits of columns out_from..T - 1."""
        kw = {"block": self.block} if self.block else {}
        if self.project is not None:
            return self.project(ids, attn, out_from, **kw)
        return self.forward(ids, attn, **kw)[:, out_from:]

    def start_block(self, lo: int, hi: int, first: int = 0) -> None:
        self.first = first

    def step(self, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor) -> Step:
        return Step(self(ids, attn, self.first), self.first, 0)

    def release(self) -> None:
        self.block = 0


class CachedForward:
    """cache=prefix or dual over a model's span forward (see the module docstring)."""

    def __init__(self, run: SpanForward, mode: str, refresh: int = 0, window: int = 0):
        if mode == "none":
            raise DLLMError("CachedForward(mode='none'); valid: prefix, dual (none is FullForward)")
        check_cache(mode, refresh, window)
        self.run, self.mode, self.refresh, self.window = run, mode, refresh, window
        self.lo = self.hi = 0
        self.rows: torch.Tensor | None = None  # (b,) rows of the last full forward, ascending
        self.past: list[KV] = []  # per layer: kept keys/values of the reused columns, rows as self.rows
        self.past_attn: torch.Tensor | None = None  # (b, Tpast)
        self.since = 0  # steps since the last full forward
        self.first = 0  # a full forward's logits start at this column
        self.tap: HiddenTap | None = None  # the model's hidden states, where it exposes them (model_forward)

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, out_from: int = 0) -> torch.Tensor:
        return self.run(ids, attn, positions_from(attn), None, False, out_from)[0]

    def start_block(self, lo: int, hi: int, first: int = 0) -> None:
        self.lo, self.hi, self.first = lo, hi, first
        self.release()  # before the block's full forward: never two blocks' keys/values at once

    def release(self) -> None:
        """Drop the kept keys/values (the loop calls it when a decode ends: they can be GBs)."""
        self.rows, self.past, self.past_attn = None, [], None

    def _end(self, T: int) -> int:
        """Where the recomputed span [lo, end) ends on a canvas of T columns."""
        return T if self.mode == "prefix" else min(self.hi + self.window, T)

    def _reused(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """The reused columns of x (..., T, ...) along dim -2 (keys/values) or -1 (attn)."""
        d = -2 if x.dim() == 4 else -1
        end = self._end(T)
        return torch.cat([x.narrow(d, 0, self.lo), x.narrow(d, end, T - end)], dim=d)

    def step(self, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor) -> Step:
        T = ids.shape[1]
        pos = positions_from(attn)  # (b, T): each row's own positions, left padding included
        if self.rows is None or (self.refresh and self.since >= self.refresh):
            logits, kv = self.run(ids, attn, pos, None, True, self.first)  # (b, T - first, V): the block's full forward
            self.past = [(self._reused(k, T), self._reused(v, T)) for k, v in kv]
            self.past_attn = self._reused(attn, T)
            self.rows, self.since = rows, 1
            return Step(logits, self.first, 0)
        if rows.numel() != self.rows.numel():  # rows only leave within a block (done or block filled)
            idx = torch.searchsorted(self.rows, rows)
            self.past = [(k[idx], v[idx]) for k, v in self.past]
            self.past_attn, self.rows = self.past_attn[idx], rows
        end = self._end(T)
        span_attn = torch.cat([self.past_attn, attn[:, self.lo:end]], dim=1)  # (b, Tpast + span)
        logits, _ = self.run(ids[:, self.lo:end], span_attn, pos[:, self.lo:end], self.past, False)
        self.since += 1
        return Step(logits, self.lo, self.lo)


def forward_strategy(model, plain: Callable, cache: str = "none", refresh: int = 0, window: int = 0,
                     project: Callable | None = None):
    """FullForward(plain, project) for cache=none, else a CachedForward over the model's span forward;
    either with the model's hidden_tap."""
    check_cache(cache, refresh, window)
    if cache == "none":
        strategy = FullForward(plain, project)
    else:
        run = span_forward(model)
        check_cache_support(cache, run is not None, type(model).__name__)
        strategy = CachedForward(run, cache, refresh, window)
    strategy.tap = hidden_tap(model)
    return strategy
