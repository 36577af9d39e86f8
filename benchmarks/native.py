"""Native vs remote-code LLaDA: forward time and peak memory of loading, measured in one run.

    python -m benchmarks.native               # writes results/native.md
    python -m benchmarks.native --no-write

A LLaDA of the real vocabulary (126,464) and a small body (d_model 256, 2 layers), stored in
bfloat16 as the published weights are, carrying the official remote code (LLaDA rev B, patched
for transformers 5 as the tests patch it; needs ../shared/reference). Forward: the same batches
through `model_forward` with impl=native and impl=remote, float32, taking turns (who goes first
alternates), median of the repeats; the vocabulary-sized output layer dominates at this size.
Loading: each impl in a fresh process, its peak resident memory during `load(..., dtype=bfloat16)`
and a pass over every weight, minus its resident memory before (file pages mapped while the
weights are read count too), next to the size of the weights. One CPU thread.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.decode import model_forward
from lm_eval_dllm.loading import load, load_tokenizer

OUT = Path(__file__).resolve().parent.parent / "results" / "native.md"
SIZE = {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "dtype": torch.bfloat16}


def peak_mb() -> float:
    # VmHWM, not ru_maxrss: the latter survives exec and starts at the parent's peak
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024  # KiB


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measure_load(ckpt: str, impl: str) -> dict:
    """Run in a fresh process: peak memory growth and wall time of one bf16 load."""
    torch.set_num_threads(1)
    load_tokenizer(ckpt)  # both impls load it alike: its imports are not the model's memory
    base = rss_mb()
    t0 = time.perf_counter()
    model, _, _ = load(ckpt, dtype="bfloat16", device="cpu", impl=impl)
    wall = time.perf_counter() - t0
    for p in model.parameters():  # fault in weights that are still memory-mapped from the file
        p.sum()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"peak_growth_mb": peak_mb() - base, "weights_mb": weights, "load_s": wall,
            "dtype": str(next(model.parameters()).dtype), "class": type(model).__name__}


def time_forwards(ckpt: str, repeats: int) -> list[list]:
    torch.set_num_threads(1)
    fwd = {}
    for impl in ("native", "remote"):
        model, _, spec = load(ckpt, dtype="float32", device="cpu", impl=impl)
        fwd[impl] = model_forward(model, spec)
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, B, T, pad in (("B=8, T=128, unpadded", 8, 128, 0), ("B=8, T=128, left-padded", 8, 128, 40),
                             ("B=1, T=512, unpadded", 1, 512, 0)):
        ids = torch.randint(0, 126000, (B, T), generator=g)  # (B, T)
        attn = torch.ones_like(ids)
        for i in range(1, B):
            attn[i, :pad * i // B] = 0  # rows padded by 0 .. pad tokens
        secs = {"native": [], "remote": []}
        for impl in ("native", "remote"):
            fwd[impl](ids, attn)  # warm-up
        for rep in range(repeats):
            for impl in ("native", "remote")[::1 if rep % 2 else -1]:  # alternate who goes first
                t0 = time.perf_counter()
                fwd[impl](ids, attn)
                secs[impl].append(time.perf_counter() - t0)
        n, r = statistics.median(secs["native"]), statistics.median(secs["remote"])
        rows.append([label, f"{1000 * n:.1f}", f"{1000 * r:.1f}", f"{n / r:.2f}"])
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="timed forwards per impl and shape")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    p.add_argument("--measure-load", nargs=2, metavar=("CKPT", "IMPL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure_load:  # the child process of one load measurement
        print(json.dumps(measure_load(*a.measure_load)))
        return
    from tests.native_oracle import REFERENCE, official_checkpoint  # the fixture's patching

    if not (REFERENCE / "llada").exists():
        raise SystemExit(f"benchmarks.native: error: no official LLaDA code at {REFERENCE}; "
                         f"valid: a checkout with ../shared/reference")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(official_checkpoint(Path(tmp) / "llada", "llada-B", **SIZE))
        loads = {}
        for impl in ("native", "remote"):
            r = subprocess.run([sys.executable, "-m", "benchmarks.native", "--measure-load", ckpt, impl],
                               capture_output=True, text=True, check=True)
            loads[impl] = json.loads(r.stdout.strip().splitlines()[-1])
        rows = time_forwards(ckpt, a.repeats)
    fwd = tabulate(rows, ["batch", "native ms", "remote ms", "native / remote"], tablefmt="github")
    n, r = loads["native"], loads["remote"]
    mem = tabulate([[impl, v["class"], v["dtype"], f"{v['weights_mb']:.0f}", f"{v['peak_growth_mb']:.0f}",
                     f"{v['load_s']:.2f}"] for impl, v in loads.items()],
                   ["impl", "class", "dtype", "weights MiB", "peak RSS growth MiB", "load s"],
                   tablefmt="github")
    text = (f"`python -m benchmarks.native`: LLaDA rev B, vocabulary 126,464, d_model "
            f"{SIZE['d_model']}, {SIZE['n_layers']} layers, stored in bfloat16; torch "
            f"{torch.__version__}, CPU, 1 thread.\n\nForward (float32, median of {a.repeats}):\n\n"
            f"{fwd}\n\nLoading in bfloat16 (each in a fresh process); peak growth native / remote: "
            f"{n['peak_growth_mb'] / r['peak_growth_mb']:.2f}\n\n{mem}\n")
    print(text)
    if not a.no_write:
        from lm_eval_dllm.utils import atomic_write

        atomic_write(OUT, lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
