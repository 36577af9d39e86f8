"""The alpha maps' near-ties, measured on many new problems: is a miss a loss or a coin flip?

    python -m benchmarks.near_ties --block 16 --settings "threshold(tau=0.99)"
    python -m benchmarks.near_ties --block 8 --settings "threshold(tau=0.5),eb(gamma=1.0)" --n 10000

A map (`python -m results alpha-map`) names, for each heuristic setting, the alpha of the block's
shipped policy most likely to match it again; where the two decide almost alike, a test or fresh
sample of 1,000 problems can miss by one or two problems either way. This decodes each named
setting and its mapped alpha on --n fresh problems (`modchain.fresh`, seed --seed, a seed no split and
no earlier check used) and gives the paired differences, learned minus heuristic, with their
standard errors: both decode the same problems, so what both solve or both miss cancels.

A difference more than twice its standard error from zero is a real lead or a real loss at that
sample's noise; within it, whether a sample of 1,000 matches is close to a coin flip, and no map can
make it hold on every sample.

The map can only name alphas its sweep decoded (the card's `recommended.sweep`), and where the curve
is steep the one at no more NFE than the setting may sit well to its cheap side. So each row also
decodes the swept alphas next to the mapped one, toward the setting's NFE, until one crosses it (at
most WALK), and reads the policy's curve at the setting's NFE: of the two swept alphas on either
side, one on a share w of the problems and the other on the rest, w chosen so that the mean NFE is
the setting's (what a finer alpha dial could reach if the curve is straight between them), against
the heuristic, paired per problem as the rest. A lead there with a loss at the mapped alpha says the
map's grid, not the policy, lost; a loss there says the policy's curve lies below the setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from lm_eval_dllm.loading import load
from lm_eval_dllm.policy import UnmaskPolicy
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR
from lm_eval_dllm.utils import DLLMError, atomic_write
from results.alpha_map import Point, heuristic_settings, matches, paired, solved_by_one

from . import decode_setting, label
from .validation import alpha_map_of, not_chosen_on

PROG = "benchmarks.near_ties"
WALK = 3  # swept alphas decoded at most, from the mapped one toward the setting's NFE


def split_labels(text: str) -> list[str]:
    """Setting labels separated by commas outside parentheses: "eb(gamma=1.0),factor(f=2.0)"."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in out + [cur.strip()] if x]


def verdict(acc: tuple[float, float], nfe: tuple[float, float]) -> str:
    """What the paired differences (learned - heuristic) say at two standard errors."""
    def side(m: float, se: float, good: bool) -> str:
        return "within 2 SE" if abs(m) <= 2 * se else ("ahead" if good else "behind")
    return f"accuracy {side(*acc, acc[0] > 0)}, NFE {side(*nfe, nfe[0] < 0)}"


def rows(block: int, folder: Path, amap: dict, sweep: list[float], labels: list[str], run) -> list[list[str]]:
    """One row per setting: both points, the paired differences, the problems only one solved; then the
    policy's curve at the heuristic's NFE (`between`). `run(name, params)` decodes one setting: a Point."""
    out = []
    for lab in labels:
        name, params = heuristic_of(block, lab)
        h = run(name, params)
        al = amap[lab]["alpha"]
        p = run("learned", {"policy": str(folder), "alpha": str(al)})
        acc, nfe = paired(p.scores, h.scores), paired(p.nfes, h.nfes)
        walked, curve = [], None  # swept alphas from the mapped one toward the heuristic's NFE, until one crosses it
        step = -1 if p.nfe <= h.nfe else 1
        last, j = p, (sweep.index(al) + step if al in sweep else -1)
        while 0 <= j < len(sweep) and len(walked) < WALK and curve is None:
            q = run("learned", {"policy": str(folder), "alpha": str(sweep[j])})
            walked.append(f"{sweep[j]:g}: {100 * q.accuracy:.2f} % @ {q.nfe:.3f}")
            curve, last, j = between(last, q, h), q, j + step
        one = solved_by_one(p, h)
        out.append([lab, f"{100 * h.accuracy:.2f} % @ {h.nfe:.3f}", f"{al:g}",
                    f"{100 * p.accuracy:.2f} % @ {p.nfe:.3f}",
                    f"{100 * acc[0]:+.2f} ± {100 * acc[1]:.2f}", f"{nfe[0]:+.3f} ± {nfe[1]:.3f}",
                    f"{one['heuristic']} / {one['learned']}", "yes" if matches(p, h) else "no", verdict(acc, nfe),
                    "; ".join(walked) or "–",
                    "–" if curve is None else f"{100 * curve[0]:+.2f} ± {100 * curve[1]:.2f}"])
    return out


