"""Regenerate the accuracy-vs-NFE tables and figures.

    python -m results                         # default grid on the bundled model, then report
    python -m results --preset testbed        # the README's testbed table only (fewer runs)
    python -m results --preset paper --pretrained GSAI-ML/LLaDA-8B-Instruct --policy P --dry-run   # plan, cost
    python -m results report                  # rebuild tables/figures from runs on disk
    python -m results seeds --policies A,B,C --blocks 48   # run-to-run noise of policy training
    python -m results seeds --policies A,B,C --policies D,E,F --blocks 48   # two commands, one file
    python -m results --pretrained GSAI-ML/LLaDA-8B-Instruct --tasks gsm8k --blocks 32,256 --limit 200
    accelerate launch --multi_gpu --num_processes 8 -m results --pretrained ...   # each run over 8 GPUs

Runs go through `lm_eval.simple_evaluate`, so every number is what the CLI would print. Raw results
are kept under results/runs/ keyed by their settings; finished runs are skipped (resume by rerunning).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

from lm_eval_dllm.utils import DLLMError, atomic_write

from .grid import DEFAULT_DTYPE, PRESETS, SWEEPS, TESTBED, Grid, main_process, run_grid
from .plan import plan
from .report import REF, figures, load_rows, tables

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "report", "seeds"])
    g = p.add_argument_group("grid")
    g.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="default: every sampler's sweep; testbed: the README's sampler table; paper: the "
                   "seed paper's grid (L 256, blocks 32 and 256, GSM8K, MATH-500, HumanEval, MBPP; results/grid.py)")
    g.add_argument("--pretrained", default=None, help="model (default: the bundled tiny dLLM)")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (default: the preset's)")
    g.add_argument("--blocks", default=None, help="comma-separated block sizes, >= L: full diffusion "
                   "(default: the preset's)")
    g.add_argument("--gen-length", type=int, default=None, help="generation length L (default: the preset's; "
                   "the default preset: each task's max_gen_toks)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and an upper bound of its device "
                   "hours from a short timing probe of the model; run nothing")
    g.add_argument("--samplers", default=",".join(SWEEPS), help="comma-separated samplers")
    g.add_argument("--policy", default="", help="policy folder for sampler `learned` (default: the shipped one)")
    g.add_argument("--policies", action="append", default=[], help="seeds: comma-separated policy folders "
                   "trained by the same command with different --seed (shipped names work too); give it once "
                   "per command, each a section of seed_noise.md; pass --blocks with their block")
    g.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"model dtype: auto, float32, bfloat16, float16 "
                   f"(default {DEFAULT_DTYPE})")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    o.add_argument("--nfe-budget", type=float, default=None, help="fixed NFE budget of the block-size "
                   "figure's left panel (default L/4; its right panel uses threshold tau=0.9's NFE per block)")
    o.add_argument("--no-readme", action="store_true", help="do not update README.md's results section")
    a = p.parse_args(argv)
    # the README shows the default grid only: another model, policy, dtype, seed, task or limit
    # writes its tables and figures but leaves the README alone
    a.default_setup = a.preset != "paper" and all(getattr(a, k) == p.get_default(k) for k in (
        "pretrained", "policy", "dtype", "seed", "tasks", "limit", "gen_length"))
    preset = PRESETS[a.preset]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    grid = Grid(tasks=a.tasks.split(",") if a.tasks else list(preset.tasks),
                blocks=_ints(a.blocks) if a.blocks else list(preset.blocks), samplers=a.samplers.split(","),
                pretrained=a.pretrained, limit=a.limit, batch_size=a.batch_size, seed=a.seed,
                out=a.out, only=TESTBED if a.preset == "testbed" else None,
                policy=a.policy, dtype=a.dtype, extra={"device": a.device},
                gen_length=a.gen_length or preset.gen_length, fewshot=dict(preset.fewshot),
                require_policy=preset.require_policy)
    try:
        _run(a, grid)
    except DLLMError as e:
        raise SystemExit(f"results: error: {e}") from None


def _run(a, grid: Grid) -> None:
    if a.command == "seeds":
        seeds(grid, *[[x for x in g.split(",") if x] for g in a.policies or [""]])
        return
    if a.command == "run" and a.dry_run:
        if main_process():
            print(plan(grid))
        return
    if a.command == "run":
        paths = run_grid(grid)
        if not main_process():  # under accelerate launch: the main process reports
            return
    else:
        paths = report_paths(grid)
    report(grid, paths, a.nfe_budget, update_readme=not a.no_readme and a.default_setup)


def seeds(grid: Grid, *groups: list[str]) -> str:
    """The learned sweep once per policy folder of each group (one training command, several
    --seed): the spread of accuracy and NFE between them is the run-to-run noise of policy training.
    Writes `<out>/<model>/seed_noise.md`, one section per group."""
    if not groups:
        raise DLLMError("no --policies given; valid: --policies A,B[,...] once per training command")
    # one policy named twice (a shipped name and its path under policies/) counts once
    groups = [_distinct(g) for g in groups]
    for folders in groups:
        if len(folders) < 2:
            raise DLLMError(f"--policies {','.join(folders)!r} names {len(folders)} distinct folder(s); valid: "
                            f"two or more policy folders, comma-separated")
    rows = [{f: load_rows([q for b in grid.blocks for q in run_grid(_sweep_of(grid, f, b))]) for f in folders}
            for folders in groups]
    # the heuristics to beat: the reference run (skipped when on disk) and every heuristic run on disk
    ref = [(REF[0], dict(REF[1]))]
    paths = run_grid(dataclasses.replace(grid, samplers=[REF[0]], only=ref, policy=""))
    paths += report_paths(dataclasses.replace(grid, policy=""))
    heur = [r for r in load_rows(sorted(set(paths)))
            if r.sampler != "learned" and r.block in {min(b, r.gen_length) for b in grid.blocks}]
    text = "\n".join(f"### Command of `{next(iter(r))}`\n\n" + seed_table(r, heur) for r in rows)
    out_dir = grid.out / grid.model_tag
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "seed_noise.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return text


def _distinct(folders: list[str]) -> list[str]:
    """The folders in order, each policy once (the first way it was named)."""
    seen: dict[str, str] = {}
    for f in folders:
        seen.setdefault(_shipped_name(f) or str(Path(f).resolve()), f)
    return list(seen.values())


def _sweep_of(grid: Grid, folder: str, block: int) -> Grid:
    """The learned sweep of one policy folder at one block. A policy shipped for this block, other
    than its default pick, is named by a `policy` parameter as in the default grid, so its runs get
    the same keys and are skipped when the default grid has them (a run's key holds the policy's
    fingerprint, not the --policy folder, so the default pick's keys match either way)."""
    from lm_eval_dllm.model import BUNDLED_ID
    from policies import variants_for

    one = dataclasses.replace(grid, blocks=[block], samplers=["learned"], only=None, policy=folder)
    name = _shipped_name(folder)
    if name not in variants_for(grid.pretrained or BUNDLED_ID, block)[1:]:
        return one
    return dataclasses.replace(one, policy="", only=[("learned", p | {"policy": name}) for p in SWEEPS["learned"]])


def _shipped_name(folder: str) -> str | None:
    """The shipped policy a folder names, resolved as the sampler resolves `policy=` (a folder here
    first, then a shipped name); None for any other folder."""
    from policies import HERE, resolve_policy

    try:
        p = resolve_policy(folder, model_id="", block=0, gen_length=0).resolve()
    except DLLMError:  # no such folder: not a shipped policy (its run fails with this error later)
        return None
    return p.name if p.parent == HERE and (p / "policy.json").exists() else None


def seed_table(rows: dict, heuristics: list | None = None) -> str:
    """Per block and setting: each policy's acc @ NFE, then the range (max - min) over policies.

    With heuristic rows, per block: which heuristic settings each policy's sweep matches on its own
    (at least as accurate at no more NFE), and each policy's best accuracy at no more NFE than the reference
    heuristic (Fast-dLLM's tau = 0.9) against the best heuristic there; the margin counts as larger
    than the run-to-run noise when every policy beats it and the mean margin exceeds the range of
    the policies' accuracies."""
    from tabulate import tabulate

    from .report import best_within, block_name

    # the column names the policy: a shipped one's `policy` parameter would split its rows from the others'
    rows = {n: [dataclasses.replace(r, params=tuple(kv for kv in r.params if kv[0] != "policy")) for r in rs]
            for n, rs in rows.items()}
    names = list(rows)
    keys = sorted({(r.task, r.block, r.label) for rs in rows.values() for r in rs})
    body, worst = [], 0.0
    for task, block, label in keys:
        got = [next((r for r in rows[n] if (r.task, r.block, r.label) == (task, block, label)), None) for n in names]
        have = [r for r in got if r is not None]
        spread = 100 * (max(r.acc for r in have) - min(r.acc for r in have))
        worst = max(worst, spread)
        body.append([task, block_name(block, have[0].gen_length), label]
                    + [f"{100 * r.acc:.1f} @ {r.nfe:.2f}" if r else "–" for r in got]
                    + [f"{spread:.1f}", f"{max(r.nfe for r in have) - min(r.nfe for r in have):.2f}"])
    head = ["task", "block", "setting"] + [f"policy {i + 1}" for i in range(len(names))] + [
        "acc range (points)", "NFE range"]
    legend = "\n".join(f"- policy {i + 1}: `{n}`" for i, n in enumerate(names))
    verdicts = []
    for task, block in sorted({(t, b) for t, b, _ in keys}):
        hs = sorted((r for r in heuristics or [] if (r.task, r.block) == (task, block)), key=lambda r: (r.nfe, r.label))
        if hs:  # which heuristic settings each policy's sweep matches on its own (acc at least, NFE at most)
            mine = [[r for r in rows[n] if (r.task, r.block) == (task, block)] for n in names]
            per = [[(t := best_within(m, h.nfe)) is not None and t.acc >= h.acc for m in mine] for h in hs]
            every = [h.label for h, got in zip(hs, per) if all(got)]
            some = [f"{h.label} (policy {', '.join(str(i + 1) for i, g in enumerate(got) if g)})"
                    for h, got in zip(hs, per) if any(got) and not all(got)]
            verdicts.append(
                f"- {block_name(block, hs[0].gen_length)}: heuristic settings matched by each policy's sweep "
                f"alone: {', '.join(str(sum(got[i] for got in per)) for i in range(len(names)))} of {len(hs)}; "
                f"by every policy: {', '.join(every) or 'none'}; by some but not all: {'; '.join(some) or 'none'}")
        ref = [r for r in hs if (r.sampler, r.params) == REF]
        if not ref:
            continue
        budget = ref[0].nfe
        bh = best_within(hs, budget)
        got = []
        for n in names:
            got.append(best_within([r for r in rows[n] if (r.task, r.block) == (task, block)], budget))
        if any(g is None for g in got):
            verdicts.append(f"- {block_name(block, bh.gen_length)}: some policy has no setting at the NFE of "
                            f"{ref[0].label} ({budget:.2f})")
            continue
        margins = [100 * (g.acc - bh.acc) for g in got]
        spread = 100 * (max(g.acc for g in got) - min(g.acc for g in got))
        mean = sum(margins) / len(margins)
        ok = min(margins) > 0 and mean > spread
        what = ("the margin is larger than the run-to-run noise" if ok else
                "every policy is less accurate than the best heuristic here" if max(margins) < 0 else
                "the margin is not larger than the run-to-run noise")
        verdicts.append(
            f"- {block_name(block, bh.gen_length)}, at the NFE of {ref[0].label} ({budget:.2f}): best heuristic "
            f"{bh.label} {100 * bh.acc:.1f} %; best learned per policy "
            + ", ".join(f"{100 * g.acc:.1f} % ({g.label} @ {g.nfe:.2f})" for g in got)
            + f"; margins {', '.join(f'{m:+.1f}' for m in margins)} points, mean {mean:+.1f}; run-to-run range "
            f"{spread:.1f} points: {what}")
    return (f"Run-to-run noise of policy training (`python -m results seeds`): the same learned sweep for "
            f"{len(names)} policies trained by one command with different seeds.\n\n{legend}\n\n"
            + tabulate(body, head, tablefmt="github", disable_numparse=True)
            + f"\n\nLargest accuracy range over the settings: {worst:.1f} points.\n"
            + ("\n" + "\n".join(verdicts) + "\n" if verdicts else ""))


def report_paths(grid: Grid) -> list[Path]:
    """The finished runs on disk for the grid's model and tasks, any sampler and block size.

    Learned runs of other policy weights (an older training, another --policy) are left out."""
    paths = sorted({q for t in grid.tasks for q in grid.run_dir(t).glob("*.json")})
    return [q for q in paths if grid.is_current(q)]


def render(grid: Grid, rows) -> tuple[str, list[Path]]:
    """The Markdown of the results section and the figure paths it links (nothing written)."""
    out_dir = grid.out / grid.model_tag
    figs = [out_dir / f"{t}_{kind}.png" for t in sorted({r.task for r in rows})
            for kind in ("acc_vs_nfe", "acc_vs_block")]
    links = "\n".join(f"![{f.stem}]({_rel(f)})" for f in figs)
    return tables(rows, testbed=TESTBED) + "\n" + links + "\n", figs


def _rel(f: Path) -> str:
    return str(f.relative_to(README.parent)) if f.is_relative_to(README.parent) else str(f)


def report(grid: Grid, paths: list[Path], nfe_budget: float | None, update_readme: bool) -> str:
    rows = load_rows(paths)
    if not rows:
        raise SystemExit("results: error: no finished runs to report; valid: run `python -m results` first")
    out_dir = grid.out / grid.model_tag
    out_dir.mkdir(parents=True, exist_ok=True)
    body, figs = render(grid, rows)
    written = figures(rows, out_dir, nfe_budget)
    assert [str(f) for f in written] == [str(f) for f in figs]
    atomic_write(out_dir / "tables.md", lambda tmp: Path(tmp).write_text(body))
    logging.getLogger("results").info("wrote %s and %d figures", out_dir / "tables.md", len(figs))
    if update_readme and README.exists():
        set_readme_section(body)
    return body


def readme_section() -> str | None:
    text = README.read_text()
    m = re.search(re.escape(START) + "\n(.*?)" + re.escape(END), text, flags=re.S)
    return m.group(1) if m else None


def set_readme_section(body: str) -> None:
    text = README.read_text()
    if START not in text:
        return
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{body}{END}", text, flags=re.S)
    atomic_write(README, lambda tmp: Path(tmp).write_text(new))


if __name__ == "__main__":
    main()
