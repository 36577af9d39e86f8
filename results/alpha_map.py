"""Choose an alpha-conditioned policy's points on the accuracy-speed curve on the validation split;
write them into its card.

    python -m results alpha-map --policy modchain-B48           # a shipped name or a policy folder
    python -m results alpha-map                                 # every shipped alpha-conditioned policy

On the validation problems `train.grpo` validated the policy on (its card's command's --val-split,
--val-size and --seed; --limit takes fewer), and `--fresh N` more of the bundled task's generator
(`modchain.fresh`, seed `--fresh-seed`, 7 by default: a seed no split and no check uses), at the block
and L it was trained for:

- every heuristic setting the results grid runs at that block (`results.grid.SWEEPS`, as `python -m
  results` runs them with the default preset's blocks);
- the policy at each alpha of `results.grid.ALPHAS` inside its trained range, greedy at cutoff 0.5 (what training
  validated), then at the alphas `refine` adds where the curve jumps (its NFE changes by a factor JUMP or
  more between two grid alphas, as B = 16's once went from 4.9 to 22): bisections (in log alpha) of the
  gap where the policy's NFE crosses a heuristic setting's, down to a sixteenth of an octave, so that a
  setting inside the jump still finds a point at its NFE. With 4,000 problems or more (`--fresh`), also
  where the curve is smooth but its gap is wider in NFE than a new sample can tell apart (`refine`).
  The results grid sweeps the grid's alphas and every alpha the map names (`results.grid.swept_alphas`).

Then, written into the card (policy.json, rewritten atomically; weights and config untouched):

- `alpha_map`: for each heuristic setting, the alpha most likely to match it again (at least as
  accurate at no more NFE) on a new sample of as many problems, 1,000 at most (NEW: the test split's
  size and each fresh check's), judged from the paired differences on these (`log_match_chance`; ties
  to the smaller alpha); with the numbers of both here, the chance, whether the alpha matched it
  here, and how many problems only one of the two solved (`solved_by_one`);
- `alpha_map_summary`: how many settings the map matched here, and how many it is expected to
  match on that new sample (the sum of the chances): the number to compare policies by;
- `operating_points`: `accurate`, `balanced` and `fast`, the alphas with the highest mean
  validation reward r = correct x ((L - min(NFE, L) + 1) / L) ** a for a = 1/4, 1 and 32
  (`alpha=accurate` in model_args picks one);
- `recommended`: greedy at cutoff 0.5 and the `balanced` alpha: what `sampler=learned` runs when
  model_args say nothing.

The test split is never read. Finished points are kept in runs/alpha_map/ (one JSON line each), so
an interrupted sweep resumes; the heuristics' in a file of their own, keyed by the validation setting
and not the policy, so that mapping another policy (say each of a run's `--keep-validated`
checkpoints) decodes only its own alphas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.policy import UnmaskPolicy, find_policy, update_card
from lm_eval_dllm.reward import reward
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from lm_eval_dllm.utils import DLLMError

from .grid import PRESETS, SWEEPS, Grid, Setting, alphas_for
from .recommend import on_validation, read_cache, training_config

log = logging.getLogger("results")
POINTS = {"accurate": 0.25, "balanced": 1.0, "fast": 32.0}  # name -> the alpha whose reward picks it
GREEDY = {"mode": "greedy", "temperature": 1.0, "cutoff": 0.5}
CACHE = Path("runs/alpha_map")
NEW = 1000  # the largest new sample a map's chances are for: the test split's size, and each fresh check's
SHARP = 4  # refine splits smooth gaps only with SHARP x the new sample's problems: half its standard errors
FRESH_SEED = 7  # --fresh's problems: no split's seed, nor the fresh checks' (4, 5) or benchmarks.near_ties' (6)
FRESH_ID = 10 ** 6  # doc ids of --fresh's problems: past any split's


@dataclass(frozen=True)
class Point:
    """One setting's validation outcome: its per-problem scores and NFE, summarised."""
    label: str
    scores: tuple
    nfes: tuple

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / self.n

    @property
    def nfe(self) -> float:
        return sum(self.nfes) / self.n

    def var(self, which: str) -> float:
        xs = self.scores if which == "acc" else self.nfes
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)

    def reward(self, alpha: float, gen_length: int) -> float:
        return sum(reward(s, k, gen_length, alpha) for s, k in zip(self.scores, self.nfes)) / self.n


