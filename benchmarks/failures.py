"""How samplers fail on the bundled task: wrong answers split by kind, measured in one run.

    python -m benchmarks.failures                # 1,000 test problems, writes results/bundled/failures.md
    python -m benchmarks.failures --limit 200 --no-write

A wrong answer either ends in the wrong place (its text has another length than the reference:
an EOS or a line committed at the wrong position) or has the reference's layout with a wrong digit
(a result computed from an input that was not final yet). In large blocks the paper's heuristics
lose most by the first kind; the table says which kind each sampler loses by here.
"""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from policies import variants_for

from . import decode_setting, finish, label, load_docs, parser

FULL = modchain.GEN_LENGTH
SETTINGS = [("threshold", {"tau": t}, b) for b in (8, FULL) for t in (0.5, 0.7, 0.9, 0.95, 0.99)] + [
    ("confidence", {"k": 4}, b) for b in (8, FULL)] + [("random", {"k": 1}, b) for b in (8, FULL)] + [
    ("learned", {"mode": "greedy", "cutoff": 0.5}, b) for b in (8, FULL)]  # every shipped policy of the block
OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "failures.md"


def kinds(texts: list[str], docs: list[dict]) -> tuple[int, int]:
    """(wrong answers that end in the wrong place, wrong answers with the reference's length)."""
    wrong = [(t, d["answer"]) for t, d in zip(texts, docs) if t != d["answer"]]
    ends = sum(len(t) != len(a) for t, a in wrong)
    return ends, len(wrong) - ends


def settings() -> list[tuple[str, dict, int]]:
    """SETTINGS with `learned` once per shipped policy of the block (named by `policy=`)."""

    return [(n, q, b) for n, p, b in SETTINGS for q in (
        [p | {"policy": Path(v).name} for v in variants_for(BUNDLED_ID, b)] if n == "learned" else [p])]


def main(argv=None) -> None:

    p = parser(__doc__, OUT)
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16, as the results grid)")
    a = p.parse_args(argv)
    docs = load_docs("benchmarks.failures", a.limit)
    model, tok, spec = load(str(BUNDLED_DIR), dtype=a.dtype, device="cpu")
    rows = []
    for name, params, block in settings():
        texts, nfe = decode_setting(model, tok, spec, docs, name, params, block, a.batch_size)
        ends, digits = kinds(texts, docs)
        rows.append([label(name, params), "full" if block >= FULL else block, f"{nfe / len(docs):.2f}", ends + digits, ends, digits])
    table = tabulate(rows, ["setting", "block", "mean NFE", "wrong answers", "end in the wrong place",
                            "right layout, wrong digit"], tablefmt="github", disable_numparse=True)
    text = (f"`python -m benchmarks.failures` on {len(docs)} modchain test problems ({a.dtype}). Wrong = the "
            f"generated text differs from the reference answer (stricter than lm-eval's strict-match, which "
            f"reads only the final `#### N`):\n\n{table}\n")
    finish(text, OUT, a)


if __name__ == "__main__":
    main()
