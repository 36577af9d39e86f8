"""Choose a policy's default mode, temperature and cutoff on the validation split; write them into its card.

    python -m results recommend --policy modchain-B48-alpha3          # a shipped name or a policy folder
    python -m results recommend --policy runs/grpo-x/best --limit 100 # fewer validation problems (a quick look)
    python -m results recommend                                       # every shipped policy of the bundled model

The policy runs on its task's validation split (the problems `train.grpo` validated it on: its card's
command's --val-split, --val-size and --seed; --limit takes fewer) at the block and L it was trained
for, once per candidate: mode=sample at each of TEMPERATURES (and mode=pl for a policy
trained with --sampling pl), mode=greedy at each of CUTOFFS (at
temperature 1; in greedy mode a temperature only rescales the cutoff). The test split is never read.

The rule (`choose`): the highest mean validation reward of the policy's own objective, the reward it
was trained for, r = correct x ((L - min(NFE, L) + 1) / L) ** alpha with its card's alpha; ties go to
fewer NFE, then to the candidate listed first. So a policy trained accuracy-first (small alpha) gets
its most accurate setting, a cheap one (large alpha) the setting that spends the fewest forwards for
its accuracy, each on its own terms. The choice and the whole sweep go into the card's `recommended`
entry (policy.json, rewritten atomically; the weights and config are not touched), which
`sampler=learned` then uses for whatever model_args leave unset. Finished candidates are kept in
runs/recommend/ (one JSON line each), so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.policy import UnmaskPolicy, find_policy, update_card
from lm_eval_dllm.reward import reward
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.tiny import BUNDLED_ID
from lm_eval_dllm.utils import DLLMError
from train.grpo import Env, GRPOConfig, parse_args

from .grid import SWEEPS, policy_fingerprint

log = logging.getLogger("results")
TEMPERATURES = (0.25, 0.5, 0.75, 1.0, 1.5)  # the paper's 0.5 and 1.0, and around them
CUTOFFS = tuple(p["cutoff"] for p in SWEEPS["learned"] if "cutoff" in p)  # the results grid's
CACHE = Path("runs/recommend")


@dataclass(frozen=True)
class Trial:
    mode: str
    temperature: float
    cutoff: float
    accuracy: float
    nfe: float
    reward: float


def candidates(temperatures=TEMPERATURES, cutoffs=CUTOFFS, sampling: str = "bernoulli") -> list[dict]:
    """Sampling at each temperature (Plackett-Luce too, for a policy trained with it), greedy at each cutoff."""
    pl = [{"mode": "pl", "temperature": t, "cutoff": 0.5} for t in temperatures] if sampling == "pl" else []
    return ([{"mode": "sample", "temperature": t, "cutoff": 0.5} for t in temperatures] + pl
            + [{"mode": "greedy", "temperature": 1.0, "cutoff": c} for c in cutoffs])


def choose(trials: list[Trial]) -> Trial:
    """The highest mean validation reward; ties: fewer NFE, then the trial listed first."""
    if not trials:
        raise DLLMError("no candidate settings to choose from; valid: at least one temperature or cutoff")
    return min(enumerate(trials), key=lambda it: (-it[1].reward, it[1].nfe, it[0]))[1]


def training_config(card: dict, pol: UnmaskPolicy) -> GRPOConfig:
    """The settings the policy was trained and validated with: its card's command, parsed as
    train.grpo parses it; from the config's own fields when the command no longer parses."""
    words = shlex.split(card.get("command") or "")
    if "train.grpo" in words:
        try:
            return parse_args(words[words.index("train.grpo") + 1:])[0]
        except SystemExit:  # argparse's answer to a flag this train.grpo no longer has
            log.warning("the card's command no longer parses; using the policy config's task, block and L")
    c = pol.cfg
    return GRPOConfig(task=c.task, pretrained="" if c.base_model == BUNDLED_ID else c.base_model,
                      block=c.block or None, gen_length=c.gen_length or None, alpha=float(card["alpha"]))


def evaluate(env: Env, pol: UnmaskPolicy, prompts, cand: dict, alpha: float) -> Trial:
    """One candidate on the validation prompts through train.grpo's own rollout (its batches, the
    task's scorer), seeded by index as train.grpo's validation is."""
    sampler = LearnedSampler(LearnedSampler.Config(**cand), policy=pol)
    ro = env.rollout(pol, prompts, list(range(len(prompts))), record=False, sampler=sampler)
    return summarize(cand, ro.scores.tolist(), ro.nfes.int().tolist(), env.L, alpha)


def summarize(cand: dict, scores: list[float], nfes: list[int], gen_length: int, alpha: float) -> Trial:
    """A candidate's mean accuracy, NFE and reward (the training reward, per problem, then averaged)."""
    n = len(scores)
    return Trial(**cand, accuracy=sum(scores) / n, nfe=sum(nfes) / n,
                 reward=sum(reward(s, k, gen_length, alpha) for s, k in zip(scores, nfes)) / n)


