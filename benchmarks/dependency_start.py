"""The near_conf dependency term, measured before any training (issue 32), on the validation split.

    python -m benchmarks.dependency_start --block 8     # -> results/bundled/dependency_start_B8.md
    python -m benchmarks.dependency_start --block 16 --policy results/bundled/retired_policies/modchain-B16-alphas-chain
    python -m benchmarks.dependency_start --block 48 --policy results/bundled/retired_policies/modchain-B48-alphas-stage1
    python -m benchmarks.dependency_start --block 16 --hand-only --betas 0.1,0.2 --taus 0.4,0.5 --write F
    python -m benchmarks.dependency_start --block 48 --hand-only --near-window 16 ...   # a wider near_conf

`near_conf` is the lowest dLLM confidence among the still-masked positions just before a position
(`policy.NEAR`). The term beta * (near_conf - 1) holds a token back while what sits just before it
is masked and unsure. Three measurements, each on the policy's own validation problems:

1. **The hand rule**: commit where conf - tau + beta (near_conf - 1) > 0 (at least the most confident
   position, as the threshold rule), at the threshold sweep's taus, for beta 0 (which must give the
   threshold rule's numbers exactly: the check that the rule is wired as the threshold rule) and --beta.
2. **The shipped policy plus the term**, what `train.grpo --features ...,near_conf --init-near-conf
   BETA --init-from <shipped>` starts from before its first update: the term at full weight at alpha
   1, fading linearly in log alpha to nothing at the top of the alpha range (`start_near_conf`): its
   alpha map.
3. **The same with the full term at every alpha** (the fade undone): its alpha map, to show what the
   fade is for.

The shipped B = 16 and full-diffusion policies read near_conf already (they were trained from the
threshold start with the term); --policy names the retired ones these files were measured with.
The two policies are written to runs/dependency-start-B<block>[-full]; their alpha maps are
computed by `results.alpha_map` (cached there, like every alpha map).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm import policy as policy_module
from lm_eval_dllm.policy import ALL_FEATURES, PolicyConfig, UnmaskPolicy, build_policy, find_policy
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.utils import DLLMError, atomic_write
from results.alpha_map import GREEDY, alpha_map, heuristic_settings
from results.recommend import on_validation, training_config
from train.grpo import start_from

NEAR_TRAINED = policy_module.NEAR  # the window the policies read (--near-window changes the module's, for the hand rule)
CARD_KEYS = ("alpha_map", "alpha_map_summary", "operating_points", "recommended", "alpha_map_command")


def hand_rule(src: UnmaskPolicy, tau: float, beta: float) -> UnmaskPolicy:
    """The linear rule conf - tau + beta (near_conf - 1) > 0 as a policy (the block's output is 0)."""
    pol = UnmaskPolicy(PolicyConfig(features=("conf", "near_conf"), skip_gain=1.0, base_model=src.cfg.base_model,
                                    task=src.cfg.task, block=src.cfg.block, gen_length=src.cfg.gen_length))
    with torch.no_grad():
        for p in pol.parameters():
            p.zero_()
        pol.skip.weight.copy_(torch.tensor([[1.0, beta]]) * src.cfg.init_sharpness)
        pol.skip.bias.fill_(-(tau + beta) * src.cfg.init_sharpness)
    return pol


def with_term(shipped: str, beta: float, out: Path, fade: bool) -> Path:
    """The shipped policy widened to every feature, plus the term: with `fade`, what `train.grpo
    --init-near-conf beta --init-from shipped` starts from; without, the full term at every alpha."""
    src = UnmaskPolicy.load(find_policy(shipped, model_id="", block=0, gen_length=0))
    pol = build_policy(replace(src.cfg, features=ALL_FEATURES))
    start_from(pol, shipped)  # the shipped policy, the new features' weights at zero
    pol.cfg = replace(pol.cfg, init_near_conf=beta)
    pol.start_near_conf(fade=fade)
    pol.save(out, {k: v for k, v in src.card.items() if k not in CARD_KEYS})
    return out


def _numbers(name: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise DLLMError(f"--{name} {text!r}; valid: comma-separated numbers") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, required=True, help="8, 16 or 48: the shipped policy modchain-B<block>-alphas")
    ap.add_argument("--policy", default=None, help="an alpha-conditioned policy without near_conf, instead of the "
                    "shipped one (e.g. results/bundled/retired_policies/modchain-B48-alphas-stage1)")
    ap.add_argument("--beta", type=float, default=0.5, help="the term's weight (default 0.5)")
    ap.add_argument("--betas", default=None, help="the hand rule's betas besides 0 (comma-separated; default --beta)")
    ap.add_argument("--taus", default=None, help="the hand rule's taus (default the threshold sweep's)")
    ap.add_argument("--hand-only", action="store_true", help="the hand rule alone, no alpha maps")
    ap.add_argument("--near-window", type=int, default=NEAR_TRAINED,
                    help=f"the hand rule's near_conf window: how many positions before each it reads (default "
                         f"{NEAR_TRAINED}, what the policies read; another needs --hand-only)")
    ap.add_argument("--write", default=None, help="default results/bundled/dependency_start_B<block>.md")
    args = ap.parse_args(argv)
    try:
        betas = [args.beta] if args.betas is None else _numbers("betas", args.betas)
        for name, v in [("beta", args.beta)] + [("betas", b) for b in betas]:
            if not 0 < v < float("inf"):
                raise DLLMError(f"--{name} {v}; valid: finite numbers > 0")
        if not 1 <= args.near_window <= 4096:
            raise DLLMError(f"--near-window {args.near_window}; valid: 1 to 4096 positions")
        if args.near_window != NEAR_TRAINED and not args.hand_only:
            raise DLLMError(f"--near-window {args.near_window} with alpha maps; valid: --hand-only, or "
                            f"--near-window {NEAR_TRAINED} (the window the policies were trained with)")
        hand_taus = None if args.taus is None else _numbers("taus", args.taus)
        if hand_taus and not all(0 < t <= 1 for t in hand_taus):
            raise DLLMError(f"--taus {args.taus}; valid: numbers in (0, 1]")
        shipped = args.policy or f"modchain-B{args.block}-alphas"
        folder = find_policy(shipped, model_id="", block=0, gen_length=0)
        src = UnmaskPolicy.load(folder)
        if not args.hand_only and ("near_conf" in src.cfg.features or not src.alpha_conditioned):
            raise DLLMError(f"policy {shipped!r} {'reads near_conf already' if src.alpha_conditioned else 'takes no alpha'}; "
                            f"valid: an alpha-conditioned policy without near_conf (--policy), or --hand-only")
        if src.cfg.block != args.block:
            raise DLLMError(f"--policy {shipped!r} was trained at block {src.cfg.block}; valid: --block {src.cfg.block}")
    except DLLMError as e:
        raise SystemExit(f"error: {e}")
    cfg, env, prompts, _, _ = on_validation(folder, src, training_config({**src.card, "alpha": 1.0}, src), None, 64,
                                            None, None, Path("runs/alpha_map"))
    greedy = {k: v for k, v in GREEDY.items() if k != "temperature"}
    sweep = [dict(s.params)["tau"] for s in heuristic_settings(env.block) if s.sampler == "threshold"]
    rows, raw = [], []
    policy_module.NEAR = args.near_window  # the features read it at each call
    try:
        for beta in [0.0] + betas:
            for tau in hand_taus or sweep:
                pol = hand_rule(src, tau, beta)
                ro = env.rollout(pol, prompts, list(range(len(prompts))), record=False,
                                 sampler=LearnedSampler(LearnedSampler.Config(**greedy, temperature=1.0), policy=pol))
                acc, nfe = ro.scores.double().mean().item(), ro.nfes.double().mean().item()
                raw.append((beta, tau, round(acc, 4), round(nfe, 3)))  # as the alpha map stores a heuristic's
                rows.append([f"{beta:g}", f"{tau:g}", f"{100 * acc:.1f}", f"{nfe:.2f}"])
                print(*rows[-1], flush=True)
    finally:  # the policies' own window again, for the alpha maps below and any caller of main()
        policy_module.NEAR = NEAR_TRAINED
    flags = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    parts = [f"`python -m benchmarks.dependency_start{flags}` on the {len(prompts)} problems of the "
             f"{cfg.val_split} split, block {env.block} ({cfg.dtype}).", "",
             "The hand rule conf - tau + beta (near_conf - 1) > 0 (beta 0 is the threshold rule)"
             + (f", near_conf over the {args.near_window} positions before each (the policies read "
                f"{NEAR_TRAINED})" if args.near_window != NEAR_TRAINED else "") + ":", "",
             tabulate(rows, ["beta", "tau", "accuracy %", "mean NFE"], tablefmt="github", disable_numparse=True)]
    for fade in () if args.hand_only else (True, False):
        out = with_term(shipped, args.beta, Path(f"runs/dependency-start-B{args.block}" + ("" if fade else "-full")), fade)
        res = alpha_map(str(out))
        s = res["alpha_map_summary"]
        body = [[h, *m["heuristic"], m["alpha"], *m["learned"], m["chance"], "yes" if m["matched"] else "no"]
                for h, m in res["alpha_map"].items()]
        for r in body:
            r[1], r[4] = f"{100 * r[1]:.1f}", f"{100 * r[4]:.1f}"
        parts += ["", f"`{shipped}` plus the term (beta {args.beta:g}" + (f", fading to 0 at alpha "
                  f"{src.cfg.alpha_range[1]:g}: the training start)" if fade else " at every alpha)") + f", untrained: {s['matched_on_validation']} of "
                  f"{s['settings']} heuristic settings matched, {s['expected_on_new_problems']:.2f} expected on as many "
                  f"new problems (the policy's own card: {src.card['alpha_map_summary']['expected_on_new_problems']:.2f})", "",
                  tabulate(body, ["heuristic", "acc %", "NFE", "alpha", "learned acc %", "learned NFE", "chance",
                                  "matched"], tablefmt="github", disable_numparse=True),
                  "", "Its alpha sweep (alpha, accuracy %, NFE): " + "; ".join(
                      f"{a:g}: {100 * acc:.1f} @ {nfe:.2f}" for a, acc, nfe in res["recommended"]["sweep"])]
    if not args.hand_only:
        same = all(res["alpha_map"][f"threshold(tau={tau:g})"]["heuristic"] == [acc, nfe]
                   for beta, tau, acc, nfe in raw if beta == 0 and tau in sweep)
        parts.insert(5, f"\nBeta 0 gives the threshold sampler's own numbers at every tau of its sweep: "
                        f"{'yes' if same else 'NO'}.")
    path = Path(args.write or f"results/bundled/dependency_start_B{args.block}.md")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(parts) + "\n"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
