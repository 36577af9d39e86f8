"""Tables (Markdown via tabulate) and figures (PNG via matplotlib) from the runs on disk."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.utils import DLLMError

from .grid import Setting

log = logging.getLogger("results")
PRIMARY = ("exact_match,strict-match", "exact_match,none", "pass@1,none", "acc,none")
STATS = ("nfe,none", "tpf,none", "wall_s,none")
REF = ("threshold", (("tau", 0.9),))  # Fast-dLLM's default: the NFE budget the learned policy is judged at


@dataclass(frozen=True)
class Row:
    task: str
    sampler: str
    params: tuple
    block: int
    gen_length: int
    acc: float
    nfe: float
    tpf: float
    wall: float
    n: int
    run_seconds: float = 0.0  # the whole lm-eval run (loading, scoring included), as the run file records
    stderr: float = 0.0  # lm-eval's standard error of acc (over the problems; 0 when it reports none)

    @property
    def label(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.sampler}({p})" if p else self.sampler

    @property
    def full(self) -> bool:
        return self.block >= self.gen_length


def primary_metric(row: dict) -> str:
    for k in PRIMARY:
        if k in row:
            return k
    nums = [k for k, v in row.items() if "," in k and "_stderr" not in k and k not in STATS
            and isinstance(v, (int, float))]
    if not nums:
        raise ValueError(f"no accuracy metric in {sorted(row)}")
    return nums[0]


def load_rows(paths: list[Path]) -> list[Row]:
    rows = []
    for p in paths:
        if not p.exists():
            continue
        try:
            rows.append(_row(json.loads(p.read_text())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DLLMError(f"run file {p} is corrupt ({type(e).__name__}: {str(e)[:80]}); valid: "
                            f"`python -m results run` re-runs it, or delete it") from None
    return rows


def _row(d: dict) -> Row:
    """A run file's row; ValueError naming the field whose value is missing, ill-typed or out of range."""
    s = d["dllm_setting"]
    r = d["results"][s["task"]]
    per = d["config"]["dllm"]["per_task"][s["task"]]
    gl = _number("gen_length", d["config"]["dllm"].get("gen_length") or _gen_length(d, s["task"]), 1, whole=True)
    metric = primary_metric(r)
    name, _, filt = metric.partition(",")
    se = r.get(f"{name}_stderr,{filt}")
    stat = {k: _number(k, r.get(k), 0) for k in STATS}
    return Row(task=s["task"], sampler=s["sampler"], params=tuple(sorted(s["params"].items())),
               block=min(_number("block", s["block"], 1, whole=True), gl), gen_length=gl,
               acc=_number(f"accuracy {metric}", r[metric], 0, 1), nfe=stat["nfe,none"],
               tpf=stat["tpf,none"], wall=stat["wall_s,none"], n=_number("n", per["n"], 0, whole=True),
               run_seconds=_number("run_seconds", s.get("run_seconds", 0.0), 0),
               stderr=float(se) if isinstance(se, (int, float)) and math.isfinite(se) else 0.0)


