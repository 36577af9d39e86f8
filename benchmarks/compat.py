"""What each difference from Fast-dLLM's loop costs on the bundled model, measured in one run.

    python -m benchmarks.compat               # all 1,000 test problems: writes results/bundled/compat.md
    python -m benchmarks.compat --limit 200 --no-write

compat=fast-dllm (lm_eval_dllm.compat) reproduces Fast-dLLM's loops exactly (tests/test_fast_dllm.py);
it differs from our default (compat=none) in four ways. Each row turns on one of them alone, then
all four (= compat=fast-dllm): accuracy (the final answer, lm-eval's strict-match) and mean NFE,
threshold(tau=0.9) at block 8 and full diffusion (48), with every cache mode, in float32 (so the
float64 row shows only what float64 confidences change).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.compat import COMPAT, Compat
from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR
from lm_eval_dllm.utils import atomic_write

from . import decode_setting, load_docs, parser

OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "compat.md"
VARIANTS = {
    "none (ours)": COMPAT["none"],
    "no early exit": Compat(early_exit=False),
    "mask token proposable": Compat(suppress_mask=False),
    "no-op forward": Compat(noop_forward=True),
    "float64 confidences": Compat(stats_dtype=torch.float64),
    "fast-dllm (all four)": COMPAT["fast-dllm"],
}


def main(argv=None) -> None:
    p = parser(__doc__, OUT)
    a = p.parse_args(argv)
    docs = load_docs("benchmarks.compat", a.limit)
    model, tok, spec = load(str(BUNDLED_DIR), dtype="float32", device="cpu")
    rows = []
    for block in (8, modchain.GEN_LENGTH):
        for cache in ("none", "prefix", "dual"):
            base = None
            for name, compat in VARIANTS.items():
                texts, nfe = decode_setting(model, tok, spec, docs, "threshold", {"tau": 0.9}, block,
                                            a.batch_size, cache, compat=compat)
                acc = 100 * modchain.final_answers_right(texts, docs) / len(docs)
                base = base or (acc, nfe)
                rows.append([block, cache, name, f"{acc:.1f}", f"{acc - base[0]:+.1f}",
                             f"{nfe / len(docs):.2f}", f"{nfe / base[1]:.2f}"])
    table = tabulate(rows, ["block", "cache", "compat", "accuracy %", "vs ours (points)", "mean NFE",
                            "NFE / ours"], tablefmt="github", disable_numparse=True)
    text = (f"`python -m benchmarks.compat` on {len(docs)} modchain test problems, float32, "
            f"threshold(tau=0.9), batch {a.batch_size}.\n\n{table}\n")
    print(text)
    if not a.no_write:  # with --limit too: the header says how many problems
        atomic_write(OUT, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
