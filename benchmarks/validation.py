"""Accuracy and NFE on the validation split: learned cutoffs next to the threshold rule, to compare
policies and to choose settings without looking at the test split.

    python -m benchmarks.validation --block 48 --policies modchain-B48-alpha3,runs/grpo/best
    python -m benchmarks.validation --block 16 --cutoffs 0.1,0.5,0.9 --taus 0.9
    python -m benchmarks.validation --split fresh --fresh-seed 4 --write results/bundled/fresh.md
    python -m benchmarks.validation --split fresh --block 8 --alpha-map modchain-B8 --write results/bundled/fresh_alpha_map_B8.md

Each policy runs at the setting its card recommends (`learned(policy=X)`, what `policy=X` alone
runs) and at each greedy cutoff. Accuracy is the final answer (`#### N`, what lm-eval's
strict-match reads) on the 500 validation problems of the bundled task, which `train.grpo`
validates on and the results grid never runs (`--split fresh`: problems from the same generator
that no split holds, `modchain.fresh`). It prints the table, and writes it only to `--write`.

`--alpha-map P` checks an alpha-conditioned policy's map (its card's `alpha_map`, chosen on the
validation split by `python -m results alpha-map`) instead: every heuristic setting the results
grid runs at the block, and P at each alpha the map names; a heuristic setting is matched when P at
its mapped alpha is at least as accurate with no more mean NFE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.loading import load
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write
from policies import variants_for
from results.grid import SWEEPS

from . import decode_setting, label, load_docs


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> None:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="validation problems (default: all 500)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block", type=int, default=modchain.GEN_LENGTH, help="block size (default: full diffusion)")
    p.add_argument("--policies", default="", help="comma-separated policy folders or shipped names "
                   "(default: the shipped ones of the block)")
    grid_cutoffs = ",".join(str(q["cutoff"]) for q in SWEEPS["learned"] if "cutoff" in q)
    p.add_argument("--cutoffs", default=grid_cutoffs, help=f"learned greedy cutoffs (default: the results "
                   f"grid's, {grid_cutoffs})")
    p.add_argument("--taus", default="0.7,0.9,0.95,0.99", help="threshold taus")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16, as the results grid)")
    p.add_argument("--split", default="validation", choices=("validation", "fresh", "test"),
                   help="test: the results grid's problems, for policies the grid no longer runs (retired ones)")
    p.add_argument("--fresh-seed", type=int, default=4, help="--split fresh: the generator's seed")
    p.add_argument("--fresh-n", type=int, default=1000, help="--split fresh: how many problems")
    p.add_argument("--write", default="", help="also write the table (Markdown) to this file")
    p.add_argument("--alpha-map", default="", help="an alpha-conditioned policy (folder or shipped name): "
                   "check its card's alpha map on these problems instead")
    a = p.parse_args(argv)
    if a.split == "fresh":
        try:
            docs = modchain.fresh(a.fresh_n, a.fresh_seed)[:a.limit]
        except ValueError as e:
            raise SystemExit(f"benchmarks.validation: error: --fresh-seed: {e}") from None
    else:
        docs = load_docs("benchmarks.validation", a.limit, split=a.split)
    try:
        mapped = alpha_map_of(a.alpha_map, a.block) if a.alpha_map else None  # refused before the model loads
        if mapped and a.split == "fresh":
            not_chosen_on(mapped[0], a.fresh_seed, "--fresh-seed")
        model, tok, spec = load(str(BUNDLED_DIR), dtype=a.dtype, device="cpu")

        def run(name: str, params: dict) -> tuple[float, float]:
            """(accuracy %, mean NFE) of one setting on the problems."""
            texts, nfe = decode_setting(model, tok, spec, docs, name, params, a.block, a.batch_size)
            return 100 * modchain.final_answers_right(texts, docs) / len(docs), nfe / len(docs)

        body = check_map(a.block, *mapped, run) if mapped else sweep(a, run)
    except DLLMError as e:
        raise SystemExit(f"benchmarks.validation: error: {e}") from None
    what = f"{a.split} problems" if a.split != "fresh" else f"fresh problems (seed {a.fresh_seed}, in no split)"
    text = (f"`python -m benchmarks.validation {' '.join(argv if argv is not None else sys.argv[1:])}` on "
            f"{len(docs)} modchain {what}, block {a.block} ({a.dtype}){body}")
    print(text)
    if a.write:
        atomic_write(Path(a.write), lambda tmp: Path(tmp).write_text(text))


def sweep(a, run) -> str:
    """The threshold taus, then each policy at its card's setting and at each greedy cutoff."""
    pols = [x for x in a.policies.split(",") if x] or variants_for(BUNDLED_ID, a.block)
    settings = [("threshold", {"tau": t}) for t in _floats(a.taus)] + [
        ("learned", {**p, "policy": q}) for q in pols  # the card's own setting first, then each cutoff
        for p in [{}] + [{"mode": "greedy", "cutoff": c} for c in _floats(a.cutoffs)]]
    rows = [[label(name, params), *(f"{acc:.1f}", f"{nfe:.2f}")] for name, params in settings
            for acc, nfe in [run(name, params)]]
    return ("; `learned(policy=X)` alone is the setting X's card recommends:\n\n"
            + tabulate(rows, ["setting", "accuracy %", "mean NFE"], tablefmt="github", disable_numparse=True) + "\n")


