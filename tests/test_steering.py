"""Issue 23's training options: expert steering in the GRPO loss, Plackett-Luce sampling.

    python -m pytest tests/test_steering.py -q
"""

import itertools
import json
import math
from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from lm_eval_dllm.plackett_luce import pl_logprob, pl_sample
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy, action_logprob, bernoulli_logprob
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.testing import float_tol
from lm_eval_dllm.utils import DLLMError
from train.grpo import GRPOConfig, check_config, commit_rank, step_logprob, train, update
from train.grpo_loss import clipped_pg_loss, expert_mixture, mixed_advantages

from .test_samplers import state


def _orderings(eligible: list[int]):
    """Every outcome of one Plackett-Luce step over `eligible`: a first pick, then an ordered
    subset of the rest (then STOP)."""
    for first in eligible:
        rest = [i for i in eligible if i != first]
        for k in range(len(rest) + 1):
            for seq in itertools.permutations(rest, k):
                yield (first, *seq)


def _rank(seq, L):
    r = torch.full((1, L), -1, dtype=torch.long)
    for j, i in enumerate(seq):
        r[0, i] = j
    return r


def test_plackett_luce_probabilities_sum_to_one_over_all_orderings():
    torch.manual_seed(0)
    L, eligible = 5, [0, 2, 3]  # 3 eligible positions: 3 firsts x 5 ordered tails = 15 outcomes
    logits = torch.randn(1, L) * 2
    elig = torch.zeros(1, L, dtype=torch.bool)
    elig[0, eligible] = True
    for stop in (-1.0, 0.0, 2.5):
        probs = {seq: math.exp(pl_logprob(logits, _rank(seq, L), elig, stop).item())
                 for seq in _orderings(eligible)}
        assert len(probs) == 15
        # 15 probabilities, each exp of a sum of log-softmaxes over at most L + 1 items, summed: float32
        # rounding of at most 15 * (L + 1) terms on a total of 1
        assert sum(probs.values()) == pytest.approx(1.0, abs=float_tol(1.0, 15 * (L + 1)))
    # by hand, one outcome: first 2, then 0, then STOP
    u = logits[0]
    e = lambda *ix: sum(math.exp(u[i]) for i in ix)  # noqa: E731
    s = math.exp(0.0)
    want = e(2) / e(0, 2, 3) * e(0) / (e(0, 3) + s) * s / (e(3) + s)
    assert probs_at(logits, (2, 0), elig, L, 0.0) == pytest.approx(want, rel=1e-5)


def probs_at(logits, seq, elig, L, stop):
    return math.exp(pl_logprob(logits, _rank(seq, L), elig, stop).item())


def test_plackett_luce_sampling_draws_what_the_logprob_says():
    torch.manual_seed(1)
    L, eligible = 6, [1, 2, 4]
    logits = torch.tensor([[0.0, 1.2, -0.5, 0.0, 0.4, 0.0]])
    elig = torch.zeros(1, L, dtype=torch.bool)
    elig[0, eligible] = True
    n = 40_000
    ranks = pl_sample(logits.expand(n, L), elig.expand(n, L), 0.2, torch.rand(n, 2 * L + 1))
    assert ((ranks >= 0) <= elig).all() and ((ranks == 0).sum(-1) == 1).all()  # one first pick, eligible only
    seen = Counter(tuple(sorted((i for i in range(L) if r[i] >= 0), key=lambda i: r[i])) for r in ranks.tolist())
    for seq in _orderings(eligible):
        p = probs_at(logits, seq, elig, L, 0.2)
        assert seen[seq] / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-3), seq


def test_pl_mode_of_the_learned_sampler_commits_by_its_draw():
    pol = UnmaskPolicy(PolicyConfig(init="threshold", sampling="pl"))
    s = LearnedSampler(LearnedSampler.Config(mode="pl"), policy=pol)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        masked = torch.rand(3, 48, generator=g) < 0.7
        st = state(torch.rand(3, 48, generator=g), masked, block=(8, 24))
        act = s.select(st)
        a = act.commit
        assert act.rank is not None and torch.equal(a, act.rank >= 0)  # the commits are the ranked positions
        assert not (a & ~st.eligible).any() and (a.sum(-1)[st.eligible.any(-1)] >= 1).all()
    with pytest.raises(DLLMError, match="mode='plx'; valid: sample, greedy, pl"):
        LearnedSampler.Config(mode="plx")


def test_expert_advantages_share_the_group_baseline():
    pol_r = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # 2 prompts x G = 2
    ex_r = torch.tensor([[1.0], [0.2]])  # E = 1 expert rollout each
    a_pol, a_ex = mixed_advantages(pol_r, ex_r)
    assert torch.allclose(a_pol, torch.tensor([[1 / 3, -2 / 3], [0.1, 0.1]]))
    assert torch.allclose(a_ex, torch.tensor([[1 / 3], [-0.2]]))


