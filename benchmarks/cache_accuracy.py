"""Accuracy and NFE of cache=none / prefix / dual on the bundled model, measured in one run.

    python -m benchmarks.cache_accuracy --limit 500   # writes results/bundled/cache_accuracy.md
    python -m benchmarks.cache_accuracy               # all 1,000 test problems (about an hour on 2 busy cores)
    python -m benchmarks.cache_accuracy --limit 100 --no-write

The cache reuses keys/values of the block's first forward (lm_eval_dllm.cache), so within a block
the model sees stale keys/values of the positions it does not recompute; this measures what that
costs. Settings: threshold(tau=0.9) and the default learned policy (sampler=learned: the shipped
policy of the block, sampling) at block 8, 16 and full diffusion (48), each with every cache mode,
in bfloat16 as the results grid. Accuracy is the final answer (`#### N`, lm-eval's strict-match).
"""

from __future__ import annotations

import time
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.cache import CACHE_MODES
from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR
from lm_eval_dllm.utils import atomic_write

from . import decode_setting, label, load_docs, parser

BLOCKS = (8, 16, modchain.GEN_LENGTH)
SAMPLERS = [("threshold", {"tau": 0.9}), ("learned", {})]
OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "cache_accuracy.md"


def main(argv=None) -> None:
    p = parser(__doc__, OUT)
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16, as the results grid)")
    a = p.parse_args(argv)
    docs = load_docs("benchmarks.cache_accuracy", a.limit)
    model, tok, spec = load(str(BUNDLED_DIR), dtype=a.dtype, device="cpu")
    rows = []
    for name, params in SAMPLERS:
        for block in BLOCKS:
            base = None
            for cache in CACHE_MODES:
                t0 = time.perf_counter()
                texts, nfe = decode_setting(model, tok, spec, docs, name, params, block, a.batch_size, cache)
                ms = 1000 * (time.perf_counter() - t0) / len(docs)
                acc = 100 * modchain.final_answers_right(texts, docs) / len(docs)
                base = acc if base is None else base
                rows.append([label(name, params), block, cache, f"{acc:.1f}", f"{acc - base:+.1f}",
                             f"{nfe / len(docs):.2f}", f"{ms:.1f}"])
    table = tabulate(rows, ["sampler", "block", "cache", "accuracy %", "vs none (points)", "mean NFE",
                            "ms / sample"], tablefmt="github", disable_numparse=True)
    text = (f"`python -m benchmarks.cache_accuracy` on {len(docs)} modchain test problems, {a.dtype}, "
            f"batch {a.batch_size} (ms / sample: wall time on a shared CPU, indicative only):\n\n{table}\n")
    print(text)
    if not a.no_write:  # with --limit too: the header says how many problems (18 settings take long)
        atomic_write(OUT, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
