"""float32 vs bfloat16 on the bundled model: accuracy and decode time, measured in one run.

    python -m benchmarks.dtype                   # 1,000 test problems, writes results/bundled/dtype.md
    python -m benchmarks.dtype --limit 200 --no-write

Why the results grid runs in bfloat16 by default: on a CPU with bf16 instructions it is faster,
and the accuracies stay close to float32's. Each setting decodes the same problems in both dtypes
back to back; the table gives both accuracies and the float32 / bfloat16 time ratio.
"""

from __future__ import annotations

import time
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.generate import Generator
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID

from . import finish, label, parser, load_docs

FULL = modchain.GEN_LENGTH  # block = L: full diffusion
SETTINGS = [("confidence", {"k": 1}, FULL), ("confidence", {"k": 4}, FULL), ("threshold", {"tau": 0.9}, 8),
            ("threshold", {"tau": 0.9}, FULL)]
OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "dtype.md"


def decode_all(model, tok, spec, docs, sampler, block, batch_size):
    """(exact-answer accuracy, mean NFE, seconds) of one setting."""
    t0 = time.perf_counter()
    gen = Generator(model, tok, spec, model_id=BUNDLED_ID, device="cpu")
    texts, nfe = modchain.decode(gen, docs, sampler, block, batch_size)
    right = sum(t == d["answer"] for t, d in zip(texts, docs))
    return right / len(docs), nfe / len(docs), time.perf_counter() - t0


def main(argv=None) -> None:

    a = parser(__doc__, OUT).parse_args(argv)
    docs = load_docs("benchmarks.dtype", a.limit)
    models = {d: load(str(BUNDLED_DIR), dtype=d, device="cpu") for d in ("float32", "bfloat16")}
    rows = []
    for name, params, block in SETTINGS:
        r = {}
        for d, (model, tok, spec) in models.items():
            r[d] = decode_all(model, tok, spec, docs, make_sampler(name, params), block, a.batch_size)
        rows.append([f"{label(name, params)} B={block}", f"{100 * r['float32'][0]:.1f}", f"{100 * r['bfloat16'][0]:.1f}",
                     f"{r['float32'][1]:.2f}", f"{r['bfloat16'][1]:.2f}", f"{r['float32'][2] / r['bfloat16'][2]:.2f}"])
    table = tabulate(rows, ["setting", "acc % float32", "acc % bfloat16", "NFE float32", "NFE bfloat16",
                            "time float32 / bfloat16"], tablefmt="github")
    text = (f"`python -m benchmarks.dtype` on {len(docs)} modchain test problems (exact answer text), "
            f"batch {a.batch_size}:\n\n{table}\n")
    finish(text, OUT, a)


if __name__ == "__main__":
    main()
