"""Time of the proposal statistics when a sampler reads the confidences alone, one run.

    python -m benchmarks.stats_time              # LLaDA's vocabulary, 8 rows x 32 positions; writes results/stats_time.md
    python -m benchmarks.stats_time --rows 2 --repeats 3 --no-write

Each decode step computes, over the whole vocabulary at every position of the span, the proposal x0
and its confidence, and the margin (top-1 minus top-2) and entropy when the sampler reads them
(`Sampler.statistics`; threshold, confidence, factor and random read neither). Random logits of
LLaDA's shape (V = 126,464, the mask token suppressed) go through `decode.propose` both ways, the
two timed alternately in one process, at temperature 0 (greedy, as the results grid) and 1; the table
gives the median of each and their ratio. x0 and conf are bitwise the same both ways
(tests/test_decode.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.decode import propose
from lm_eval_dllm.samplers.base import STATISTICS
from lm_eval_dllm.utils import atomic_write

from .stats_memory import LLADA_MASK, LLADA_VOCAB

OUT = Path(__file__).resolve().parent.parent / "results" / "stats_time.md"
PROG = "benchmarks.stats_time"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--positions", type=int, default=32, help="positions per row (a block's span; default 32)")
    p.add_argument("--repeats", type=int, default=7, help="timings of each, alternating (default 7)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    a = p.parse_args(argv)
    for name in ("rows", "positions", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"{PROG}: error: --{name} {getattr(a, name)}; valid: a positive number")
    g = torch.Generator().manual_seed(0)
    lg = torch.randn((a.rows, a.positions, LLADA_VOCAB), generator=g) * 4
    lg[..., LLADA_MASK] = float("-inf")
    body = []
    for temperature in (0.0, 1.0):
        def run(stats: frozenset[str]) -> None:
            propose(lg, temperature, [torch.Generator().manual_seed(i) for i in range(a.rows)], statistics=stats)

        run(STATISTICS)  # warm-up: first-touch allocations
        every, alone = [], []
        for _ in range(a.repeats):
            every.append(timed(lambda: run(STATISTICS)))
            alone.append(timed(lambda: run(frozenset())))
        m_every, m_alone = statistics.median(every), statistics.median(alone)
        body.append([f"{temperature:g}", f"{1000 * m_every:.0f}", f"{1000 * m_alone:.0f}", f"{m_every / m_alone:.2f}"])
    args = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"`python -m {PROG}{' ' + args if args else ''}` on cpu ({torch.get_num_threads()} "
            f"threads): random float32 logits of {a.rows} rows x {a.positions} positions x V = {LLADA_VOCAB:,}, "
            f"median of {a.repeats} timings each of `decode.propose`:\n\n"
            + tabulate(body, ["temperature", "ms, every statistic", "ms, confidences alone", "every / alone"],
                       tablefmt="github", disable_numparse=True) + "\n")
    print(text)
    if not a.no_write:
        atomic_write(OUT, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
