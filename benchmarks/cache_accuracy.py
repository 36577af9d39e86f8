"""Accuracy and NFE of cache=none / prefix / dual on the bundled model, measured in one run.

    python -m benchmarks.cache_accuracy               # all 1,000 test problems: writes results/bundled/cache_accuracy.md
    python -m benchmarks.cache_accuracy --limit 200 --no-write

The cache reuses keys/values of the block's first forward (lm_eval_dllm.cache), so within a block
the model sees stale keys/values of the positions it does not recompute; this measures what that
costs. Settings: threshold(tau=0.9) and the default learned policy (sampler=learned: the shipped
policy of the block, sampling) at block 8, 16 and full diffusion (48), each with every cache mode,
and two remedies for dual's stale suffix: refresh=2 (a full forward every second step) and
window = the block (the positions right after the block recomputed too); at full diffusion there
is no suffix, so those rows would repeat dual's. In bfloat16, as the results grid.
Accuracy is the final answer (`#### N`, lm-eval's strict-match). Cost is counted, not timed:
positions per forward is what each forward computed, averaged over all forwards (each block's
first is a full one); seconds per forward by cache mode are in results/kv_cache.md, measured on a
model large enough for the forward to dominate (on this 2 M-parameter model it does not).
"""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR
from lm_eval_dllm.utils import atomic_write

from . import decode_setting, label, load_docs, parser

BLOCKS = (8, 16, modchain.GEN_LENGTH)
SAMPLERS = [("threshold", {"tau": 0.9}), ("learned", {})]
OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "cache_accuracy.md"


def settings(block: int) -> list[tuple[str, int, int]]:
    """(cache, refresh, window) rows of a block: every mode, and dual's remedies if it has a suffix."""
    rows = [("none", 0, 0), ("prefix", 0, 0), ("dual", 0, 0)]
    return rows + ([("dual", 2, 0), ("dual", 0, block)] if block < modchain.GEN_LENGTH else [])


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
            for cache, refresh, window in settings(block):
                stats: list[dict] = []
                texts, nfe = decode_setting(model, tok, spec, docs, name, params, block, a.batch_size,
                                            cache, window, stats, refresh)
                acc = 100 * modchain.final_answers_right(texts, docs) / len(docs)
                base = acc if base is None else base
                positions = sum(s["positions"] for s in stats)
                mode = cache + (f", refresh={refresh}" if refresh else "") + (f", window={window}" if window else "")
                rows.append([label(name, params), block, mode,
                             f"{acc:.1f}", f"{acc - base:+.1f}", f"{nfe / len(docs):.2f}",
                             f"{positions / nfe:.1f}"])
    table = tabulate(rows, ["sampler", "block", "cache", "accuracy %", "vs none (points)", "mean NFE",
                            "positions / forward"], tablefmt="github", disable_numparse=True)
    text = (f"`python -m benchmarks.cache_accuracy` on {len(docs)} modchain test problems, {a.dtype}, "
            f"batch {a.batch_size}. positions / forward: canvas positions each forward computed (the "
            f"prompt's included), averaged over all forwards; time per forward by cache mode: "
            f"results/kv_cache.md.\n\n{table}\n")
    print(text)
    if not a.no_write:  # with --limit too: the header says how many problems
        atomic_write(OUT, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