def paired(a, b) -> tuple[float, float]:
    """The mean of a - b over the same problems and its standard error: what both solve or both
    miss cancels."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / max(n - 1, 1)
    return m, math.sqrt(var / n)


def z_scores(p: Point, h: Point, new: int | None = None) -> tuple[float, float]:
    """How far `p` beats `h` in accuracy and in NFE saving, each in standard errors of the paired
    difference (`paired`) as a new sample of `new` problems (default: as many as here) would see it:
    the estimate's noise here plus that sample's own, se * sqrt(1 + n / new) (sqrt(2) standard errors
    when the two are as large). A floor of one problem's worth keeps a difference with no spread (both
    solve everything) from dividing by zero."""
    out = []
    for a, b in ((p.scores, h.scores), (h.nfes, p.nfes)):
        m, se = paired(a, b)
        out.append(m / max(se * math.sqrt(1 + len(a) / (new or len(a))), 1 / len(a)))
    return out[0], out[1]


def log_match_chance(p: Point, h: Point, new: int | None = None) -> float:
    """The log of the chance that `p` is again at least as accurate as `h` at no more NFE on a new
    sample of `new` problems (default: as many as here): the two z-scores' normal tails, multiplied
    (taken as independent); in logs, so that among settings far from matching the closest miss still
    ranks first."""
    return float(torch.special.log_ndtr(torch.tensor(z_scores(p, h, new), dtype=torch.float64)).sum())


def solved_by_one(p: Point, h: Point) -> dict[str, int]:
    """How many problems only the heuristic `h` solves, and how many only `p`: the paired accuracy
    difference rests on these alone, and few of them say the two decoders mostly decide alike."""
    return {"heuristic": sum(b > a for a, b in zip(p.scores, h.scores)),
            "learned": sum(a > b for a, b in zip(p.scores, h.scores))}


def matches(p: Point, h: Point) -> bool:
    return p.accuracy >= h.accuracy and p.nfe <= h.nfe


FINEST = 2 ** (1 / 16)  # refine's narrowest gap: the grid's half octave bisected three times
JUMP = 1.5  # a gap whose two ends differ in NFE by this factor or more is a jump in the curve: refine splits it


def bisect_at(curve: dict[float, Point], nfe: float, resolve: float | None = None) -> float | None:
    """The alpha halfway (in log alpha) across the gap where the curve's NFE crosses `nfe`: between the
    most careful alpha that spends no more than `nfe` (the smallest alpha that does) and the next smaller
    alpha, if the curve jumps there (that alpha's NFE is JUMP times as much or more) or, given `resolve`,
    if the two ends' NFE differ by more than it. None where no alpha spends so little, the smallest one
    already does, the curve is smooth there, or the gap is as narrow as FINEST."""
    alphas = sorted(curve)
    i = next((i for i, a in enumerate(alphas) if curve[a].nfe <= nfe), 0)
    if not i or alphas[i] / alphas[i - 1] < FINEST * 1.01:
        return None
    hi, lo = curve[alphas[i - 1]].nfe, curve[alphas[i]].nfe
    if hi < JUMP * lo and (resolve is None or hi - lo <= resolve):  # smooth here
        return None
    mid = round(math.sqrt(alphas[i - 1] * alphas[i]), 4)
    return None if mid in curve else mid  # four decimals may not split a gap below alpha 0.004


def refine(curve: dict[float, Point], heur: dict[str, Point], run, new: int | None = None) -> None:
    """Add to `curve` (alpha -> Point, `run(alpha)` decodes one) the bisections toward each heuristic
    setting's NFE where the curve jumps (`bisect_at`): at most three per grid gap, however many settings
    fall in it.

    Where the curve is smooth the grid stays as it is unless validation has SHARP times as many problems
    as the new sample the map is for (`new`): more alphas there would add choices that differ by less
    than validation's noise, and the map's pick among them would be the luckiest. With that many
    (`--fresh`), the gap toward a setting is also split while its two ends differ in NFE by more than
    two standard errors of a new sample's NFE difference against the setting: a setting on a steep
    stretch then finds an alpha at its NFE, not the grid's next one 0.05 NFE to its cheap side."""
    for h in heur.values():
        while (a := bisect_at(curve, h.nfe, _resolve(curve, h, new))) is not None:
            curve[a] = run(a)


def _resolve(curve: dict[float, Point], h: Point, new: int | None) -> float | None:
    """Two standard errors of the NFE difference against `h` on a new sample of `new` problems, read at
    the curve's point nearest `h` in NFE; None unless validation has SHARP times as many problems (its
    standard errors at most half the new sample's): otherwise its pick among close alphas is luck."""
    if new is None or h.n < SHARP * new:
        return None
    near = min(curve.values(), key=lambda p: abs(p.nfe - h.nfe))
    return 2 * paired(near.nfes, h.nfes)[1] * math.sqrt(h.n / new)


def choose_alpha(curve: dict[float, Point], h: Point, new: int | None = None) -> float:
    """The alpha most likely to match `h` again on `new` problems (`log_match_chance`, to 1e-6). Ties
    (chiefly both at 100 % here, where validation cannot tell the accuracies apart, and the NFE saving
    is certain) go to the smaller alpha: the lower penalty, the more careful decoding, the more accurate
    on problems validation did not have."""
    return max(curve, key=lambda a: (round(log_match_chance(curve[a], h, new), 6), -a))


ENV_FIELDS = ("pretrained", "include_path", "task", "block", "gen_length", "max_length", "truncation", "dllm_temperature",
              "cache", "cache_window", "num_fewshot", "apply_chat_template", "dtype", "val_split")


def env_fingerprint(cfg, env, prompts) -> str:
    """What a heuristic's validation outcome depends on (the model, task, block, L, dtype, decoding and
    the problems: their ids and contexts, not the seed that drew them), not which policy is being
    mapped: its points are shared by every policy validated so."""
    key = {k: getattr(cfg, k) for k in ENV_FIELDS} | {"model": env.model_id, "block_used": env.block, "L": env.L,
                                                      "problems": [(p.doc_id, p.context) for p in prompts]}
    if env.model_id == BUNDLED_ID:  # its weights may be retrained under the same name
        key["weights"] = hashlib.sha256((BUNDLED_DIR / "model.safetensors").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def heuristic_settings(block: int) -> list[Setting]:
    """Every heuristic setting the default results grid runs at `block` (with its ENDS_ONLY rule)."""
    blocks = list(PRESETS["default"].blocks)
    heuristics = [s for s in SWEEPS if s != "learned"]
    grid = Grid(tasks=["modchain"], blocks=sorted(set(blocks) | {block}), samplers=heuristics)
    return [s for s in grid.settings() if s.block == block]


def fresh_prompts(env, task: str, n: int, seed: int) -> list:
    """`n` problems of the bundled task's generator that no split holds (`modchain.fresh`), as prompts:
    more validation problems than the split has. Their doc ids follow the splits' (from FRESH_ID)."""
    if task != "modchain":
        raise DLLMError(f"--fresh {n}: task {task!r} has no problem generator; valid: --fresh 0, or task modchain")
    try:
        docs = modchain.fresh(n, seed)
    except ValueError as e:
        raise DLLMError(f"--fresh-seed: {e}") from None
    return [env.scorer.prompt(d, FRESH_ID + i) for i, d in enumerate(docs)]


def alpha_map(policy: str, *, limit: int | None = None, batch_size: int = 64, dtype: str | None = None,
              device: str | None = None, write: bool = True, cache_dir: Path = CACHE, fresh: int = 0,
              fresh_seed: int = FRESH_SEED) -> dict:
    """Sweep alpha and the heuristics on validation (and `fresh` generated problems of `fresh_seed`),
    choose for a new sample of as many problems, up to NEW, write the card's map and points."""
    if fresh < 0:
        raise DLLMError(f"--fresh {fresh}; valid: 0 or more problems")
    folder = find_policy(policy, model_id="", block=0, gen_length=0)
    pol = UnmaskPolicy.load(folder)
    if not pol.alpha_conditioned:
        raise DLLMError(f"policy {str(folder)!r} was trained at one alpha; valid: an alpha-conditioned policy "
                        f"(train.grpo --alpha-range), or `python -m results recommend` for this one")
    cfg, env, prompts, pol, cache = on_validation(folder, pol, training_config({**pol.card, "alpha": 1.0}, pol),
                                                  limit, batch_size, dtype, device, cache_dir)
    n_split = len(prompts)
    if fresh:
        prompts = prompts + fresh_prompts(env, cfg.task, fresh, fresh_seed)
        cache = cache.with_name(f"{cache.stem}-fresh{fresh}s{fresh_seed}{cache.suffix}")
    new = min(len(prompts), NEW)
    heur_cache = cache.parent / f"heuristics-{env_fingerprint(cfg, env, prompts)}.jsonl"
    done = {label: Point(label, tuple(d["scores"]), tuple(d["nfes"]))
            for path in (cache, heur_cache) for label, d in read_cache(path, "label").items()}

    def run(label: str, sampler) -> Point:
        if label not in done:
            learned = isinstance(sampler, LearnedSampler)
            ro = env.rollout(pol if learned else None, prompts, list(range(len(prompts))), record=False, sampler=sampler)
            done[label] = Point(label, tuple(ro.scores.tolist()), tuple(int(x) for x in ro.nfes.tolist()))
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache if learned else heur_cache, "a") as f:
                f.write(json.dumps(asdict(done[label])) + "\n")
            log.info("%s: accuracy %.3f, NFE %.2f", label, done[label].accuracy, done[label].nfe)
        return done[label]

    def at(a: float) -> Point:
        return run(f"learned(alpha={a:g})", LearnedSampler(LearnedSampler.Config(
            **{k: v for k, v in GREEDY.items() if k != "temperature"}, temperature=1.0, alpha=str(a)), policy=pol))

    heur = {s.label: run(s.label, make_sampler(s.sampler, dict(s.params))) for s in heuristic_settings(env.block)}
    curve = {a: at(a) for a in alphas_for(pol.cfg.alpha_range)}
    refine(curve, heur, at, new)
    curve = dict(sorted(curve.items()))
    amap, chances = {}, []
    for label, h in heur.items():
        a = choose_alpha(curve, h, new)
        chances.append(math.exp(log_match_chance(curve[a], h, new)))
        amap[label] = {"alpha": a, "matched": matches(curve[a], h), "chance": round(chances[-1], 3),
                       "heuristic": [round(h.accuracy, 4), round(h.nfe, 3)],
                       "learned": [round(curve[a].accuracy, 4), round(curve[a].nfe, 3)],
                       "solved_by_one": solved_by_one(curve[a], h)}
    points = {name: {"alpha": max(curve, key=lambda a: (curve[a].reward(obj, env.L), -curve[a].nfe)),
                     "rule": f"highest mean validation reward at alpha={obj:g}"} for name, obj in POINTS.items()}
    for p in points.values():
        c = curve[p["alpha"]]
        p |= {"val_accuracy": round(c.accuracy, 4), "val_nfe": round(c.nfe, 3)}
    command = (f"python -m results alpha-map --policy {shlex.quote(policy)}" + (f" --limit {limit}" if limit else "")
               + (f" --fresh {fresh} --fresh-seed {fresh_seed}" if fresh else ""))
    rec = {**GREEDY, "alpha": points["balanced"]["alpha"], "rule": "greedy at cutoff 0.5 (as validated in "
           "training), alpha of the `balanced` operating point", "split": cfg.val_split, "n": n_split,
           **({"fresh": {"n": fresh, "seed": fresh_seed}} if fresh else {}),
           "block": env.block, "gen_length": env.L, "dtype": cfg.dtype, "command": command,
           "sweep": [[a, round(c.accuracy, 4), round(c.nfe, 3)] for a, c in curve.items()]}
    summary = {"settings": len(amap), "matched_on_validation": sum(m["matched"] for m in amap.values()),
               "expected_on_new_problems": round(sum(chances), 2), "problems": len(prompts), "new_problems": new}
    print(map_table(curve, heur, amap))
    print(f"{summary['matched_on_validation']} of {len(amap)} heuristic settings matched on these {len(prompts)} "
          f"problems; expected on {new} new ones: {summary['expected_on_new_problems']:.2f} (the sum of the chances)")
    if write:
        update_card(folder, recommended=rec, operating_points=points, alpha_map=amap, alpha_map_summary=summary,
                    alpha_map_command=command)
        log.info("wrote the alpha map into %s", folder / "policy.json")
    return {"recommended": rec, "operating_points": points, "alpha_map": amap, "alpha_map_summary": summary}


def map_table(curve: dict[float, Point], heur: dict[str, Point], amap: dict) -> str:
    body = [[label, f"{100 * h.accuracy:.1f}", f"{h.nfe:.2f}", f"{m['alpha']:g}", f"{100 * curve[m['alpha']].accuracy:.1f}",
             f"{curve[m['alpha']].nfe:.2f}", f"{m['chance']:.3f}", "yes" if m["matched"] else "no",
             f"{m['solved_by_one']['heuristic']} / {m['solved_by_one']['learned']}"]
            for (label, h), m in zip(heur.items(), amap.values())]
    return tabulate(body, ["heuristic", "val acc %", "val NFE", "alpha", "learned val acc %", "learned val NFE",
                           "chance of a match", "matched", "solved by one only (heuristic / learned)"],
                    tablefmt="github", disable_numparse=True)
