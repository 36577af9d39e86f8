"""Two rules aimed at the threshold rule's fast end (issue 32), on the validation split.

    python -m benchmarks.fast_end --block 16     # -> results/bundled/fast_end_B16.md
    python -m benchmarks.fast_end --block 48     # -> results/bundled/fast_end_B48.md

The alpha maps miss threshold 0.5 at B = 16 and in full diffusion by near-ties: there the policies
decide almost as the threshold rule does (docs/training.md). These ask whether a rule of another
kind gets above the threshold rule's curve at that end. Each rule's point is set against the
threshold curve at the same NFE (linear between the sweep's two neighbouring points, its taus the
grid's and 0.3 and 0.4 below them), on the same problems.

1. **Two-stage threshold**: tau1 at a block's first step (every position of the block still masked),
   tau2 at its later steps. tau2 0 finishes every block in at most two steps; tau1 = tau2 is the
   threshold rule (the first row: the check that the rule is wired as the threshold sampler).
   With the near_conf term as well (conf - tau + beta (near_conf - 1), as benchmarks.dependency_start's
   hand rule): the rules tried near threshold 0.5's NFE at B = 16. The one furthest above the curve
   on validation is measured again on --check-size train problems, against the threshold curve there:
   chosen among fourteen on 500 problems, its lead there is partly the choice's.
2. **A correctness probe**: a logistic regression, fitted on the threshold(--probe-tau) decodes of
   --train-size train problems, that predicts whether a masked position's proposed token is the
   reference's, from the policy's seven inputs (conf, margin, entropy, pos, left, near, near_conf)
   and whether this is the block's first step; and, second, from those plus the dLLM's last hidden
   states. Its AUC is measured on the validation problems' decodes. The rule commits where the
   probe's P(correct) >= t (and at least its most likely position), so it holds back what the probe
   expects to be wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from lm_eval_dllm.policy import UnmaskPolicy, build_features, find_policy
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.base import Sampler, StepState, top_k
from lm_eval_dllm.utils import DLLMError, atomic_write
from results.alpha_map import heuristic_settings
from results.recommend import on_validation, training_config

INPUTS = ("conf", "margin", "entropy", "pos", "left", "near", "near_conf")  # the policies' inputs but mask, eligible
TWO_STAGE = ((0.5, 0.5), (0.4, 0.0), (0.5, 0.0), (0.6, 0.0), (0.7, 0.0), (0.9, 0.0), (0.7, 0.3), (0.9, 0.3), (0.7, 0.5),
             (0.8, 0.4))
# with the near_conf term as well (tau1, tau2, beta): the rules tried near threshold 0.5's NFE at B = 16
WITH_NEAR = ((0.55, 0.0, 0.0), (0.6, 0.0, 0.1), (0.55, 0.0, 0.2), (0.5, 0.3, 0.2), (0.6, 0.3, 0.1), (0.45, 0.45, 0.1),
             (0.6, 0.2, 0.0), (0.65, 0.1, 0.0), (0.5, 0.0, 0.2), (0.52, 0.0, 0.2), (0.5, 0.0, 0.3), (0.45, 0.0, 0.3),
             (0.5, 0.0, 0.15), (0.55, 0.0, 0.1))
CHECK_TAUS = (0.3, 0.4, 0.5, 0.7)  # the threshold curve on the check problems, around the fast end
PROBE_TS = (0.4, 0.5, 0.6, 0.7)
LOWER = (0.3, 0.4)  # threshold taus below the grid's, so that the curve reaches the rules' fastest points


def first_step(s: StepState) -> torch.Tensor:
    """(B,) bool: every position of the current block is still masked (its first step)."""
    width = min(s.block_size, s.conf.shape[1] - s.block_start)
    return s.eligible.sum(-1) == width


def probe_inputs(s: StepState, hidden: bool) -> torch.Tensor:
    """(B, L, F) the probe's inputs at every position."""
    f = build_features(INPUTS, s.conf, s.margin, s.entropy, s.masked, s.eligible)
    parts = [f, first_step(s).float()[:, None, None].expand(*f.shape[:2], 1)]
    return torch.cat(parts + ([s.hidden.float()] if hidden else []), -1)