def _number(what: str, value, lo: float, hi: float = math.inf, whole: bool = False):
    """value as a number in [lo, hi] (an int if whole); ValueError naming it otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok or not math.isfinite(value) or whole and value != int(value):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{what} is {value!r}; valid: {kind} in [{lo}, {hi}]")
    return int(value) if whole else float(value)


def _gen_length(d: dict, task: str) -> int:
    gk = d.get("configs", {}).get(task, {}).get("generation_kwargs", {})
    return int(gk.get("max_gen_toks") or 256)


def pareto(rows: list[Row]) -> list[Row]:
    """Settings no other setting beats on both accuracy (higher) and NFE (lower)."""
    out = [r for r in rows if not any(
        (o.acc >= r.acc and o.nfe <= r.nfe) and (o.acc > r.acc or o.nfe < r.nfe) for o in rows)]
    return sorted(out, key=lambda r: (r.nfe, -r.acc, r.label))  # ties: by name, whatever the input order


def best_per_sampler(rows: list[Row]) -> list[Row]:
    best: dict[str, Row] = {}
    for r in rows:
        b = best.get(r.sampler)
        if b is None or (r.acc, -r.nfe) > (b.acc, -b.nfe):
            best[r.sampler] = r
    return sorted(best.values(), key=lambda r: (-r.acc, r.nfe, r.label))


def _fmt(rows: list[Row], with_block: bool = False) -> str:
    head = (["block"] if with_block else []) + ["sampler", "accuracy %", "mean NFE", "tokens/forward", "ms/sample"]
    body = [([r.block] if with_block else []) + [r.label, f"{100 * r.acc:.1f}", f"{r.nfe:.2f}",
                                                 f"{r.tpf:.2f}", f"{1000 * r.wall:.1f}"] for r in rows]
    return tabulate(body, head, tablefmt="github")


def block_name(block: int, gl: int) -> str:
    return f"full diffusion (B = L = {gl})" if block >= gl else f"B = {block}"


def tables(rows: list[Row], testbed: list[tuple[str, dict]] | None = None, maps: dict | None = None) -> str:
    """The report's Markdown; `maps`: block -> (policy name, its card's alpha_map), for the alpha-map target."""
    # one order whatever order the runs were read in (the grid's, or the files'): every sort below
    # is stable, so exact ties keep this order, and sums add up in it
    rows = sorted(rows, key=lambda r: (r.task, r.block, r.sampler, r.label))
    parts = []
    for task in sorted({r.task for r in rows}):
        tr = [r for r in rows if r.task == task]
        n = max(r.n for r in tr)
        parts.append(f"### Task `{task}` ({n} problems)\n")
        parts.append(f"{len(tr)} lm-eval runs, {sum(r.run_seconds for r in tr) / 60:.1f} minutes of run time "
                     f"in all (the sum of the `run_seconds` their run files record).\n")
        if testbed:
            want = [(s, tuple(sorted(p.items()))) for s, p in testbed]
            blocks = sorted({r.block for r in tr})
            pick = [min(blocks), max(blocks)] if len(blocks) > 1 else blocks
            tb = []
            for s, p in want:
                line = [Setting(s, p, 0).label]
                for b in pick:
                    m = [r for r in tr if r.sampler == s and r.params == p and r.block == b]
                    line += [f"{100 * m[0].acc:.1f}", f"{m[0].nfe:.2f}"] if m else ["–", "–"]
                tb.append(line)
            gl = tr[0].gen_length
            head = ["sampler"] + [h for b in pick for h in (f"acc % ({block_name(b, gl)})", "NFE")]
            parts.append("Sampler choice on the testbed (accuracy = gsm8k strict-match exact match):\n")
            parts.append(tabulate(tb, head, tablefmt="github") + "\n")
        by_block = defaultdict(list)
        for r in tr:
            by_block[r.block].append(r)
        semi = [b for b in sorted(by_block) if b < tr[0].gen_length]
        full = [b for b in sorted(by_block) if b >= tr[0].gen_length]
        if semi:
            parts.append("Semi-autoregressive blocks — each sampler at its best setting:\n")
            parts.append(_fmt([r for b in semi for r in best_per_sampler(by_block[b])], with_block=True) + "\n")
        if full:
            parts.append("Full diffusion — each sampler at its best setting:\n")
            parts.append(_fmt(best_per_sampler(by_block[full[0]])) + "\n")
        if any(r.sampler == "learned" for r in tr):
            parts.append(learned_vs_heuristics(tr) + "\n")
            parts.append(targets(tr, maps or {}) + "\n")
        parts.append("Pareto-optimal settings (no other setting is both more accurate and cheaper):\n")
        parts.append(_fmt([r for b in sorted(by_block) for r in pareto(by_block[b])], with_block=True) + "\n")
        parts.append("<details><summary>All settings</summary>\n\n"
                     + _fmt(sorted(tr, key=lambda r: (r.block, r.sampler, r.nfe, -r.acc)), with_block=True)
                     + "\n\n</details>\n")
    return "\n".join(parts)


def _best(rows: list[Row]) -> Row:
    """Most accurate, then cheapest, then first by name: the same pick whatever order runs are read in."""
    return min(rows, key=lambda r: (-r.acc, r.nfe, r.label))


def best_within(rows: list[Row], nfe: float) -> Row | None:
    """The `_best` of the rows that spend no more than `nfe` forwards; None if none does."""
    cheap = [r for r in rows if r.nfe <= nfe]
    return _best(cheap) if cheap else None


def _noise(a: Row, b: Row) -> str:
    """Is |a - b| larger than twice its standard error (the two lm-eval stderrs, as if independent)?"""
    se = 100 * (a.stderr ** 2 + b.stderr ** 2) ** 0.5
    diff = 100 * (a.acc - b.acc)
    if abs(diff) <= 2 * se or diff == 0:
        return f"2 standard errors = {2 * se:.1f}: within noise"
    return f"2 standard errors = {2 * se:.1f}: learned {'better' if diff > 0 else 'worse'}, beyond noise"


def learned_vs_heuristics(rows: list[Row], ref: tuple = REF) -> str:
    """Per block size: does some learned setting reach each heuristic setting's accuracy at no more NFE?

    And at the NFE of Fast-dLLM's threshold tau=0.9: the best accuracy of any heuristic setting vs
    of any learned setting that spends no more NFE.
    """
    out = ["Learned policy vs every heuristic setting (a heuristic setting is *matched* when some "
           "learned setting is at least as accurate with no more NFE; *within 1 point* when some learned "
           "setting with no more NFE is at most 1 point less accurate):\n"]
    table, summary = [], []
    for b in sorted({r.block for r in rows}):
        br = [r for r in rows if r.block == b]
        learned = [r for r in br if r.sampler == "learned"]
        if not learned:
            continue
        heur = [r for r in br if r.sampler != "learned"]
        matched = close = 0
        for h in sorted(heur, key=lambda r: (r.sampler, r.nfe)):
            top = best_within(learned, h.nfe)  # the most accurate learned setting at no more NFE
            w = top if top is not None and top.acc >= h.acc else None
            near = top is not None and 100 * (h.acc - top.acc) <= 1 + 1e-9  # float-safe "at most 1 point"
            matched += w is not None
            close += near
            table.append([block_name(b, h.gen_length), h.label, f"{100 * h.acc:.1f}", f"{h.nfe:.2f}",
                          f"{w.label}: {100 * w.acc:.1f} @ {w.nfe:.2f}" if w else "no",
                          "yes" if near else "no"])
        line = (f"- {block_name(b, br[0].gen_length)}: {matched} of {len(heur)} heuristic settings matched, "
                f"{close} of {len(heur)} within 1 point")
        r9 = [r for r in heur if (r.sampler, r.params) == ref]
        if r9:
            budget = r9[0].nfe
            bh, bl = best_within(heur, budget), best_within(learned, budget)
            line += (f"; at the NFE of {Setting(*ref, 0).label} ({budget:.2f}): best heuristic "
                     f"{bh.label} {100 * bh.acc:.1f} %, best learned "
                     + (f"{bl.label} {100 * bl.acc:.1f} % ({100 * (bl.acc - bh.acc):+.1f} points; "
                        f"{_noise(bl, bh)})" if bl else "none"))
        summary.append(line)
    out.append(tabulate(table, ["block", "heuristic", "acc %", "NFE", "matched by learned (acc % @ NFE)",
                                "within 1 point"], tablefmt="github"))
    return "\n".join(out) + "\n\n" + "\n".join(summary) + "\n"


FULL_TARGET = (99.5, 4.0)  # issue 23: at full diffusion, this accuracy (%) at no more than this NFE


def map_check(rows: list[Row], amap: dict) -> tuple[list[tuple[Row, Row | None]], list[Row]]:
    """The alpha map on these runs (one block): (heuristic row, the learned row at its mapped alpha,
    None when that run is missing) for the heuristic settings that run does not match, and the
    heuristic rows the map covers."""
    heur = sorted((r for r in rows if r.sampler != "learned" and r.label in amap), key=lambda r: (r.nfe, r.label))
    at = {dict(r.params)["alpha"]: r for r in rows if r.sampler == "learned" and set(dict(r.params)) == {"alpha"}}
    missed = []
    for h in heur:
        w = at.get(amap[h.label]["alpha"])
        if w is None or not (w.acc >= h.acc and w.nfe <= h.nfe):
            missed.append((h, w))
    return missed, heur


def targets(rows: list[Row], maps: dict | None = None) -> str:
    """The shipped policies against the heuristics, each target met or missed with its number:
    at full diffusion >= 99.5 % at <= 4.0 NFE, and every heuristic setting matched (at least as
    accurate at no more NFE by some learned setting: the policies' sweeps and their card defaults);
    in semi-autoregressive blocks each policy as typed (`policy=X` alone, its card's defaults) at
    least as accurate as the best heuristic setting at no more NFE."""
    out = ["Targets for the shipped policies (each met or missed, with its number):\n"]
    for b in sorted({r.block for r in rows}):
        br = [r for r in rows if r.block == b]
        learned = [r for r in br if r.sampler == "learned"]
        heur = [r for r in br if r.sampler != "learned"]
        if not learned or not heur:
            continue
        name = block_name(b, br[0].gen_length)
        missed = [h for h in sorted(heur, key=lambda r: (r.sampler, r.nfe, r.label))
                  if not ((w := best_within(learned, h.nfe)) and w.acc >= h.acc)]
        line = (f"- {name}: every heuristic setting matched by a learned one: "
                + ("met" if not missed else f"missed for {len(missed)} of {len(heur)} ("
                   + ", ".join(f"{h.label} {100 * h.acc:.1f} % @ {h.nfe:.2f}" for h in missed[:4])
                   + (", ..." if len(missed) > 4 else "") + ")"))
        if b >= br[0].gen_length:
            acc, nfe = FULL_TARGET
            top = best_within(learned, nfe)
            got = (f"{top.label} {100 * top.acc:.1f} ± {100 * top.stderr:.1f} % (1 SE) @ {top.nfe:.2f}" if top
                   else "no learned setting")
            ok = top is not None and 100 * top.acc >= acc - 1e-9
            line += (f"; >= {acc} % at <= {nfe} NFE: " + ("met" if ok else
                     f"missed by {acc - 100 * top.acc:.1f} points" if top else "missed") + f" (best: {got})")
        for t in sorted((r for r in learned if not _swept(r)), key=lambda r: r.label):
            h = best_within(heur, t.nfe)
            verdict = ("no heuristic setting spends so few NFE" if h is None else
                       f"best heuristic at no more NFE {h.label} {100 * h.acc:.1f} % @ {h.nfe:.2f}: "
                       + ("met" if t.acc >= h.acc else f"missed by {100 * (h.acc - t.acc):.1f} points"))
            line += f"\n  - as typed, {t.label}: {100 * t.acc:.1f} % @ {t.nfe:.2f}; {verdict}"
        if b in (maps or {}):
            pol, amap = maps[b]
            missed, covered = map_check(br, amap)
            line += (f"\n  - the alpha map of `{pol}` (one alpha per heuristic setting, chosen on validation, on "
                     f"its card): {len(covered) - len(missed)} of {len(covered)} matched on this split"
                     + ("" if not missed else "; missed: " + ", ".join(
                         f"{h.label} {100 * h.acc:.1f} % @ {h.nfe:.2f} by alpha {amap[h.label]['alpha']:g}"
                         + (f" {100 * w.acc:.1f} % @ {w.nfe:.2f}" if w else " (not run)") for h, w in missed)))
        out.append(line)
    return "\n".join(out) + "\n"


def _series(r: Row) -> str:
    """One line per sampler in the figures; a learned policy other than the default gets its own."""
    pol = dict(r.params).get("policy")
    return f"{r.sampler} ({pol})" if pol else r.sampler


def _swept(r: Row) -> bool:
    """A learned row of a sweep, not a policy run with nothing but its name (its card's defaults)."""
    return bool({"mode", "temperature", "policy_temperature", "cutoff", "alpha"} & set(dict(r.params)))


def log_nfe_axis(ax) -> None:
    """Log-scale x (the fast settings cluster at a few NFE, the one-per-step ones at L), labelled
    with plain numbers: round ones, or three inside a range too narrow for two round ones."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter  # optional: the [dev] extra

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    if len(ticks) < 2:
        ticks = [round(lo + (hi - lo) * f, 2) for f in (0.15, 0.5, 0.85)]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def figures(rows: list[Row], out_dir: Path, nfe_budget: float | None = None) -> list[Path]:
    """Per task: accuracy vs NFE (one panel per block: each heuristic's sweep, each learned policy's
    cutoff sweep as a thin line and the learned front over all policies as a bold one) and the
    best accuracy within an NFE budget vs block size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r.task for r in rows}):
        tr = [r for r in rows if r.task == task]
        blocks = sorted({r.block for r in tr})
        samplers = sorted({r.sampler for r in tr}, key=lambda s: (s == "learned", s))
        colors = {s: "black" if s == "learned" else plt.cm.tab10(i % 10) for i, s in enumerate(samplers)}
        fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks) + 2.4, 3.8), sharey=True, squeeze=False)
        for ax, b in zip(axes[0], blocks):
            for s in samplers:
                here = [r for r in tr if r.block == b and r.sampler == s]
                if not here:
                    continue
                if s != "learned":
                    ax.plot(*zip(*sorted((r.nfe, 100 * r.acc) for r in here)), "o-", color=colors[s], label=s, ms=4)
                    continue
                for pol in sorted({_series(r) for r in here}):
                    pts = sorted((r.nfe, 100 * r.acc) for r in here if _series(r) == pol and _swept(r))
                    if pts:
                        alpha_sweep = any("alpha" in dict(r.params) for r in here if _series(r) == pol)
                        ax.plot(*zip(*pts), ".-", color=colors[s], alpha=0.3, lw=0.8, ms=3,
                                label="learned: one policy's " + ("alpha" if alpha_sweep else "cutoff") + " sweep")
                typed = [r for r in here if not _swept(r)]
                if typed:  # each policy as `sampler=learned,policy=X` runs it: its card's defaults
                    ax.plot([r.nfe for r in typed], [100 * r.acc for r in typed], "*", color=colors[s], ms=8,
                            alpha=0.6, label="learned: policy=X alone (card defaults)")
                several = len({_series(r) for r in here}) > 1
                ax.plot(*zip(*[(r.nfe, 100 * r.acc) for r in pareto(here)]), "o-", color=colors[s], lw=2,
                        ms=4, label="learned: best over the policies" if several else "learned: the policy's front")
            ax.set_title(block_name(b, tr[0].gen_length))
            log_nfe_axis(ax)
            ax.set_xlabel("mean NFE (forward passes, log scale)")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel("accuracy %")
        handles = {l: h for ax in axes[0] for h, l in zip(*ax.get_legend_handles_labels())}
        axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{task}: accuracy vs NFE per sampler")
        fig.tight_layout()
        p = out_dir / f"{task}_acc_vs_nfe.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

        budget = nfe_budget or tr[0].gen_length / 4
        # right panel: per block, the NFE that Fast-dLLM's tau = 0.9 spends there (where the learned
        # policy is judged), when that run is in the grid
        ref_nfe = {r.block: r.nfe for r in tr if (r.sampler, r.params) == REF}
        panels = [(f"NFE <= {budget:g} (fixed)", dict.fromkeys(blocks, budget))]
        if ref_nfe:
            panels.append((f"NFE <= that of {Setting(*REF, 0).label} at each block", ref_nfe))
        fig, axs = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 3, 3.8), sharey=True, squeeze=False)
        for ax, (title, limit) in zip(axs[0], panels):
            for s in samplers:
                best = {b: best_within([r for r in tr if r.block == b and r.sampler == s], limit[b])
                        for b in blocks if b in limit}
                pts = [(b, 100 * r.acc) for b, r in best.items() if r is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=colors[s], ms=4, lw=2 if s == "learned" else 1.5,
                            label="learned (its best setting)" if s == "learned" else s)
            ax.set_xscale("log", base=2)
            ax.set_xticks(blocks, [str(b) for b in blocks])
            ax.set_xlabel("block size (rightmost = full diffusion)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        handles = {}
        for ax in axs[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        axs[0][0].set_ylabel("best accuracy % within the NFE budget")
        axs[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{task}: best accuracy vs block size within an NFE budget")
        fig.tight_layout()
        p = out_dir / f"{task}_acc_vs_block.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
