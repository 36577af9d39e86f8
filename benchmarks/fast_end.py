"""Rules aimed at the threshold rule's fast end (issue 32), and their headroom, on the validation split.

    python -m benchmarks.fast_end --block 8      # -> results/bundled/fast_end_B8.md
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
2. **A block-level gate**: where every eligible position of the block has conf >= t_all, commit them
   all; else commit only those with conf >= t_hi. A held token costs a forward only when it is the
   block's one reason to take another step; once the block takes one anyway, holding more is free.
   The threshold rule ignores that (t_hi = t_all). Its row with the largest leads on validation is
   measured again on the check problems. Also its linear form, conf + beta * (the block's lowest
   eligible conf) >= tau: what a policy's linear path from its features could start as.
3. **A correctness probe**: a logistic regression, fitted on the threshold(--probe-tau) decodes of
   --train-size train problems, that predicts whether a masked position's proposed token is the
   reference's, from the policy's seven inputs (conf, margin, entropy, pos, left, near, near_conf)
   and whether this is the block's first step; and, second, from those plus the dLLM's last hidden
   states. Its AUC is measured on the validation problems' decodes. The rule commits where the
   probe's P(correct) >= t (and at least its most likely position), so it holds back what the probe
   expects to be wrong. As a veto instead: the threshold rule's commits less those whose P(correct)
   is below g, so that a low g holds back only what the probe is surest of.
4. **The headroom**: a decoder that knows the reference tokens and commits only the proposals that
   are the reference's (the most confident one where none is). It is not a decoder; it says how much
   the commit decisions alone could gain on this model.
5. **Whether the next forward sees a wrong commit**: along the threshold(--probe-tau) decodes, what
   the block's next forward proposes at each position committed the step before (a commit could be
   revised at no cost only if that forward proposed another token where the commit was wrong).
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
CHECK_TAUS = (0.3, 0.4, 0.5, 0.7, 0.9, 0.95, 0.99)  # the threshold curve on the check problems
GATE = tuple((t_all, t_hi) for t_all in (0.3, 0.4, 0.5, 0.6, 0.7) for t_hi in (0.9, 0.95, 0.99))
GATE_CHECK = tuple((t_all, 0.95) for t_all in (0.4, 0.5, 0.6, 0.7))  # a whole row of GATE, measured again
LINEAR = ((1.0, 0.8), (1.0, 1.0), (2.0, 1.0), (2.0, 1.2))  # (beta, tau): conf + beta * block min >= tau
PROBE_TS = (0.4, 0.5, 0.6, 0.7)
VETO = tuple((tau, g) for tau in (0.4, 0.5) for g in (0.2, 0.3, 0.4))  # (tau, g): g low = only the surest vetoes
ORACLES = ((0.0, float("inf")), (0.5, float("inf")), (0.5, 0.9), (0.5, 0.7))  # (tau, trust), see Oracle
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


def block_min(s: StepState) -> torch.Tensor:
    """(B, 1) the lowest confidence among the eligible positions (1 where there is none)."""
    return torch.where(s.eligible, s.conf.float(), 1.0).amin(-1, keepdim=True)


class BlockGate(Sampler):
    """A block-level rule: where every eligible position has conf >= t_all, commit them all (the block
    ends with this step); else commit only those with conf >= t_hi, as the block takes another step
    anyway, and a token held back then costs no forward of its own (at least the most confident one).
    t_hi = t_all is the threshold rule."""
    name = "block_gate"

    def __init__(self, t_all: float, t_hi: float):
        self.t_all, self.t_hi = t_all, t_hi

    def select(self, s: StepState):
        want = s.eligible & ((block_min(s) >= self.t_all) | (s.conf >= self.t_hi))
        return want | top_k(s.conf, s.eligible, 1)


class LinearGate(Sampler):
    """What a linear path from the features can hold of BlockGate: commit where conf + beta * block min
    >= tau (at least the most confident position). Every position ends the block where the block min
    is at least tau / (1 + beta); with a low block min the bar is tau."""
    name = "linear_gate"

    def __init__(self, beta: float, tau: float):
        self.beta, self.tau = beta, tau

    def select(self, s: StepState):
        score = s.conf.float() + self.beta * block_min(s) - self.tau
        return (s.eligible & (score >= 0)) | top_k(score, s.eligible, 1)


class Oracle(Sampler):
    """Knows the reference tokens (`refs` (N, L), row s.rows + offset): commits where conf >= tau and the
    proposal is the reference's, or is not but conf >= trust (inf: every wrong proposal held back),
    and the most confident position when nothing qualifies. Not a decoder: the headroom of the
    commit-only decisions a policy makes, on this model."""
    name = "oracle"

    def __init__(self, refs: torch.Tensor, tau: float = 0.0, trust: float = float("inf")):
        self.refs, self.tau, self.trust, self.offset = refs, tau, trust, 0

    def select(self, s: StepState):
        right = s.x0 == self.refs.to(s.x0.device)[s.rows + self.offset]
        want = s.eligible & (s.conf >= self.tau) & (right | (s.conf >= self.trust))
        return want | (top_k(s.conf, s.eligible, 1) & ~want.any(-1, keepdim=True))


class Rechecker(Sampler):
    """The threshold rule, keeping for each commit followed by another step of its block (row, the
    committed token, the next forward's proposal there): does the next forward, which sees the
    commit, propose another token where the commit was wrong?"""
    name = "rechecker"

    def __init__(self, tau: float):
        self.rule, self.pairs, self.offset, self.last = make_sampler("threshold", {"tau": tau}), [], 0, None

    def select(self, s: StepState):
        rows = (s.rows + self.offset).cpu()
        if self.last is not None and self.last[0] == s.block_start:
            _, last_rows, commit, tok = self.last
            at = {r: j for j, r in enumerate(rows.tolist())}
            for k, r in enumerate(last_rows.tolist()):
                if r in at:  # the row takes another step in this block
                    p = commit[k].nonzero().squeeze(-1)
                    self.pairs.append((torch.full_like(p, r), p, tok[k, p], s.x0[at[r], p].cpu()))
        action = self.rule.select(s)
        self.last = (s.block_start, rows, action.cpu(), s.x0.cpu())
        return action


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
    """Commit where the probe's P(correct) >= t (and at least its most likely position)."""
    name = "probe_rule"

    def __init__(self, probe: Probe, t: float, hidden: bool):
        self.probe, self.t, self.hidden = probe, t, hidden

    def reads_hidden(self) -> bool:
        return self.hidden

    def p_correct(self, s: StepState) -> torch.Tensor:
        return torch.sigmoid(self.probe.logit(probe_inputs(s, self.hidden)))

    def select(self, s: StepState):
        p = self.p_correct(s)
        return (s.eligible & (p >= self.t)) | top_k(p, s.eligible, 1)


class Veto(ProbeRule):
    """The threshold rule with the probe's veto: commit where conf >= tau and P(correct) >= g (and at
    least the most confident position). A low g holds back only what the probe is surest is wrong."""
    name = "veto"

    def __init__(self, probe: Probe, tau: float, g: float, hidden: bool):
        super().__init__(probe, g, hidden)
        self.tau = tau

    def select(self, s: StepState):
        return (s.eligible & (s.conf >= self.tau) & (self.p_correct(s) >= self.t)) | top_k(s.conf, s.eligible, 1)


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


def by_chunk(env, sampler, prompts) -> tuple[float, float]:
    """(accuracy, mean NFE) of `sampler` on `prompts`, one batch at a time with the sampler's `offset`
    set to the batch's first problem: for a sampler that finds a row's problem as s.rows + offset."""
    scores, nfes, n = [], [], env.cfg.batch_size
    for i in range(0, len(prompts), n):
        sampler.offset = i
        ro = env.rollout(None, prompts[i:i + n], list(range(i, i + len(prompts[i:i + n]))), record=False,
                         sampler=sampler)
        scores.append(ro.scores.double())
        nfes.append(ro.nfes.double())
    return torch.cat(scores).mean().item(), torch.cat(nfes).mean().item()


def collect(env, prompts, tau: float):
    """(X, y): the probe inputs of every eligible position along threshold(tau) decodes, and whether
    its proposal is the reference token there."""
    rec = Recorder(tau)
    by_chunk(env, rec, prompts)
    row, pos, x0, X = (torch.cat(c) for c in zip(*rec.records))
    return X.float(), (x0 == references(env, prompts)[row, pos]).float()


def references(env, prompts) -> torch.Tensor:
    """(N, L) each problem's reference answer as tokens, stop tokens after it."""
    eos = env.spec.stop_ids[0]
    return torch.tensor([(ids + [eos] * env.L)[:env.L] for ids in (env.tok.encode(p.doc["answer"]) for p in prompts)])


def recheck_table(pairs, refs: torch.Tensor) -> list[list[str]]:
    """From Rechecker's pairs: for wrong and for right commits, how often the next forward proposes
    another token there, and how often the reference's."""
    row, pos, tok, nxt = (torch.cat(c) for c in zip(*pairs))
    ref = refs[row, pos]
    out = []
    for name, sel in (("wrong (not the reference token)", tok != ref), ("right", tok == ref)):
        n = int(sel.sum())
        out.append([name, str(n), f"{100 * (nxt[sel] != tok[sel]).double().mean().item():.1f}",
                    f"{100 * (nxt[sel] == ref[sel]).double().mean().item():.1f}"])
    return out


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

    gates = []
    for t_all, t_hi in GATE:
        gates.append(vs_curve(f"t_all {t_all:g}, t_hi {t_hi:g}", *point(BlockGate(t_all, t_hi))))
        print(*gates[-1], flush=True)
    gates_checked = [vs_curve(f"t_all {t_all:g}, t_hi {t_hi:g}", *point(BlockGate(t_all, t_hi), check), ck_curve)
                     for t_all, t_hi in GATE_CHECK]
    print(*gates_checked, sep="\n", flush=True)
    linear = [vs_curve(f"beta {beta:g}, tau {tau:g}", *point(LinearGate(beta, tau))) for beta, tau in LINEAR]
    print(*linear, sep="\n", flush=True)

    train = env.scorer.prompts("train", n=args.train_size, seed=0)
    Xt, yt = collect(env, train, args.probe_tau)
    Xv, yv = collect(env, prompts, args.probe_tau)
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
    vetoes = []
    for name, (probe, _, hidden) in fits.items():
        for tau, g in VETO:
            vetoes.append(vs_curve(f"{name}, tau {tau:g}, g {g:g}", *point(Veto(probe, tau, g, hidden))))
            print(*vetoes[-1], flush=True)

    refs = references(env, prompts)
    oracles = []
    for tau, trust in ORACLES:
        label = ("every right proposal" if tau == 0 else f"threshold {tau:g}'s commits less its wrong ones"
                 + ("" if trust == float("inf") else f" below conf {trust:g}"))
        oracles.append(vs_curve(label, *by_chunk(env, Oracle(refs, tau, trust), prompts)))
        print(*oracles[-1], flush=True)
    recheck = Rechecker(args.probe_tau)
    by_chunk(env, recheck, prompts)
    rechecked = recheck_table(recheck.pairs, refs)
    print(*rechecked, sep="\n", flush=True)

    head = ["rule", "accuracy %", "mean NFE", "threshold curve at that NFE %", "difference (points)"]

    def table(rows, header=head) -> str:
        return tabulate(rows, header, tablefmt="github", disable_numparse=True)

    flags = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        f"`python -m benchmarks.fast_end{flags}` on the {len(prompts)} problems of the {cfg.val_split} split, "
        f"block {env.block} ({cfg.dtype}). The threshold curve at a rule's NFE is linear between the sweep's two "
        "neighbouring points (– : outside the sweep).", "",
        f"The threshold sweep (the grid's taus and {', '.join(map(str, LOWER))} below them):", "",
        table([[f"{t:g}", f"{100 * a:.1f}", f"{n:.2f}"] for t, a, n in sweep], ["tau", "accuracy %", "mean NFE"]), "",
        "Two-stage threshold: tau1 at a block's first step, tau2 after (tau1 = tau2: the threshold rule):", "",
        table(two), "",
        "With the near_conf term as well, conf - tau + beta (near_conf - 1) >= 0 (the rules tried near "
        "threshold 0.5's NFE at B = 16):", "",
        table([r[-1] for r in near]), "",
        f"The one furthest above the curve on validation, measured again on {len(check)} train problems (no rule "
        "here is fitted to them), against the threshold curve there ("
        + "; ".join(f"threshold {t:g}: {100 * a:.1f} % @ {n:.2f}" for t, a, n in ck_sweep) + "):", "",
        table(checked), "",
        "A block-level gate: where every eligible position has conf >= t_all, commit them all; else only those "
        "with conf >= t_hi (the block takes another step anyway, so what it holds back costs no forward of "
        "its own):", "",
        table(gates), "",
        f"Its row with the largest leads on validation (t_hi 0.95, t_all above 0.3) measured again on the "
        f"{len(check)} check problems, against their threshold curve:", "",
        table(gates_checked), "",
        "What a linear path from the features holds of it: commit where conf + beta * (the block's lowest "
        "eligible conf) >= tau:", "",
        table(linear), "",
        f"The correctness probe, fitted on the threshold({args.probe_tau:g}) decodes of {len(train)} train problems "
        f"({len(yt)} position-steps, {100 * (1 - yt.mean().item()):.1f} % wrong proposals); its AUC on the "
        f"validation decodes ({len(yv)} position-steps), at every eligible position and at those the threshold "
        "rule commits:", "",
        table(aucs, ["inputs", "AUC, every eligible position", "AUC, the committed ones"]), "",
        "The probe as a rule: commit where P(correct) >= t:", "",
        table(rules), "",
        "The probe as a veto on the threshold rule: commit where conf >= tau and P(correct) >= g (a low g "
        "holds back only the proposals the probe is surest are wrong):", "",
        table(vetoes), "",
        "A decoder that knew the reference tokens (not a decoder: how far the commit decisions alone could "
        "go on this model). It commits only proposals that are the reference's, or, where nothing "
        "qualifies, the most confident one:", "",
        table(oracles), "",
        f"Does the next forward see a wrong commit? Along threshold({args.probe_tau:g})'s decodes, each "
        "commit that its block's next step follows, and what that step's forward proposes there:", "",
        table(rechecked, ["commits", "count", "another token proposed %", "the reference's proposed %"]), ""])
    out = Path(args.write or f"results/bundled/fast_end_B{args.block}.md")
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
