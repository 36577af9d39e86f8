"""Peak memory and time of a decode step with the output layer over the whole canvas vs only the
generated region (what the loop reads), measured in one run.

    python -m benchmarks.projection              # writes results/projection.md
    python -m benchmarks.projection --no-write

A tiny-width LLaDA of the real vocabulary (126,464: the output layer is 126k floats per position)
decodes L = 256 tokens after a 900-token prompt, block 32, cache=none, batch 1, top-32 per step
(8 steps). "whole canvas" projects every column and the loop cuts the generated ones out (what
the forward did before); "generated region" projects only those (decode.model_forward now). Each
runs in a fresh subprocess; peak memory is the resident-set high-water mark during the decode
minus the resident set before it (benchmarks.stats_memory's method), time is wall seconds per
step. Both give the same tokens (checked here, and by tests/test_projection.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.cache import FullForward
from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint
from lm_eval_dllm.utils import atomic_write

from .stats_memory import _kib

OUT = Path(__file__).resolve().parent.parent / "results" / "projection.md"
VARIANTS = ("whole canvas", "generated region")


def child(variant: str, a: argparse.Namespace, ckpt: str) -> None:
    """Decode once in this fresh process; print its peak bytes, seconds per step and tokens."""
    torch.set_num_threads(a.threads)
    model, _, spec = load(ckpt, dtype="float32", device="cpu")
    prompt = torch.randint(0, spec.mask_id - 1, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    projected = model_forward(model, spec)
    strategy = projected if variant == "generated region" else FullForward(lambda i, m: projected(i, m))
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    out = diffuse(strategy, [prompt], spec, make_sampler("confidence", {"k": a.block}), a.length, a.block,
                  early_exit=False)
    wall = time.perf_counter() - t0
    print(json.dumps({"peak": (_kib("VmHWM") - before) * 1024, "s_per_step": wall / int(out.nfe[0]),
                      "tokens": out.tokens[0].tolist()}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=900, help="prompt tokens")
    p.add_argument("--length", type=int, default=256, help="gen length L")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a.child[0], a, a.child[1])
    with tempfile.TemporaryDirectory() as tmp:
        ck = build_tiny_checkpoint(Path(tmp) / "llada", "llada", d_model=32, n_heads=4)
        runs = {}
        for v in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.projection", "--child", v, str(ck), "--prompt", str(a.prompt),
                   "--length", str(a.length), "--block", str(a.block), "--threads", str(a.threads)]
            r = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[v] = json.loads(r.stdout.strip().splitlines()[-1])
    old, new = (runs[v] for v in VARIANTS)
    assert old["tokens"] == new["tokens"], "the two variants decoded different tokens"
    rows = [[v, f"{runs[v]['peak'] / 2**20:,.0f}", f"{runs[v]['s_per_step']:.3f}"] for v in VARIANTS]
    table = tabulate(rows, ["output layer over", "peak MiB", "s / step"], tablefmt="github", disable_numparse=True)
    text = (f"`python -m benchmarks.projection`: tiny-width LLaDA, V = 126,464, prompt {a.prompt} tokens, "
            f"L = {a.length}, block {a.block}, cache=none, batch 1, {a.threads} thread(s), CPU shared with other "
            f"jobs. Same tokens. Peak memory whole / generated: {old['peak'] / max(new['peak'], 1):.1f}x; "
            f"time per step whole / generated: {old['s_per_step'] / new['s_per_step']:.2f}x.\n\n{table}\n")
    print(text)
    if not a.no_write:
        atomic_write(OUT, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
