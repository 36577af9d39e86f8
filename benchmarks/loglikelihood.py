"""The bundled model on the bundled multiple-choice task, through the unmodified `lm_eval` CLI.

    python -m benchmarks.loglikelihood                 # 1,000 questions, writes results/bundled/loglikelihood.md
    python -m benchmarks.loglikelihood --limit 50 --no-write --mc-num 8

For each setting it runs `python -m lm_eval --model dllm --model_args mc_num=M,... --tasks
modchain_mc` offline and reads the results JSON that run writes: accuracy (chance 25 %), the
forwards each request cost (`ll_forwards`: mc_num draws, plus one all-masked row for is_greedy
when no draw masked the whole target) and seconds per request. Each question has four choices, so
a question costs four requests; each run uses one torch thread unless --threads says otherwise
(on a shared 2-core machine two threads per run were three times slower).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tabulate import tabulate

from . import finish, parser, run_lm_eval

OUT = Path(__file__).resolve().parent.parent / "results" / "bundled" / "loglikelihood.md"
TASK = "modchain_mc"


def main(argv=None) -> None:
    p = parser(__doc__, OUT)
    p.add_argument("--mc-num", type=int, nargs="+", default=[1, 8, 32], help="mc_num values, one run each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per lm_eval run (0: torch's default)")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise SystemExit(f"benchmarks.loglikelihood: error: --limit {a.limit}; valid: a positive number of questions")
    rows, n = [], None
    # torch's intra-op threads; on a busy machine more threads than free cores is slower
    threads = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    for mc in a.mc_num:
        with tempfile.TemporaryDirectory() as tmp:
            args = f"mc_num={mc},batch_size={a.batch_size},dtype=float32"
            res = run_lm_eval("benchmarks.loglikelihood", TASK, args, a.limit, tmp, threads)
        r = res["results"][TASK]
        n = res["n-samples"][TASK]["effective"]
        rows.append([mc, f"{100 * r['acc,none']:.1f} ± {100 * r['acc_stderr,none']:.1f}",
                     f"{100 * r['acc_norm,none']:.1f}", f"{r['ll_forwards,none']:.2f}",
                     f"{1000 * r['wall_s,none']:.1f}"])
    head = ["mc_num", "acc % (± stderr)", "acc_norm %", "forwards / request",
            "ms / request"]
    table = tabulate(rows, head, tablefmt="github")
    text = (f"`python -m benchmarks.loglikelihood`: the bundled model on `{TASK}` ({n} questions, four "
            f"choices each, chance 25 %), `lm_eval --model dllm --model_args mc_num=M,batch_size={a.batch_size} "
            f"--tasks {TASK}` on CPU, float32, {a.threads or 'default'} torch thread(s). The choices of a "
            f"question with the same number of tokens share their mask draws (the seed comes from the "
            f"context).\n\n{table}\n")
    finish(text, OUT, a)


if __name__ == "__main__":
    main()
