"""Old vs new: a refactor must not change what a user gets. Runs the same lm_eval commands in a
snapshot of an earlier commit and in this tree, and compares every sample's text and NFE.

    python -m benchmarks.same_outputs --base eaa9b51   # all 1,000 test problems -> results/bundled/same_outputs.md
    python -m benchmarks.same_outputs --base HEAD~3 --limit 100 --no-write

Settings: threshold(tau=0.9) and the shipped learned policy, at block 8 and full diffusion (48), in
the grid's dtype (bfloat16) on CPU, batch 64 (--batch-size), through the stock `lm_eval` CLI with
--log_samples (benchmarks.run_lm_eval). The snapshot is `git archive BASE` in a temporary folder,
imported first on PYTHONPATH so its code is what runs.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.utils import DLLMError

from . import finish, parser, run_lm_eval

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bundled" / "same_outputs.md"
SETTINGS = [("threshold", "tau=0.9", 8), ("threshold", "tau=0.9", 48), ("learned", "", 8), ("learned", "", 48)]


def run(tree: Path, sampler: str, params: str, block: int, limit: int | None, batch: int,
        out: Path) -> dict[int, tuple]:
    """doc_id -> (text, nfe) for one setting run by the lm_eval CLI with `tree`'s code."""
    args = ",".join(x for x in (f"sampler={sampler}", params, f"block={block}", "dtype=bfloat16",
                                f"batch_size={batch}") if x)
    run_lm_eval("benchmarks.same_outputs", "modchain", args, limit, str(out), {"PYTHONPATH": str(tree)},
                cwd=str(tree), log_samples=True)
    [samples] = out.rglob("samples_modchain_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {d["doc_id"]: (d["resps"][0][0], d["dllm"]["nfe"]) for d in rows}


def snapshot(rev: str, into: Path) -> str:
    """`git archive` of rev into a folder; returns its full hash."""
    full = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                          text=True)
    if full.returncode:
        raise DLLMError(f"--base {rev!r} is not a commit of this repository; valid: a hash, tag or HEAD~N")
    archive = subprocess.run(["git", "archive", full.stdout.strip()], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return full.stdout.strip()


def main(argv=None) -> None:
    p = parser(__doc__, OUT)
    p.add_argument("--base", required=True, help="the earlier commit to compare with")
    a = p.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    rows, same_all = [], True
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        old_tree.mkdir()
        base = snapshot(a.base, old_tree)
        for i, (sampler, params, block) in enumerate(SETTINGS):
            old = run(old_tree, sampler, params, block, a.limit, a.batch_size, Path(tmp) / f"old{i}")
            new = run(ROOT, sampler, params, block, a.limit, a.batch_size, Path(tmp) / f"new{i}")
            if old.keys() != new.keys():
                raise DLLMError(f"{sampler} B={block}: the two runs scored different documents")
            texts = sum(old[k][0] != new[k][0] for k in old)
            nfes = sum(old[k][1] != new[k][1] for k in old)
            same_all &= texts == nfes == 0
            label = f"{sampler}({params})" if params else f"{sampler} (shipped policy)"
            rows.append([label, block, len(old), texts, nfes, sum(v[1] for v in old.values()),
                         sum(v[1] for v in new.values())])
    table = tabulate(rows, ["setting", "block", "problems", "texts differing", "NFE differing", "total NFE old",
                            "total NFE new"], tablefmt="github")
    text = (f"`python -m benchmarks.same_outputs --base {a.base}`: base {base[:10]}, new {head[:10]}"
            f"{' plus uncommitted changes' if dirty else ''}; modchain test problems, bfloat16, batch {a.batch_size}, "
            f"through the lm_eval CLI.\n\n{table}\n\n"
            f"{'Every text and every NFE is identical.' if same_all else 'Outputs DIFFER (see the rows).'}\n")
    finish(text, OUT, a)  # the file holds all 1,000 problems: --limit only prints


if __name__ == "__main__":
    main()
