"""Time per forward (NFE) and per sample with cache=none / prefix / dual (and dual with a window), measured in one run.

    python -m benchmarks.kv_cache                    # writes results/kv_cache.md (about 10 minutes on 2 CPU cores)
    python -m benchmarks.kv_cache --steps 256 --device cuda --dtype bfloat16 --out results/kv_cache_gpu.md

A random LLaDA-architecture model (NativeDLLM, LLaDA's settings: no biases, RoPE in float32,
SwiGLU) of about 60 M parameters with a 32,000-token vocabulary (LLaDA's 126,464 would make the
output layer alone 100 M), one 900-token prompt (the length of a 5-shot GSM8K prompt), L = 256,
block 32. Each mode decodes the same prompt with the top-k confidence sampler at k = L / --steps
(a fixed number of steps, so every mode makes the same NFE: --steps 256 is one token per step,
Fast-dLLM's setting; fewer steps keep a CPU run short, and each block's first forward, a full one
in every mode, then weighs more). Besides the three modes, dual with window = --window (default:
the block; 0 leaves the row out) recomputes that many positions after the block too, the setting
results/bundled/cache_accuracy.md recommends. The modes take turns, --repeats times; medians are
reported.
Random weights say nothing about accuracy: see results/bundled/cache_accuracy.md for that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.models import ArchConfig, NativeDLLM
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.spec import FamilySpec
from lm_eval_dllm.utils import atomic_write

OUT = Path(__file__).resolve().parent.parent / "results" / "kv_cache.md"
MODES = ("none", "prefix", "dual")  # and "dual, window=n" (--window)


def build(vocab: int, d_model: int, layers: int, dtype: torch.dtype, device: str) -> NativeDLLM:
    torch.manual_seed(0)
    arch = ArchConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
                      n_kv_heads=d_model // 64, d_ff=d_model * 8 // 3 // 64 * 64, rope_theta=500000.0,
                      norm_eps=1e-5, qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False)
    return NativeDLLM(arch).to(device=device, dtype=dtype).eval()


class Timed:
    """The strategy with each step timed: full forwards (span from column 0) apart from cached ones."""

    def __init__(self, strategy, sync):
        self.strategy, self.sync = strategy, sync
        self.full: list[float] = []
        self.cached: list[float] = []

    def start_block(self, lo: int, hi: int, first: int = 0) -> None:
        self.strategy.start_block(lo, hi, first)

    def release(self) -> None:
        self.strategy.release()

    def step(self, ids, attn, rows):
        self.sync()
        t0 = time.perf_counter()
        step = self.strategy.step(ids, attn, rows)
        self.sync()
        (self.full if step.computed == 0 else self.cached).append(time.perf_counter() - t0)
        return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=128, help="decode steps per sample (divides --gen-length; "
                                                         "a multiple of the number of blocks)")
    p.add_argument("--prompt", type=int, default=900, help="prompt tokens")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--window", type=int, default=None, help="dual's extra row: positions after the block "
                                                           "recomputed too (default: the block; 0: no such row)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="decodes per mode (taking turns); medians reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=str(OUT), help="markdown file to write ('' = print only)")
    a = p.parse_args(argv)
    L = a.gen_length
    if L % a.steps or a.steps % max(1, L // a.block):
        raise SystemExit(f"benchmarks.kv_cache: error: --steps {a.steps}; valid: a divisor of "
                         f"--gen-length {L} and a multiple of its {L // a.block} blocks")
    dtype = getattr(torch, a.dtype)
    model = build(a.vocab, a.d_model, a.layers, dtype, a.device)
    n_params = sum(t.numel() for t in model.parameters())
    spec = FamilySpec(family="llada", mask_id=a.vocab - 1, stop_ids=(), pad_id=0, shifted=False,
                      suppress_ids=(a.vocab - 1,), max_length=None, default_gen_length=L,
                      default_block=a.block)
    prompt = torch.randint(0, a.vocab - 1, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = make_sampler("confidence", {"k": L // a.steps})

    def sync():
        if torch.device(a.device).type == "cuda":
            torch.cuda.synchronize()

    window = a.block if a.window is None else a.window
    settings = {m: (m, 0) for m in MODES}  # row label -> (cache, window)
    if window:
        settings[f"dual, window={window}"] = ("dual", window)
    fwd = {m: Timed(model_forward(model, spec, c, window=w), sync) for m, (c, w) in settings.items()}
    diffuse(model_forward(model, spec, "dual"), [prompt[:64]], spec, sampler, a.block, a.block,
            device=a.device)  # warm-up
    wall: dict[str, list[float]] = {m: [] for m in settings}
    outs = {}
    for _ in range(a.repeats):
        for m in settings:
            sync()
            t0 = time.perf_counter()
            outs[m] = diffuse(fwd[m], [prompt], spec, sampler, L, a.block, early_exit=False, device=a.device)
            sync()
            wall[m].append(time.perf_counter() - t0)
    full_ms = 1000 * statistics.median(fwd["none"].full)
    rows = []
    base = statistics.median(wall["none"]) / int(outs["none"].nfe[0])
    for m in settings:
        nfe, s = int(outs[m].nfe[0]), statistics.median(wall[m])
        same = (outs[m].tokens == outs["none"].tokens).float().mean().item()
        cached = 1000 * statistics.median(fwd[m].cached) if fwd[m].cached else None
        rows.append([m, nfe, f"{int(outs[m].positions[0]) / nfe:.0f}", f"{s:.2f}", f"{1000 * s / nfe:.1f}",
                     f"{base / (s / nfe):.2f}", "-" if cached is None else f"{cached:.1f}",
                     "-" if cached is None else f"{full_ms / cached:.2f}", f"{same:.2f}"])
    table = tabulate(rows, ["cache", "NFE", "positions / forward", "s / sample", "ms / NFE",
                            "per-NFE speed-up vs none", "ms / cached step (median)",
                            "cached step vs none's forward", "tokens as none"], tablefmt="github",
                     disable_numparse=True)
    text = (f"`{' '.join(['python -m benchmarks.kv_cache', *(sys.argv[1:] if argv is None else argv)])}`: "
            f"random LLaDA-architecture model, "
            f"{n_params / 1e6:.0f} M parameters (vocabulary {a.vocab:,}, d_model {a.d_model}, {a.layers} "
            f"layers), prompt {a.prompt} tokens, L = {L}, block {a.block}, {a.steps} steps "
            f"({a.steps // (L // a.block)} per block, {L // a.steps} tokens each), batch 1; torch "
            f"{torch.__version__}, {a.device}, {torch.get_num_threads()} threads; median of {a.repeats}.\n\n"
            f"{table}\n\nEach block's first step is a full forward in every mode; `ms / cached step` is "
            f"the median of the other steps, next to the median forward of cache=none ({full_ms:.1f} ms). "
            f"`tokens as none`: the fraction of generated tokens equal to cache=none's (random weights: "
            f"near-ties everywhere, so this is no accuracy measure).\n")
    print(text)
    if a.out:
        atomic_write(Path(a.out), lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