def recommend(policy: str, *, limit: int | None = None, batch_size: int = 64, dtype: str | None = None,
              device: str | None = None, temperatures=TEMPERATURES, cutoffs=CUTOFFS,
              write: bool = True, cache_dir: Path = CACHE) -> dict:
    """Sweep the candidates on validation, choose by the rule, write the card's `recommended`."""
    folder = find_policy(policy, model_id="", block=0, gen_length=0)
    pol = UnmaskPolicy.load(folder)
    card = dict(pol.card)
    if pol.alpha_conditioned:
        raise DLLMError(f"policy {str(folder)!r} is alpha-conditioned; valid: `python -m results alpha-map "
                        f"--policy {policy}` (it chooses its alpha points and its default setting)")
    if "alpha" not in card:
        raise DLLMError(f"policy {str(folder)!r} has no alpha on its card; valid: a policy written by "
                        f"`python -m train.grpo` (the rule weighs NFE by the alpha it was trained with)")
    alpha = float(card["alpha"])
    cfg, env, prompts, pol, cache = on_validation(folder, pol, training_config(card, pol), limit, batch_size,
                                                  dtype, device, cache_dir)
    done = {key: Trial(**t) for key, t in read_cache(cache, "key", "trial").items()}
    trials = []
    for cand in candidates(temperatures, cutoffs, pol.cfg.sampling):
        key = json.dumps(cand, sort_keys=True)
        if key not in done:
            t = evaluate(env, pol, prompts, cand, alpha)
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a") as f:
                f.write(json.dumps({"key": key, "trial": asdict(t)}) + "\n")
            done[key] = t
            log.info("%s: accuracy %.3f, NFE %.2f, reward %.4f", key, t.accuracy, t.nfe, t.reward)
        trials.append(done[key])
    best = choose(trials)
    rec = {"mode": best.mode, "temperature": best.temperature, "cutoff": best.cutoff,
           "rule": f"highest mean validation reward at alpha={alpha:g} (ties: fewer NFE)",
           "split": cfg.val_split, "n": len(prompts), "block": env.block, "gen_length": env.L,
           "dtype": cfg.dtype, "val_accuracy": best.accuracy, "val_nfe": best.nfe, "val_reward": best.reward,
           "command": f"python -m results recommend --policy {shlex.quote(policy)}"
                      + (f" --limit {limit}" if limit else ""),
           "sweep": [[t.mode, t.temperature, t.cutoff, round(t.accuracy, 4), round(t.nfe, 3), round(t.reward, 4)]
                     for t in trials]}
    print(sweep_table(trials, best, alpha))
    if write:
        update_card(folder, recommended=rec)
        log.info("wrote recommended mode=%s temperature=%g cutoff=%g into %s", best.mode, best.temperature,
                 best.cutoff, folder / "policy.json")
    return rec


def on_validation(folder: Path, pol: UnmaskPolicy, cfg: GRPOConfig, limit: int | None, batch_size: int,
                  dtype: str | None, device: str | None, cache_dir: Path):
    """What a sweep of `pol` on its validation problems needs: the config it was validated with (this
    batch size, dtype and device), the environment, the prompts (its card's --val-split, --val-size,
    --seed; `limit` takes fewer), the policy on the device, and the file of finished points.
    A policy validated on the test split is refused: nothing may be chosen on the test problems."""
    if cfg.val_split == "test":
        raise DLLMError("the policy was validated on the test split; valid: a policy trained with "
                        "--val-split validation (nothing may be chosen on the test problems)")
    n = min(limit, cfg.val_size) if limit else cfg.val_size
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = GRPOConfig(**{**asdict(cfg), "device": str(dev), "batch_size": batch_size, "dtype": dtype or cfg.dtype})
    env = Env(cfg, dev)
    if (env.block, env.L) != (pol.cfg.block, pol.cfg.gen_length):
        log.warning("validating at block %d, L %d; the policy was trained at block %d, L %d",
                    env.block, env.L, pol.cfg.block, pol.cfg.gen_length)
    prompts = env.scorer.prompts(cfg.val_split, n=n, seed=cfg.seed)
    cache = cache_dir / f"{policy_fingerprint(folder)}-{cfg.val_split}-n{len(prompts)}-seed{cfg.seed}-{cfg.dtype}.jsonl"
    return cfg, env, prompts, pol.to(dev), cache


def read_cache(path: Path, key: str, value: str | None = None) -> dict:
    """The finished points of a sweep (one JSON object a line): d[key] -> d[value], or the whole d."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                out[d[key]] = d if value is None else d[value]
            except (ValueError, KeyError, TypeError):  # a line a kill cut short: that point reruns
                continue
    return out


def sweep_table(trials: list[Trial], best: Trial, alpha: float) -> str:
    body = [[t.mode, f"{t.temperature:g}", f"{t.cutoff:g}" if t.mode == "greedy" else "–", f"{100 * t.accuracy:.1f}",
             f"{t.nfe:.2f}", f"{t.reward:.4f}", "<- chosen" if t is best else ""] for t in trials]
    return tabulate(body, ["mode", "temperature", "cutoff", "val accuracy %", "val NFE", f"reward (alpha {alpha:g})", ""],
                    tablefmt="github", disable_numparse=True)
