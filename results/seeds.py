"""Run-to-run noise of policy training: the same learned sweep for policies trained by one command
with different --seed, next to the heuristics they should beat.

    python -m results seeds --policies A,B,C --blocks 48   # writes <out>/<model>/seed_noise.md
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.policy import find_policy
from lm_eval_dllm.tiny import BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write
import policies

from .grid import SWEEPS, Grid, report_paths, run_grid
from .report import REF, best_within, block_name, load_rows


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
    one = dataclasses.replace(grid, blocks=[block], samplers=["learned"], only=None, policy=folder)
    name = _shipped_name(folder)
    if name not in policies.variants_for(grid.pretrained or BUNDLED_ID, block)[1:]:
        return one
    return dataclasses.replace(one, policy="", only=[("learned", p | {"policy": name}) for p in SWEEPS["learned"]])


def _shipped_name(folder: str) -> str | None:
    """The shipped policy a folder names, resolved as the sampler resolves `policy=` (a folder here
    first, then a shipped name); None for any other folder."""
    try:
        p = find_policy(folder, model_id="", block=0, gen_length=0).resolve()
    except DLLMError:  # no such folder: not a shipped policy (its run fails with this error later)
        return None
    return p.name if p.parent == policies.HERE and (p / "policy.json").exists() else None


def seed_table(rows: dict, heuristics: list | None = None) -> str:
    """Per block and setting: each policy's acc @ NFE, then the range (max - min) over policies.

    With heuristic rows, per block: which heuristic settings each policy's sweep matches on its own
    (at least as accurate at no more NFE), and each policy's best accuracy at no more NFE than the reference
    heuristic (Fast-dLLM's tau = 0.9) against the best heuristic there; the margin counts as larger
    than the run-to-run noise when every policy beats it and the mean margin exceeds the range of
    the policies' accuracies."""

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