def between(p: Point, q: Point, h: Point) -> tuple[float, float] | None:
    """The policy's curve at the heuristic's mean NFE, against the heuristic: alpha p on a share w of the
    problems and its neighbour q on the rest, w set so that the mean NFE is the heuristic's (what a finer
    alpha dial could reach, if the curve is straight between the two). Per problem, w * p + (1 - w) * q
    minus h, so the difference is paired as the others; None if p and q lie on the same side of h's NFE."""
    if not min(p.nfe, q.nfe) <= h.nfe <= max(p.nfe, q.nfe) or p.nfe == q.nfe:
        return None
    w = (q.nfe - h.nfe) / (q.nfe - p.nfe)
    return paired([w * a + (1 - w) * b for a, b in zip(p.scores, q.scores)], h.scores)


def heuristic_of(block: int, lab: str) -> tuple[str, dict]:
    s = next(s for s in heuristic_settings(block) if s.label == lab)
    return s.sampler, dict(s.params)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, required=True, help="the block of the shipped policy modchain-B<block>-alphas")
    p.add_argument("--policy", default="",
                   help="an alpha-conditioned policy with a map (default: the block's shipped one)")
    p.add_argument("--settings", required=True, help="heuristic settings of its map, comma-separated, as the map "
                   "labels them: \"threshold(tau=0.5),eb(gamma=1.0)\"")
    p.add_argument("--n", type=int, default=10000, help="fresh problems (default 10000)")
    p.add_argument("--seed", type=int, default=6, help="the fresh problems' seed (default 6: no split's and not the "
                   "fresh checks' 4 and 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16, as the results grid)")
    p.add_argument("--write", default="", help="also write the table (Markdown) to this file")
    a = p.parse_args(argv)
    if a.n < 2:
        raise SystemExit(f"{PROG}: error: --n {a.n}; valid: 2 or more problems")
    labels = split_labels(a.settings)
    try:
        folder, amap = alpha_map_of(a.policy or f"modchain-B{a.block}-alphas", a.block)
        bad = [x for x in labels if x not in amap]
        if bad or not labels:
            raise DLLMError(f"--settings {bad[0] if bad else a.settings!r}: not in the map of {folder.name}; "
                            f"valid: {', '.join(amap)}")
        not_chosen_on(folder, a.seed, "--seed")
        try:
            docs = modchain.fresh(a.n, a.seed)
        except ValueError as e:
            raise DLLMError(f"--seed: {e}") from None
        model, tok, spec = load(str(BUNDLED_DIR), dtype=a.dtype, device="cpu")

        def run(name: str, params: dict) -> Point:
            """Per problem: solved (0 or 1) and NFE."""
            stats: list[dict] = []
            texts, _ = decode_setting(model, tok, spec, docs, name, params, a.block, a.batch_size, stats=stats)
            right = (float(modchain.final_answers_right([t], [d])) for t, d in zip(texts, docs))
            pt = Point(label(name, params), tuple(right), tuple(float(s["nfe"]) for s in stats))
            print(f"{name} {params.get('alpha', params)}: {100 * pt.accuracy:.2f} %", file=sys.stderr, flush=True)
            return pt

        sweep = sorted(x[0] for x in UnmaskPolicy.load(folder).card["recommended"]["sweep"])
        body = rows(a.block, folder, amap, sweep, labels, run)
    except DLLMError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    text = (f"`python -m {PROG} {' '.join(argv if argv is not None else sys.argv[1:])}` on {len(docs)} fresh modchain "
            f"problems (seed {a.seed}, in no split), block {a.block} ({a.dtype}): each setting against its alpha in "
            f"the map of `{folder.name}`; differences are learned minus heuristic over the same problems, ± one "
            "standard error; the last column reads the policy's curve at the heuristic's NFE, between the two swept "
            "alphas on either side of it (the module's docstring says how):\n\n"
            + tabulate(body, ["setting", "heuristic", "mapped alpha", "learned", "accuracy difference (points)",
                              "NFE difference", "solved by one only (heuristic / learned)", "matched here",
                              "at 2 SE", "swept alphas toward its NFE",
                              "the curve at the heuristic's NFE: accuracy difference"],
                       tablefmt="github", disable_numparse=True) + "\n")
    print(text)
    if a.write:
        atomic_write(Path(a.write), lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
