"""The transfer table: each policy at block sizes and a generation length it was not trained for,
next to the threshold rule at the same NFE.

    python -m results transfer                 # every shipped policy of the bundled model -> results/bundled/transfer.md
    python -m results transfer --policies modchain-B8,modchain-B48-alpha3 --limit 50 --out /tmp/t   # a quick look

Each policy runs as a user types it, `sampler=learned,policy=X` (its card's recommended mode,
temperature and cutoff, else the paper's defaults), on the task's test problems at every --blocks
size at the task's own L (48 on the bundled task; a block >= L is full diffusion), and at a longer L
(--gen-length, default 96: the same problems with room for twice the answer; the bundled model's
context of 128 holds the longest prompt, 22 tokens, plus 96) at the policy's own kind of block: its
block when it was trained semi-autoregressively, B = L when at full diffusion. Next to each: the
threshold rule (Fast-dLLM, tau in TAUS) at the same block and L, reported as its most accurate
setting that spends no more NFE than the policy did (a setting that was run, not an interpolation),
and the margin in points. Every run goes through the results grid (`run_grid`), so finished runs
are skipped (rerun the command to resume). L is always given explicitly, so these runs have run
folders of their own (`<task>-L48-...`) and never enter the default grid's tables.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tabulate import tabulate

import policies
from lm_eval_dllm.policy import UnmaskPolicy, find_policy
from lm_eval_dllm.tiny import BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write

from .grid import SWEEPS, Grid, run_grid
from .report import best_within, block_name, load_rows

LONG_L = 96
TAUS = sorted({0.8, 0.85, 0.97, *(p["tau"] for p in SWEEPS["threshold"])})  # the grid's, denser near the top


def cells(trained_block: int, trained_L: int, blocks: list[int], long_L: int) -> list[tuple[int, int]]:
    """(block, L) to evaluate a policy at: every block at the L it was trained for, then the long L
    with its kind of block: its own size if semi-autoregressive, B = L if trained at full diffusion."""
    own = [(min(b, trained_L), trained_L) for b in blocks]
    return own + [(long_L if trained_block >= trained_L else trained_block, long_L)]


def transfer(grid: Grid, names: list[str], long_L: int = LONG_L) -> str:
    """Runs what is missing, writes <out>/<model>/transfer.md, returns its text."""
    model = grid.pretrained or BUNDLED_ID
    cmd = "python -m results transfer" + (f" --policies {','.join(names)}" if names else "") + (
        f" --limit {grid.limit}" if grid.limit else "") + (
        f" --blocks {','.join(map(str, grid.blocks))}" if list(grid.blocks) != [8, 16, 48] else "") + (
        f" --gen-length {long_L}" if long_L != LONG_L else "")
    names = names or [e["path"] for e in policies.shipped_for(model)]
    if not names:
        raise DLLMError(f"no shipped policy for {model}; valid: --policies <folder>[,...]")
    body, thresholds = [], {}
    for name in names:
        folder = find_policy(name, model_id=model, block=0, gen_length=0)
        cfg = UnmaskPolicy.load(folder).cfg
        shipped = folder.resolve().parent == policies.HERE and (policies.HERE / folder.name / "policy.json").exists()
        for block, L in dict.fromkeys(cells(cfg.block, cfg.gen_length, grid.blocks, long_L)):
            g = dataclasses.replace(grid, blocks=[block], gen_length=L, samplers=["learned"], policy="" if shipped else name,
                                    only=[("learned", {"policy": folder.name} if shipped else {})])
            [path] = run_grid(g)
            [mine] = load_rows([path])
            if (block, L) not in thresholds:
                t = dataclasses.replace(g, samplers=["threshold"], policy="", only=[("threshold", {"tau": x}) for x in TAUS])
                thresholds[block, L] = load_rows(run_grid(t))
            heur = best_within(thresholds[block, L], mine.nfe)
            body.append([f"`{folder.name}`", block_name(cfg.block, cfg.gen_length).replace("full diffusion", "full"),
                         block_name(mine.block, mine.gen_length).replace("full diffusion", "full")
                         + ("" if mine.gen_length == cfg.gen_length else " (longer L)"),
                         _settings(path), f"{100 * mine.acc:.1f} @ {mine.nfe:.2f}",
                         f"tau={dict(heur.params)['tau']}: {100 * heur.acc:.1f} @ {heur.nfe:.2f}"
                         + (" (its costliest)" if heur.nfe == max(r.nfe for r in thresholds[block, L]) else "") if heur else
                         f"none (cheapest {min(thresholds[block, L], key=lambda r: r.nfe).nfe:.2f})",
                         f"{100 * (mine.acc - heur.acc):+.1f}" if heur else "–"])
    n = max(r.n for rs in thresholds.values() for r in rs)
    head = ["policy", "trained at", "evaluated at", "settings (from)", "learned acc % @ NFE",
            "best threshold at no more NFE", "margin (points)"]
    text = (f"# Transfer: policies at block sizes and a length they were not trained for\n\n"
            f"Generated by `{cmd}` (results/transfer.py) from its run files (under results/runs/); do not "
            f"edit by hand. {grid.tasks[0]} test problems: {n} per run, {grid.dtype}, seed {grid.seed}. "
            f"Each policy as `sampler=learned,policy=X` with nothing else: the settings column says which "
            f"mode, temperature and cutoff that gave and where each came from (card: the policy card's "
            f"`recommended`; default: the paper's; see lm_eval_dllm/samplers/learned.py). The threshold "
            f"rule ran at tau = {', '.join(f'{t:g}' for t in TAUS)} at the same block and L; its column is "
            f"its most accurate setting that spends no more NFE than the policy did (\"its costliest\": even "
            f"tau = {max(TAUS):g} spends less than the policy, so a higher tau might do better there), and the "
            f"margin is learned minus that, in points. \"longer L\": L = {long_L}, the same problems with room for "
            f"twice the longest answer.\n\n"
            + tabulate(body, head, tablefmt="github", disable_numparse=True) + "\n")
    out_dir = grid.out / grid.model_tag
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "transfer.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return text


def _settings(path: Path) -> str:
    """The mode, temperature and cutoff the run used, as its model info recorded them."""
    res = json.loads(path.read_text())["config"]["dllm"].get("sampler_resolved") or []
    if not res:
        return "?"
    s = res[0]
    src = s.get("source", {})
    t = (f"{s['mode']}, T={s['temperature']:g}" + (f", cutoff={s['cutoff']:g}" if s["mode"] == "greedy" else "")
         + (f", alpha={s['alpha']:g}" if s.get("alpha") is not None else ""))
    return t + f" ({'/'.join(sorted(set(src.values())))})"
