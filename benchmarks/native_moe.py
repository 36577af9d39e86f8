"""Native vs official LLaDA-MoE and LLaDA2.0: forward time and peak load memory, in one run.

    python -m benchmarks.native_moe               # writes results/native_moe.md
    python -m benchmarks.native_moe --no-write

Per family a tiny checkpoint of the real vocabulary (157,184) with a small body (d_model 256,
2 layers, the tiny test config's experts), stored in bfloat16, and the official modeling file
from ../shared/reference run as the tests run it (`tests/moe_oracle.py`: the official class built
from config.json, the same weights loaded by name; its remote code does not load under
transformers 5 otherwise). Forward: the same left-padded batch through each model in float32
(LLaDA2 under its block mask, 32-token blocks), taking turns, median of the repeats. Loading: each
in a fresh process, peak resident memory growth during a bfloat16 load (native: `load`; official:
building its class and loading the state dict, which is what `from_pretrained` would do with it)
and a pass over every weight. One CPU thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.loading import load, load_tokenizer
from lm_eval_dllm.testing import build_tiny_checkpoint

from .native import peak_mb, rss_mb

OUT = Path(__file__).resolve().parent.parent / "results" / "native_moe.md"
SIZE = {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "dtype": torch.bfloat16}
FAMILIES = ("llada_moe", "llada2")
BLOCK = 32


def measure_load(ckpt: str, which: str, family: str) -> dict:
    """In a fresh process: peak memory growth and wall time of one bf16 load."""
    from tests.moe_oracle import official_model  # test helper: the official code's loader

    torch.set_num_threads(1)
    load_tokenizer(ckpt)
    base = rss_mb()
    t0 = time.perf_counter()
    if which == "native":
        model = load(ckpt, dtype="bfloat16", device="cpu")[0]
    else:
        model = official_model(family, Path(ckpt), Path(ckpt).parent / "work", torch.bfloat16)
    wall = time.perf_counter() - t0
    for p in model.parameters():
        p.sum()
    return {"peak_growth_mb": peak_mb() - base, "load_s": wall, "class": type(model).__name__,
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def time_forward(ckpt: Path, family: str, repeats: int) -> tuple[float, float]:
    from tests.moe_oracle import official_model

    torch.set_num_threads(1)
    native, _, spec = load(str(ckpt), dtype="float32", device="cpu")
    official = official_model(family, ckpt, ckpt.parent / "work")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (4, 128), generator=g)  # (B, T)
    attn = torch.ones_like(ids)
    for i in range(1, 4):
        attn[i, :10 * i] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    blk = BLOCK if spec.block_causal else 0
    mask = attn
    if blk:
        mask = ((pos // blk)[:, None, None, :] <= (pos // blk)[:, None, :, None]) & attn.bool()[:, None, None, :]
    run = {"native": lambda: native(ids, attn, pos, block=blk),
           "official": lambda: official(input_ids=ids, attention_mask=mask, position_ids=pos)}
    secs = {k: [] for k in run}
    with torch.no_grad():
        for k in run:
            run[k]()  # warm-up
        for rep in range(repeats):
            for k in tuple(run)[::1 if rep % 2 else -1]:  # alternate who goes first
                t0 = time.perf_counter()
                run[k]()
                secs[k].append(time.perf_counter() - t0)
    return statistics.median(secs["native"]), statistics.median(secs["official"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per model")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    p.add_argument("--measure-load", nargs=3, metavar=("CKPT", "WHICH", "FAMILY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure_load:  # the child process of one load measurement
        print(json.dumps(measure_load(*a.measure_load)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            ckpt = build_tiny_checkpoint(Path(tmp) / family, family, **SIZE)
            loads = {}
            for which in ("native", "official"):
                r = subprocess.run([sys.executable, "-m", "benchmarks.native_moe", "--measure-load",
                                    str(ckpt), which, family], capture_output=True, text=True, check=True)
                loads[which] = json.loads(r.stdout.strip().splitlines()[-1])
            n, o = time_forward(ckpt, family, a.repeats)
            ln, lo = loads["native"], loads["official"]
            rows.append([family, f"{1000 * n:.1f}", f"{1000 * o:.1f}", f"{n / o:.2f}", f"{ln['weights_mb']:.0f}",
                         f"{ln['peak_growth_mb']:.0f}", f"{lo['peak_growth_mb']:.0f}",
                         f"{ln['peak_growth_mb'] / lo['peak_growth_mb']:.2f}"])
    table = tabulate(rows, ["family", "native ms", "official ms", "native / official", "weights MiB",
                            "native load peak MiB", "official load peak MiB", "native / official"],
                     tablefmt="github")
    text = (f"`python -m benchmarks.native_moe`: vocabulary 157,184, d_model {SIZE['d_model']}, "
            f"{SIZE['n_layers']} layers, stored in bfloat16; torch {torch.__version__}, CPU, 1 thread.\n\n"
            f"Forward: B=4, T=128, left-padded, float32, median of {a.repeats}. Load: bfloat16, each in a "
            f"fresh process, peak RSS growth.\n\n{table}\n")
    print(text)
    if not a.no_write:
        from lm_eval_dllm.utils import atomic_write

        atomic_write(OUT, lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