def alpha_map_of(policy: str, block: int) -> tuple[Path, dict]:
    """The folder of an alpha-conditioned policy and its card's alpha map (a one-line error without one)."""
    from lm_eval_dllm.policy import UnmaskPolicy, find_policy

    folder = find_policy(policy, model_id=BUNDLED_ID, block=block, gen_length=modchain.GEN_LENGTH)
    amap = (UnmaskPolicy.load(folder).card or {}).get("alpha_map")
    if not amap:
        raise DLLMError(f"policy {policy!r} has no alpha map on its card; valid: an alpha-conditioned policy "
                        f"after `python -m results alpha-map --policy {policy}`")
    return folder, amap


def map_fresh(folder: Path) -> dict | None:
    """The generated problems a map was chosen on besides the validation split (`alpha-map --fresh`):
    read from the card alone, without loading the weights."""
    from results.grid import policy_card

    return (policy_card(folder).get("recommended") or {}).get("fresh")


def not_chosen_on(folder: Path, seed: int, flag: str) -> None:
    """Refuse to check a map on the fresh problems it was chosen on."""
    f = map_fresh(folder)
    if f and f["seed"] == seed:
        raise DLLMError(f"{flag} {seed}: the map of {folder.name} was chosen on those problems (alpha-map --fresh "
                        f"{f['n']} --fresh-seed {seed}); valid: another seed")


def chosen_on(folder: Path) -> str:
    f = map_fresh(folder)
    return "the validation split" + (f" and {f['n']} fresh problems of seed {f['seed']}" if f else "")


def check_map(block: int, folder: Path, amap: dict, run) -> str:
    """The alpha map on the problems: per heuristic setting, its numbers, the mapped alpha's, and whether
    they match; then the count and the misses."""
    from results.alpha_map import heuristic_settings

    at = {al: run("learned", {"policy": str(folder), "alpha": str(al)})
          for al in sorted({m["alpha"] for m in amap.values()})}
    rows, missed = [], []
    for s in heuristic_settings(block):
        if s.label not in amap:
            continue
        acc, nfe = run(s.sampler, dict(s.params))
        al = amap[s.label]["alpha"]
        ok = at[al][0] >= acc and at[al][1] <= nfe
        rows.append([s.label, f"{acc:.1f}", f"{nfe:.2f}", f"{al:g}", f"{at[al][0]:.1f}", f"{at[al][1]:.2f}",
                     "yes" if ok else "no"])
        if not ok:
            missed.append(f"{s.label} {acc:.1f} % @ {nfe:.2f} (alpha {al:g}: {at[al][0]:.1f} % @ {at[al][1]:.2f})")
    return (f": the alpha map of `{folder.name}` (on its card, chosen on {chosen_on(folder)}):\n\n"
            + tabulate(rows, ["heuristic", "accuracy %", "mean NFE", "mapped alpha", "learned accuracy %",
                              "learned mean NFE", "matched"], tablefmt="github", disable_numparse=True)
            + f"\n\n{len(rows) - len(missed)} of {len(rows)} heuristic settings matched ("
            f"{100 * (len(rows) - len(missed)) / len(rows):.0f} %)" + (f"; missed: {'; '.join(missed)}" if missed else "")
            + ".\n")


if __name__ == "__main__":
    main()
