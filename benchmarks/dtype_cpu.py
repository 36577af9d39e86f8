"""dtype=auto on CPUs with and without bf16 hardware: what it picks, and the time of each dtype.

    python -m benchmarks.dtype_cpu                 # 64 problems per run, writes results/bundled/dtype_cpu.md
    python -m benchmarks.dtype_cpu --limit 16 --no-write

Each run is the unmodified `python -m lm_eval` CLI on the bundled model, in a fresh process, one
torch thread: the quick start (`modchain`, sampler=threshold,tau=0.9, batch 64) and the
multiple-choice task (`modchain_mc`, mc_num=8, batch 64), each with dtype=auto, float32 and
bfloat16, on this CPU as it is and as an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2: torch's kernels, oneDNN and MKL capped at
AVX2, as a CPU without AVX-512 or AMX runs them). The table gives the dtype auto resolved to (the
results JSON's `config.dllm.dtype`), accuracy, and the run's wall and CPU seconds (CPU seconds are
the steadier measure on a shared machine). A second table profiles the ELBO forwards of the
multiple-choice task (torch.profiler, self CPU time per op) in both dtypes, to show where bf16's
time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from lm_eval_dllm.generate import Generator
from lm_eval_dllm.likelihood import elbo_loglikelihoods, split_pair
from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain, modchain_mc
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID

from . import finish, parser, run_lm_eval

OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "dtype_cpu.md"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CPUS = {"this CPU": {}, "AVX2 (emulated)": AVX2}
TASKS = {"modchain": ("sampler=threshold,tau=0.9,batch_size=64", "exact_match,flexible-extract"),
         "modchain_mc": ("mc_num=8,batch_size=64", "acc,none")}
DTYPES = ("auto", "float32", "bfloat16")
LIMIT = 64  # problems per run unless --limit says otherwise (then nothing is written)
PROFILE_QUESTIONS = 2  # of modchain_mc, mc_num 8: 4 x 9 rows each


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_run(task: str, dtype: str, env: dict, limit: int) -> tuple[dict, float, float]:
    """(results JSON, wall s, CPU s) of one `python -m lm_eval` run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = cpu_seconds(), time.perf_counter()
        res = run_lm_eval("benchmarks.dtype_cpu", task, f"{TASKS[task][0]},dtype={dtype}", limit, tmp, env)
        return res, time.perf_counter() - t0, cpu_seconds() - c0


def profile_child(dtype: str) -> None:
    """In a child process (the CPU's env already set): self CPU ms per op of the ELBO forwards."""
    torch.set_num_threads(1)
    model, tok, spec = load(str(BUNDLED_DIR), dtype=dtype, device="cpu")
    gen = Generator(model, tok, spec, model_id=BUNDLED_ID, device="cpu")
    lines = modchain_mc.data_path().read_text().splitlines()[:PROFILE_QUESTIONS]
    docs = [json.loads(x) for x in lines]
    items = [(*split_pair(lambda s: tok(s)["input_ids"], modchain.prompt(d["question"]), c), 1234)
             for d in docs for c in d["choices"]]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        elbo_loglikelihoods(gen.forward, items, spec, 8, 8, 64)
    ops = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    print(json.dumps(ops))


def profile_ops(env: dict) -> dict[str, dict[str, float]]:
    out = {}
    for dtype in ("float32", "bfloat16"):
        r = subprocess.run([sys.executable, "-m", "benchmarks.dtype_cpu", "--profile-child", dtype],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"benchmarks.dtype_cpu: error: profile failed ({dtype}):\n{r.stderr[-2000:]}")
        out[dtype] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def profile_table(ops: dict[str, dict[str, float]], top: int = 6) -> str:
    f32, b16 = ops["float32"], ops["bfloat16"]
    names = sorted(b16, key=lambda k: -b16[k])[:top]
    rows = [[f"`{k}`", f"{f32.get(k, 0):.0f}", f"{b16[k]:.0f}"] for k in names]
    rows.append(["all ops", f"{sum(f32.values()):.0f}", f"{sum(b16.values()):.0f}"])
    return tabulate(rows, ["op (top by bf16 self CPU)", "float32 ms", "bfloat16 ms"], tablefmt="github")


def main(argv=None) -> None:
    p = parser(__doc__, OUT)
    # the profiler's own process: main() starts it under the emulated CPU's environment
    p.add_argument("--profile-child", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.profile_child:
        return profile_child(a.profile_child)
    if a.limit is not None and a.limit < 1:
        raise SystemExit(f"benchmarks.dtype_cpu: error: --limit {a.limit}; valid: a positive number of problems")
    limit = a.limit or LIMIT
    rows = []
    for cpu, extra in CPUS.items():
        env = {"OMP_NUM_THREADS": "1"} | extra
        for task, (_, metric) in TASKS.items():
            for dtype in DTYPES:
                res, wall, cpu_s = timed_run(task, dtype, env, limit)
                n = res["n-samples"][task]["effective"]
                rows.append([cpu, task, dtype, res["config"]["dllm"]["dtype"], n,
                             f"{100 * res['results'][task][metric]:.1f}", f"{wall:.1f}", f"{cpu_s:.1f}"])
    table = tabulate(rows, ["CPU", "task", "dtype=", "ran in", "problems", "acc %", "wall s", "CPU s"],
                     tablefmt="github")
    prof = profile_table(profile_ops(os.environ | {"OMP_NUM_THREADS": "1"} | AVX2))
    text = (f"`python -m benchmarks.dtype_cpu`: the bundled model through `lm_eval --limit {limit}`, one "
            f"torch thread, batch 64 (whole runs: loading and lm-eval's own work included).\n\n{table}\n\n"
            f"Where bf16's time goes on the AVX2-only CPU: self CPU time per op of the ELBO forwards of "
            f"{PROFILE_QUESTIONS} `modchain_mc` questions (mc_num 8), torch.profiler.\n\n{prof}\n")
    finish(text, OUT, a)


if __name__ == "__main__":
    main()