def test_expert_rollouts_enter_the_loss_as_draws_of_the_mixture():
    """A hand-made group: G = 2 policy rollouts and E = 1 expert rollout of one prompt, one step
    each. The expert's term uses log(G/(G+E) pi + 1/(G+E)) for the new and the old probability."""
    G, E = 2, 1
    p = torch.tensor([0.5, 0.2, 0.25])  # the policy's probability of each rollout's action
    assert torch.allclose(expert_mixture(p.log(), G, E).exp(), 2 / 3 * p + 1 / 3)
    logp = p.log().clone().requires_grad_(True)
    adv = torch.tensor([1 / 3, -2 / 3, 1 / 3])
    mixed = torch.cat([logp[:2], expert_mixture(logp[2:], G, E)])
    loss = clipped_pg_loss(mixed, mixed.detach(), adv, 0.5)
    loss.backward()
    # ratio 1: loss = -mean(adv); d/dlogp of the expert term is damped by the mixture's weight on pi
    w = (2 / 3 * 0.25) / (2 / 3 * 0.25 + 1 / 3)
    assert torch.allclose(logp.grad, -adv / 3 * torch.tensor([1.0, 1.0, w]))


def test_update_scores_expert_rows_by_the_mixture():
    torch.manual_seed(0)
    pol = UnmaskPolicy(PolicyConfig())
    N, L = 6, 48
    batch = {"inputs": (torch.rand(N, L, len(pol.cfg.features)), torch.rand(N)),
             "action": torch.rand(N, L) < 0.3, "eligible": torch.ones(N, L, dtype=torch.bool),
             "row": torch.tensor([0, 1, 2, 3, 4, 5])}
    cfg = GRPOConfig(group=4, expert_tau="0.9,0.7")
    with torch.no_grad():
        plain = bernoulli_logprob(pol(*batch["inputs"]), batch["action"], batch["eligible"])
        got = step_logprob(pol, pol, batch, cfg, n_policy=4)
    assert torch.equal(got[:4], plain[:4])
    assert torch.allclose(got[4:], expert_mixture(plain[4:], 4, 2))
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses = update(pol, pol, opt, sched, batch, torch.tensor([0.5, -0.5, 0.1, -0.1, 0.3, 0.2]), cfg,
                    Accelerator(cpu=True), n_policy=4)
    assert len(losses) == cfg.inner_steps and all(math.isfinite(x) for x in losses)


def test_an_unordered_experts_commits_are_ranked_by_confidence():
    from lm_eval_dllm.decode import StepRecord

    conf = torch.tensor([[0.3, 0.9, 0.5, 0.95]])
    act = torch.tensor([[True, True, False, True]])
    r = StepRecord(rows=torch.tensor([0]), conf=conf, margin=conf, entropy=conf, masked=act | True,
                   eligible=torch.ones(1, 4, dtype=torch.bool), action=act, block=0, num_blocks=1, step=0)
    assert commit_rank(r).tolist() == [[2, 1, -1, 0]]
    pcfg = PolicyConfig(features=("conf",), sampling="pl")
    lp = action_logprob(pcfg, torch.zeros(1, 4), act, commit_rank(r), r.eligible)
    expected = math.log(1 / 4 * 1 / 4 * 1 / 3 * 1 / 2)
    # float32: four factors, each a log-sum-exp over at most five logits (four positions and the stop)
    tol = 4 * 5 * torch.finfo(torch.float32).eps * (abs(expected) + math.log(5))
    assert lp.item() == pytest.approx(expected, abs=tol)


def test_bad_expert_and_sampling_flags_are_one_line_errors(tmp_path):
    for kw, msg in (({"expert_tau": "0.9,abc"}, "--expert-tau '0.9,abc'; valid: comma-separated thresholds"),
                    ({"expert_tau": "1.5"}, "--expert-tau '1.5'; valid"),
                    ({"sampling": "dpls"}, "--sampling 'dpls'; valid: bernoulli, pl")):
        with pytest.raises(DLLMError, match=msg):
            check_config(GRPOConfig(out=str(tmp_path / "x"), **kw), resume=False, overwrite=False)


def test_a_steered_plackett_luce_run_logs_its_experts_and_records_its_sampling(tmp_path, monkeypatch, task_manager):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lm_eval_dllm.reward.TaskManager", lambda *a, **k: task_manager)  # the session's index
    out = tmp_path / "run"
    cfg = GRPOConfig(task="modchain", block=48, steps=1, prompts_per_step=2, group=2, val_every=1, val_size=4,
                     expert_tau="0.9,0.5", sampling="pl", init="threshold", dtype="bfloat16", device="cpu",
                     out=str(out))
    train(cfg, resume=False)
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert set(rec["expert"]) == {"0.9", "0.5"} and "expert_advantage" in rec
    assert all(0 <= v["accuracy"] <= 1 and v["nfe"] >= 1 for v in rec["expert"].values())
    meta = json.loads((out / "best" / "policy.json").read_text())
    assert meta["config"]["sampling"] == "pl" and "--expert-tau 0.9,0.5" in meta["card"]["command"]