class TwoStage(Sampler):
    """Commit where conf - tau + beta (near_conf - 1) >= 0, tau = tau1 at a block's first step and tau2
    after (beta 0: on conf alone; tau1 = tau2 and beta 0: the threshold rule)."""
    name = "two_stage"

    def __init__(self, tau1: float, tau2: float, beta: float = 0.0):
        self.tau1, self.tau2, self.beta = tau1, tau2, beta

    def select(self, s: StepState):
        tau = torch.where(first_step(s), self.tau1, self.tau2)[:, None]
        score = s.conf.float() - tau
        if self.beta:
            near = build_features(("near_conf",), s.conf, s.margin, s.entropy, s.masked, s.eligible)[..., 0]
            score = score + self.beta * (near - 1)
        return (s.eligible & (score >= 0)) | top_k(score, s.eligible, 1)


class Recorder(Sampler):
    """The threshold rule, keeping (row, position, proposal, probe inputs) of every eligible position."""
    name = "recorder"

    def __init__(self, tau: float):
        self.rule, self.records, self.offset = make_sampler("threshold", {"tau": tau}), [], 0

    def reads_hidden(self) -> bool:
        return True

    def select(self, s: StepState):
        r, p = s.eligible.nonzero(as_tuple=True)
        rec = (s.rows[r] + self.offset, p, s.x0[r, p], probe_inputs(s, True)[r, p])
        self.records.append(tuple(t.cpu() for t in rec))
        return self.rule.select(s)


class Probe:
    """Logistic regression on standardised inputs (L-BFGS, a little L2)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, l2: float = 1e-4):
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-6
        w, b = torch.zeros(X.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
        Xn = (X - self.mu) / self.sd

        def loss():
            opt.zero_grad()
            out = torch.nn.functional.binary_cross_entropy_with_logits(Xn @ w + b, y) + l2 * (w * w).sum()
            out.backward()
            return out

        opt.step(loss)
        self.w, self.b = w.detach(), b.detach()

    def logit(self, X: torch.Tensor) -> torch.Tensor:
        return ((X - self.mu) / self.sd) @ self.w + self.b


class ProbeRule(Sampler):
    name = "probe_rule"

    def __init__(self, probe: Probe, t: float, hidden: bool):
        self.probe, self.t, self.hidden = probe, t, hidden

    def reads_hidden(self) -> bool:
        return self.hidden

    def select(self, s: StepState):
        p = torch.sigmoid(self.probe.logit(probe_inputs(s, self.hidden)))
        return (s.eligible & (p >= self.t)) | top_k(p, s.eligible, 1)


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """The chance that a random positive scores above a random negative (ties count half)."""
    score, y = score.double(), y.bool()
    pos, neg = score[y], score[~y]
    if not len(pos) or not len(neg):
        raise DLLMError("auc needs both classes")
    below = torch.searchsorted(neg.sort().values, pos, right=False).double()  # negatives strictly below
    ties = torch.searchsorted(neg.sort().values, pos, right=True).double() - below
    return ((below + ties / 2).sum() / (len(pos) * len(neg))).item()


def on_curve(curve: list[tuple[float, float]], nfe: float) -> float | None:
    """The accuracy of the (nfe, accuracy) curve at `nfe`, linear between its neighbouring points;
    None outside it."""
    pts = sorted(curve)
    for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
        if n0 <= nfe <= n1:
            return a0 if n1 == n0 else a0 + (a1 - a0) * (nfe - n0) / (n1 - n0)
    return None


def collect(env, prompts, tau: float, batch: int):
    """(X, y): the probe inputs of every eligible position along threshold(tau) decodes, and whether
    its proposal is the reference token there."""
    rec = Recorder(tau)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        rec.offset = i
        env.gen.generate([p.context for p in chunk], rec, gen_length=env.L, block=env.block,
                         seeds=list(range(i, i + len(chunk))), temperature=env.cfg.dllm_temperature, until=env.until)
    eos = env.spec.stop_ids[0]
    ref = torch.tensor([(ids + [eos] * env.L)[:env.L] for ids in (env.tok.encode(p.doc["answer"]) for p in prompts)])
    row, pos, x0, X = (torch.cat(c) for c in zip(*rec.records))
    return X.float(), (x0 == ref[row, pos]).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, required=True, choices=(8, 16, 48),
                    help="the block of the shipped policy modchain-B<block>-alphas, whose validation problems it uses")
    ap.add_argument("--train-size", type=int, default=1500, help="train problems the probe is fitted on (default 1500)")
    ap.add_argument("--check-size", type=int, default=2000,
                    help="train problems the best rule with near_conf is measured again on (default 2000)")
    ap.add_argument("--probe-tau", type=float, default=0.5, help="the threshold the probe's decodes use (default 0.5)")
    ap.add_argument("--limit", type=int, default=None, help="validation problems (default the card's, 500)")
    ap.add_argument("--write", default=None, help="default results/bundled/fast_end_B<block>.md")
    args = ap.parse_args(argv)
    if args.train_size < 10:
        raise SystemExit(f"error: --train-size {args.train_size}; valid: 10 or more problems")
    if args.check_size < 10:
        raise SystemExit(f"error: --check-size {args.check_size}; valid: 10 or more problems")
    if not 0 < args.probe_tau <= 1:
        raise SystemExit(f"error: --probe-tau {args.probe_tau}; valid: a number in (0, 1]")
    folder = find_policy(f"modchain-B{args.block}-alphas", model_id="", block=0, gen_length=0)
    src = UnmaskPolicy.load(folder)
    cfg, env, prompts, _, _ = on_validation(folder, src, training_config({**src.card, "alpha": 1.0}, src), args.limit,
                                            64, None, None, Path("runs/alpha_map"))

    def point(sampler, on=None) -> tuple[float, float]:
        on = prompts if on is None else on
        ro = env.rollout(None, on, list(range(len(on))), record=False, sampler=sampler)
        return ro.scores.double().mean().item(), ro.nfes.double().mean().item()

    def vs_curve(label: str, acc: float, nfe: float, along=None) -> list[str]:
        at = on_curve(curve if along is None else along, nfe)
        return [label, f"{100 * acc:.1f}", f"{nfe:.2f}", "–" if at is None else f"{100 * at:.1f}",
                "–" if at is None else f"{100 * (acc - at):+.1f}"]

    taus = LOWER + tuple(dict(s.params)["tau"] for s in heuristic_settings(env.block) if s.sampler == "threshold")
    sweep = [(tau, *point(make_sampler("threshold", {"tau": tau}))) for tau in taus]
    curve = [(nfe, acc) for _, acc, nfe in sweep]
    print(*(f"threshold {t:g}: {100 * a:.1f} % @ {n:.2f}" for t, a, n in sweep), sep="\n", flush=True)
    two = [vs_curve(f"tau1 {t1:g}, tau2 {t2:g}", *point(TwoStage(t1, t2))) for t1, t2 in TWO_STAGE]
    print(*two, sep="\n", flush=True)
    near = []
    for t1, t2, beta in WITH_NEAR:
        acc, nfe = point(TwoStage(t1, t2, beta))
        near.append(((t1, t2, beta), acc, nfe, vs_curve(f"tau1 {t1:g}, tau2 {t2:g}, beta {beta:g}", acc, nfe)))
        print(*near[-1][-1], flush=True)
    (t1, t2, beta), acc, nfe, _ = max((r for r in near if on_curve(curve, r[2]) is not None),
                                      key=lambda r: r[1] - on_curve(curve, r[2]))
    check = env.scorer.prompts("train", n=args.check_size, seed=1)
    ck_sweep = [(tau, *point(make_sampler("threshold", {"tau": tau}), check)) for tau in CHECK_TAUS]
    ck_curve = [(n, a) for _, a, n in ck_sweep]
    label = f"tau1 {t1:g}, tau2 {t2:g}, beta {beta:g}"
    checked = [vs_curve(f"{label} (validation)", acc, nfe),
               vs_curve(f"{label} (the {len(check)} check problems)", *point(TwoStage(t1, t2, beta), check), ck_curve)]
    print(*checked, sep="\n", flush=True)

    train = env.scorer.prompts("train", n=args.train_size, seed=0)
    Xt, yt = collect(env, train, args.probe_tau, 64)
    Xv, yv = collect(env, prompts, args.probe_tau, 64)
    n_in = len(INPUTS) + 1
    fits = {"the policy's inputs": (Probe(Xt[:, :n_in], yt), n_in, False),
            "those + the dLLM's hidden states": (Probe(Xt, yt), Xt.shape[1], True)}
    done = Xv[:, 0] >= args.probe_tau  # the positions threshold(probe-tau) commits at their step
    aucs = [["conf alone", f"{auc(Xv[:, 0], yv):.3f}", f"{auc(Xv[done, 0], yv[done]):.3f}"]]
    for name, (probe, k, _) in fits.items():
        s = probe.logit(Xv[:, :k])
        aucs.append([name, f"{auc(s, yv):.3f}", f"{auc(s[done], yv[done]):.3f}"])
    print(*aucs, sep="\n", flush=True)
    rules = []
    for name, (probe, _, hidden) in fits.items():
        for t in PROBE_TS:
            rules.append(vs_curve(f"{name}, P(correct) >= {t:g}", *point(ProbeRule(probe, t, hidden))))
            print(*rules[-1], flush=True)

    head = ["rule", "accuracy %", "mean NFE", "threshold curve at that NFE %", "difference (points)"]
    flags = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        f"`python -m benchmarks.fast_end{flags}` on the {len(prompts)} problems of the {cfg.val_split} split, "
        f"block {env.block} ({cfg.dtype}). The threshold curve at a rule's NFE is linear between the sweep's two "
        "neighbouring points (– : outside the sweep).", "",
        f"The threshold sweep (the grid's taus and {', '.join(map(str, LOWER))} below them):", "",
        tabulate([[f"{t:g}", f"{100 * a:.1f}", f"{n:.2f}"] for t, a, n in sweep], ["tau", "accuracy %", "mean NFE"],
                 tablefmt="github", disable_numparse=True), "",
        "Two-stage threshold: tau1 at a block's first step, tau2 after (tau1 = tau2: the threshold rule):", "",
        tabulate(two, head, tablefmt="github", disable_numparse=True), "",
        "With the near_conf term as well, conf - tau + beta (near_conf - 1) >= 0 (the rules tried near "
        "threshold 0.5's NFE at B = 16):", "",
        tabulate([r[-1] for r in near], head, tablefmt="github", disable_numparse=True), "",
        f"The one furthest above the curve on validation, measured again on {len(check)} train problems (no rule "
        "here is fitted to them), against the threshold curve there ("
        + "; ".join(f"threshold {t:g}: {100 * a:.1f} % @ {n:.2f}" for t, a, n in ck_sweep) + "):", "",
        tabulate(checked, head, tablefmt="github", disable_numparse=True), "",
        f"The correctness probe, fitted on the threshold({args.probe_tau:g}) decodes of {len(train)} train problems "
        f"({len(yt)} position-steps, {100 * (1 - yt.mean().item()):.1f} % wrong proposals); its AUC on the "
        f"validation decodes ({len(yv)} position-steps), at every eligible position and at those the threshold "
        "rule commits:", "",
        tabulate(aucs, ["inputs", "AUC, every eligible position", "AUC, the committed ones"], tablefmt="github",
                 disable_numparse=True), "",
        "The probe as a rule: commit where P(correct) >= t:", "",
        tabulate(rules, head, tablefmt="github", disable_numparse=True), ""])
    out = Path(args.write or f"results/bundled/fast_end_B{args.block}.md")
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
