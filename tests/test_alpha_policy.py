"""One policy for the whole accuracy-speed curve: alpha as a policy input (issue 32).

    python -m pytest tests/test_alpha_policy.py -q
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
import math
from types import SimpleNamespace

import pytest
import torch

from lm_eval_dllm.policy import DEFAULT_FEATURES, NEAR, PolicyConfig, UnmaskPolicy, build_features, build_policy, update_card
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.utils import DLLMError
from results.alpha_map import (NEW, SHARP, Point, bisect_at, choose_alpha, fresh_prompts, heuristic_settings,
                               log_match_chance, matches, paired, refine, solved_by_one)
from results.grid import ALPHAS, Grid, alphas_for, policy_card, swept_alphas
from results.report import Row, targets
from lm_eval_dllm.reward import log_reward, reward
from train.grpo import GRPOConfig, check_config, draw_alphas, stack_steps, start_from, val_alphas
from train.grpo_loss import group_advantages, relative_advantages

from .test_samplers import state

RANGE = [0.25, 64.0]


def _canvas(b=3, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(b, L, generator=g)
    masked = torch.rand(b, L, generator=g) < 0.8
    return conf, masked


def test_a_fresh_alpha_input_leaves_the_source_policy_unchanged_at_alpha_1(tmp_path):
    """--init-from a policy of one alpha: the alpha input starts at zero effect at alpha 1 (so the
    run starts as that policy) and, at init, a larger alpha lowers the threshold (higher logits)."""
    src = UnmaskPolicy(PolicyConfig(init="threshold", skip_gain=20.0))
    torch.nn.init.normal_(src.out.weight, std=0.1)
    src.save(tmp_path / "src")
    run = build_policy(PolicyConfig(init="threshold", skip_gain=20.0, alpha_range=RANGE))
    start_from(run, str(tmp_path / "src"))
    conf, masked = _canvas()
    args = (conf, conf / 2, 1 - conf, masked, masked)
    base = src.logits_for(*args)
    torch.testing.assert_close(run.logits_for(*args, alpha=1.0), base, rtol=0, atol=0)
    # gain 20 x alpha_code(16) = 1 x alpha_shift 0.15: +3 logits, -3 at alpha 1/16
    torch.testing.assert_close(run.logits_for(*args, alpha=16.0), base + 3.0, rtol=0, atol=1e-4)
    torch.testing.assert_close(run.logits_for(*args, alpha=1 / 16), base - 3.0, rtol=0, atol=1e-4)
    # one alpha per row
    per_row = run.logits_for(*args, alpha=torch.tensor([1.0, 16.0, 1 / 16]))
    torch.testing.assert_close(per_row, base + torch.tensor([[0.0], [3.0], [-3.0]]), rtol=0, atol=1e-4)


def test_the_local_features_read_the_window_just_before_each_position():
    """near / near_conf, recomputed position by position: the share of the NEAR positions before it
    that are masked, and the lowest confidence among those (1 where none is); nothing before the start."""
    conf, masked = _canvas(b=2, L=3 * NEAR)
    got = build_features(("near", "near_conf"), conf, conf, conf, masked, masked)
    for r in range(2):
        for i in range(3 * NEAR):
            win = [j for j in range(i - NEAR, i) if j >= 0 and masked[r, j]]
            assert got[r, i, 0].item() == pytest.approx(len(win) / NEAR, abs=0)
            assert got[r, i, 1].item() == (min(conf[r, j].item() for j in win) if win else 1.0)
    assert got[:, 0].tolist() == [[0.0, 1.0]] * 2  # the first position has nothing before it


def test_init_from_a_policy_with_fewer_features_starts_as_that_policy(tmp_path, caplog):
    """--features adding near,near_conf to a trained policy: the new features' input weights start at
    zero, so the wider run computes the source's logits at every alpha, whatever the new features hold."""
    src = UnmaskPolicy(PolicyConfig(init="threshold", skip_gain=20.0, alpha_range=RANGE))
    for name in ("inp.weight", "skip.weight", "alpha_skip.weight", "out.weight"):
        torch.nn.init.normal_(src.get_parameter(name), std=0.3)
    src.save(tmp_path / "src")
    wide = ("near",) + DEFAULT_FEATURES[::-1] + ("near_conf",)  # new ones around, the old in another order
    run = build_policy(PolicyConfig(init="threshold", skip_gain=20.0, alpha_range=RANGE, features=wide))
    with caplog.at_level("INFO"):
        start_from(run, str(tmp_path / "src"))
    assert "features near,near_conf are new to" in caplog.text
    conf, masked = _canvas()
    args = (conf, conf / 2, 1 - conf, masked, masked)
    for alpha in (RANGE[0], 1.0, RANGE[1]):
        base = src.logits_for(*args, alpha=alpha)
        # the same float32 sums over the input layers' columns in another order and length: a few
        # units of float32 rounding of the largest logit
        torch.testing.assert_close(run.logits_for(*args, alpha=alpha), base, rtol=0,
                                   atol=32 * torch.finfo(torch.float32).eps * base.abs().max().item())
    sd = run.state_dict()
    assert sd["inp.weight"][:, [0, len(wide) - 1]].abs().sum() == 0  # the new features' columns
    with pytest.raises(DLLMError, match=r"--init-from .* has features="):  # a feature dropped is refused
        start_from(build_policy(PolicyConfig(features=DEFAULT_FEATURES[1:], alpha_range=RANGE)), str(tmp_path / "src"))


def test_the_dependency_aware_start_holds_back_what_follows_an_unsure_masked_token(tmp_path):
    """init_near_conf: the threshold start commits where conf - tau + beta (near_conf - 1) > 0, from scratch
    and, for a policy gaining near_conf, on top of --init-from's weights; bad values are one-line errors."""
    conf = torch.tensor([[0.95, 0.4, 0.95, 0.95] + [0.99] * 8 + [0.95]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    masked[0, 4:12] = False  # position 12's window is all committed: near_conf 1
    args = (conf, conf / 2, 1 - conf, masked, masked)
    near_conf = build_features(("near_conf",), *args)[..., 0]
    pol = UnmaskPolicy(PolicyConfig(features=("conf", "near_conf"), init="threshold", init_tau=0.7,
                                    skip_gain=20.0, init_near_conf=0.5))
    torch.nn.init.zeros_(pol.out.weight)  # the block's share of the logit: its output bias alone
    want = 20.0 * (conf - 0.7 + 0.5 * (near_conf - 1))
    tol = 8 * torch.finfo(torch.float32).eps * 20.0  # a few roundings of terms of size <= 20
    torch.testing.assert_close(pol.logits_for(*args), want, rtol=0, atol=tol)
    commit = pol.logits_for(*args)[0] > 0
    # 0.95 with nothing before it commits; the unsure 0.4 waits, and so does the 0.95 after it (0.95 - 0.7
    # + 0.5 (0.4 - 1) < 0; the plain threshold rule at 0.7 would commit it); 0.95 after 8 committed commits
    assert commit[[0, 1, 2, 12]].tolist() == [True, False, False, True]
    src = UnmaskPolicy(PolicyConfig(features=("conf",), init="threshold", init_tau=0.7, skip_gain=20.0))
    torch.nn.init.normal_(src.out.weight, std=0.1)
    src.save(tmp_path / "src")
    run = build_policy(PolicyConfig(features=("conf", "near_conf"), init="threshold", skip_gain=20.0, init_near_conf=0.5))
    start_from(run, str(tmp_path / "src"))
    base = src.logits_for(*args)
    torch.testing.assert_close(run.logits_for(*args), base + 10.0 * (near_conf - 1), rtol=0,
                               atol=8 * torch.finfo(torch.float32).eps * base.abs().max().item())
    # alpha-conditioned: the full term at alpha 1, none at the top of the range, half of it halfway (in log alpha)
    fade = UnmaskPolicy(PolicyConfig(features=("conf", "near_conf"), init="threshold", init_tau=0.7, skip_gain=20.0,
                                     init_near_conf=0.5, alpha_range=[0.25, 16.0]))
    plain = UnmaskPolicy(replace(fade.cfg, init_near_conf=0.0))
    plain.load_state_dict({k: v for k, v in fade.state_dict().items() if not k.endswith("skip.weight")
                           and not k.endswith("skip.bias")}, strict=False)
    for alpha, share in ((1.0, 1.0), (4.0, 0.5), (16.0, 0.0)):
        torch.testing.assert_close(fade.logits_for(*args, alpha=alpha) - plain.logits_for(*args, alpha=alpha),
                                   share * 10.0 * (near_conf - 1), rtol=0, atol=tol * 4)
    with pytest.raises(DLLMError, match=r"^policy init_near_conf=0.5 without the near_conf feature; valid:"):
        PolicyConfig(init_near_conf=0.5)
    with pytest.raises(DLLMError, match=r"^--init-near-conf 0.5; valid: 0 without feature near_conf, or --features "):
        check_config(GRPOConfig(out=str(tmp_path / "r"), init="threshold", init_near_conf=0.5), resume=False, overwrite=False)
    with pytest.raises(DLLMError, match=r"^--init-near-conf -1.0; valid: a finite number >= 0"):
        check_config(GRPOConfig(out=str(tmp_path / "r"), init="threshold", init_near_conf=-1.0,
                                features=",".join(DEFAULT_FEATURES + ("near_conf",))), resume=False, overwrite=False)


def test_the_benchmarks_hand_rule_is_the_threshold_rule_plus_the_term():
    """benchmarks.dependency_start's hand rule: conf - tau + beta (near_conf - 1), times the sharpness;
    at beta 0 it commits exactly where the threshold rule does."""
    from benchmarks.dependency_start import hand_rule
    src = UnmaskPolicy(PolicyConfig(block=8, gen_length=12))
    conf, masked = _canvas()
    args = (conf, conf / 2, 1 - conf, masked, masked)
    near_conf = build_features(("near_conf",), *args)[..., 0]
    for beta in (0.0, 0.5):
        got = hand_rule(src, 0.7, beta).logits_for(*args)
        torch.testing.assert_close(got, 20.0 * (conf - 0.7 + beta * (near_conf - 1)), rtol=0,
                                   atol=8 * torch.finfo(torch.float32).eps * 20.0)
    assert torch.equal(hand_rule(src, 0.7, 0.0).logits_for(*args) > 0, conf > 0.7)


def test_the_benchmarks_near_window_is_for_the_hand_rule_alone():
    """--near-window changes what near_conf reads, so it may not feed alpha maps of policies trained
    with the default window; both refusals are one line, before anything decodes."""
    from benchmarks.dependency_start import main
    with pytest.raises(SystemExit, match=r"^error: --near-window 16 with alpha maps; valid: --hand-only, or "
                                         r"--near-window 8 \(the window the policies were trained with\)$"):
        main(["--block", "48", "--near-window", "16"])
    with pytest.raises(SystemExit, match=r"^error: --near-window 0; valid: 1 to 4096 positions$"):
        main(["--block", "48", "--near-window", "0", "--hand-only"])


def test_the_alpha_embedding_conditions_both_architectures():
    """Once trained (here: its zero-initialised layers set at random), the alpha embedding changes
    the logits, through our adaLN and through the paper network's conditioning seam alike."""
    conf, masked = _canvas()
    s = SimpleNamespace(conf=conf, margin=conf / 2, entropy=1 - conf, masked=masked, eligible=masked,
                        top=conf[..., None], steps=torch.zeros(3), block_start=0, block_size=12)
    for cfg in (PolicyConfig(alpha_range=RANGE, alpha_shift=0.0), PolicyConfig(arch="dit_confidence", alpha_range=RANGE)):
        pol = build_policy(cfg)
        same = pol.step_logits(s, alpha=1.0)
        torch.testing.assert_close(pol.step_logits(s, alpha=8.0), same)  # zero-initialised: no effect yet
        with torch.no_grad():  # as training leaves them: the zero-initialised layers (adaLN, alpha's last) nonzero
            for w in pol.parameters():
                if not w.any():
                    w.normal_(std=0.3)
        assert not torch.allclose(pol.step_logits(s, alpha=8.0), pol.step_logits(s, alpha=1.0))


def test_alpha_errors_are_one_line():
    conf, masked = _canvas()
    args = (conf, conf, conf, masked, masked)
    with pytest.raises(DLLMError, match="trained at one alpha; valid: an alpha-conditioned"):
        UnmaskPolicy(PolicyConfig()).logits_for(*args, alpha=2.0)
    with pytest.raises(DLLMError, match=r"alpha-conditioned \(trained over alpha \[0.25, 64.0\]\)"):
        build_policy(PolicyConfig(alpha_range=RANGE)).logits_for(*args)
    for bad in ([4, 2], [0, 1], [1], "1,2", [1, float("inf")]):
        with pytest.raises(DLLMError, match=r"alpha_range=.*valid: \[lo, hi\] with 0 < lo < hi"):
            PolicyConfig(alpha_range=bad)


def _sampler(policy, card=None, **params):
    s = make_sampler("learned", {"mode": "greedy", **params})
    policy.card = card or {}
    s.attach(policy, 48, 48)
    return s


def test_the_sampler_takes_alpha_as_a_number_a_named_point_or_the_cards():
    pol = build_policy(PolicyConfig(alpha_range=RANGE))
    card = {"operating_points": {"fast": {"alpha": 16.0}},
            "recommended": {"mode": "greedy", "cutoff": 0.5, "alpha": 2.0}}
    assert _sampler(pol, alpha="8").settings["alpha"] == 8.0
    assert _sampler(pol, card, alpha="fast").settings["alpha"] == 16.0
    assert _sampler(pol, card).settings["alpha"] == 2.0  # the card's recommended
    s = _sampler(pol)  # no card: the middle of the range, said so
    assert s.settings["alpha"] == 4.0 and s.settings["source"]["alpha"] == "the middle of the trained range"
    cases = [({"alpha": "128"}, r"alpha=128 is outside the range .* valid: a number in \[0.25, 64\]"),
             ({"alpha": "slow"}, r"alpha='slow' is not an operating point of this policy; valid: fast, or a number"),
             ({"alpha": "-1"}, r"alpha='-1'; valid: a number > 0 or the name of an operating point")]
    for params, msg in cases:
        with pytest.raises(DLLMError, match=msg):
            _sampler(pol, card, **params)
    with pytest.raises(DLLMError, match="alpha=2 for a policy trained at one alpha"):
        _sampler(UnmaskPolicy(PolicyConfig()), alpha="2")
    # the alpha in use reaches the policy: a larger alpha commits more at the same step
    st = state(torch.linspace(0.5, 0.99, 48)[None].repeat(2, 1))
    pol = build_policy(PolicyConfig(alpha_range=RANGE, init="threshold", skip_gain=20.0))  # tau 0.9 at alpha 1
    few, many = (_sampler(pol, alpha=a).select(st).commit.sum() for a in ("0.25", "64"))
    assert many > few


def test_training_draws_one_alpha_per_group_and_rewards_with_it():
    cfg = GRPOConfig(alpha_range="0.25,64", seed=3)
    a = draw_alphas(cfg, step=5, n_groups=4)
    assert a == draw_alphas(cfg, step=5, n_groups=4) and len(set(a)) == 4
    assert all(0.25 <= x <= 64 for x in a)
    assert draw_alphas(cfg, 5, 2, rank=1) == a[2:]  # process 1 of 2 draws what one process drew for its groups
    assert val_alphas([0.25, 64.0]) == [0.25, 1.0, 4.0, 16.0, 64.0]
    for bad in ("64,0.25", "0,4", "x", "1,2,3"):
        with pytest.raises(DLLMError, match=r"--alpha-range .*; valid: LO,HI with 0 < LO < HI"):
            check_config(GRPOConfig(alpha_range=bad, out="/nonexistent/x"), False, False)


def test_experts_are_rewarded_and_replayed_at_their_groups_alpha(tmp_path, monkeypatch):
    """Expert steering with --alpha-range: each prompt's threshold rollouts take its group's alpha
    in the reward and in the replay; relative advantages run through the same step."""
    import train.grpo as grpo
    from tests.grpo_smoke import run_one_step

    calls, stacked = [], []
    rollout, stack = grpo.Env.rollout, grpo.stack_steps

    def spy_rollout(self, policy, prompts, seeds, *a, **kw):
        ro = rollout(self, policy, prompts, seeds, *a, **kw)
        if kw.get("record", True):
            calls.append((kw.get("sampler") is not None, ro.alphas.tolist(), ro.rewards, ro.nfes, ro.scores))
        return ro

    monkeypatch.setattr(grpo.Env, "rollout", spy_rollout)
    monkeypatch.setattr(grpo, "stack_steps", lambda traj, pol, alphas=None: stacked.append(alphas) or stack(traj, pol, alphas))
    run_one_step(tmp_path, "modchain", "--alpha-range", "0.25,64", "--expert-tau", "0.5,0.99", "--adv-norm", "relative")
    (pol_expert, pol_alphas, *_), *experts = calls
    assert not pol_expert and len(experts) == 2 and all(e[0] for e in experts)
    assert len(set(pol_alphas)) == 2 and pol_alphas[0] == pol_alphas[1]  # 2 prompts, a group of 2 each
    for _, alphas, rewards, nfes, scores in experts:
        assert alphas == pol_alphas[::2]
        assert rewards.tolist() == pytest.approx([reward(float(s), int(n), 32, a) for s, n, a in zip(scores, nfes, alphas)])
    assert stacked[0].tolist() == pytest.approx(pol_alphas + pol_alphas[::2] * 2)


def test_each_replayed_step_carries_its_rollouts_alpha():
    pol = build_policy(PolicyConfig(alpha_range=RANGE))
    conf, masked = _canvas(b=3)
    rec = SimpleNamespace(conf=conf, margin=conf, entropy=conf, masked=masked, eligible=masked,
                          action=masked & (conf > 0.5), rows=torch.tensor([2, 0, 1]), rank=None)
    batch = stack_steps([rec], pol, torch.tensor([1.0, 4.0, 16.0]))
    assert batch["inputs"][-1].tolist() == [16.0, 1.0, 4.0]


def test_an_alpha_policy_sweeps_alpha_in_the_grid(tmp_path, monkeypatch):
    import policies

    monkeypatch.setattr(policies, "HERE", tmp_path)
    pol = build_policy(PolicyConfig(alpha_range=[1.0, 16.0], base_model="bundled:tiny-modchain", task="modchain",
                                    block=48, gen_length=48))
    pol.save(tmp_path / "a48", {"alpha_range": [1.0, 16.0]})
    learned = [s for s in Grid(tasks=["modchain"], blocks=[48], samplers=["learned"]).settings()]
    assert [dict(s.params) for s in learned] == [{}] + [{"alpha": a} for a in (1.0, 1.4142, 2.0, 2.8284, 4.0, 5.6569,
                                                                              8.0, 11.3137, 16.0)]
    assert alphas_for([0.0625, 2048]) == list(ALPHAS) and len(ALPHAS) == 31 and ALPHAS[6] == 0.5
    # an alpha the card's map chose between two grid alphas is swept too, so the test split runs it
    update_card(tmp_path / "a48", alpha_map={"threshold(tau=0.9)": {"alpha": 1.0905}},
                operating_points={"fast": {"alpha": 16.0}})
    assert swept_alphas(policy_card(tmp_path / "a48"))[:3] == [1.0, 1.0905, 1.4142]
    learned = [s for s in Grid(tasks=["modchain"], blocks=[48], samplers=["learned"]).settings()]
    assert {"alpha": 1.0905} in [dict(s.params) for s in learned] and len(learned) == 11


def _point(label, acc, nfe, n=100):
    right = round(acc * n)
    return Point(label, tuple([1.0] * right + [0.0] * (n - right)), tuple(nfe + (-1) ** i for i in range(n)))


def test_the_map_picks_the_alpha_most_likely_to_match_again():
    curve = {1.0: _point("a1", 0.99, 6), 4.0: _point("a4", 0.95, 5), 16.0: _point("a16", 0.80, 4)}
    h = _point("threshold", 0.90, 5.5)
    assert matches(curve[4.0], h) and not matches(curve[1.0], h) and not matches(curve[16.0], h)
    assert choose_alpha(curve, h) == 4.0
    assert log_match_chance(curve[4.0], h) > math.log(0.9) > math.log(0.1) > log_match_chance(curve[16.0], h)
    # nothing matches: the closest miss, 3.4 SE short in accuracy rather than 50 SE over in NFE
    # (both chances underflow a float; their logs rank them)
    assert choose_alpha(curve, _point("eb", 0.99, 4.5)) == 16.0
    # paired: 92 solved of 100 against 90 is surer when the 92 hold the 90 than when they miss 10 of them
    q = Point("q", tuple([1.0] * 90 + [0.0] * 10), (5,) * 100)
    superset = Point("p", tuple([1.0] * 92 + [0.0] * 8), (4,) * 100)
    elsewhere = Point("p", tuple([0.0] * 8 + [1.0] * 92), (4,) * 100)
    assert log_match_chance(superset, q) > log_match_chance(elsewhere, q) + 0.2
    assert solved_by_one(superset, q) == {"heuristic": 0, "learned": 2}  # what the map's card records
    assert solved_by_one(elsewhere, q) == {"heuristic": 8, "learned": 10}
    assert math.exp(log_match_chance(superset, q)) == pytest.approx(0.5 * math.erfc(-(0.02 / math.sqrt(2 * 0.0198 / 100))
                                                                                    / math.sqrt(2)), rel=1e-3)
    # both solve every problem: a tie validation cannot break; the smaller alpha, the more careful
    top = {0.125: _point("a", 1.0, 20), 0.25: _point("b", 1.0, 12), 1.0: _point("c", 0.99, 5)}
    assert choose_alpha(top, _point("confidence", 1.0, 48)) == 0.125
    labels = [s.label for s in heuristic_settings(48)]
    assert "threshold(tau=0.9)" in labels and "confidence(k=1)" in labels and len(labels) == 17
    assert "confidence(k=1)" not in [s.label for s in heuristic_settings(16)]  # ends only, as the grid


def test_relative_advantages_weigh_every_alpha_alike_and_never_underflow():
    L = 48
    assert log_reward(1.0, 5, L, 3.0) == pytest.approx(math.log(reward(1.0, 5, L, 3.0)), rel=1e-12)
    assert log_reward(0.0, 5, L, 3.0) == -math.inf
    assert reward(1.0, 20, L, 2048.0) == 0.0 and log_reward(1.0, 20, L, 2048.0) > -1100  # float64 underflows
    # a group at alpha 1 and the same outcomes at alpha 2048: the paper's (mean-centred) advantages
    # differ by ~60 orders of magnitude, the relative ones are r / mean - 1 of each
    outcomes = [(1.0, 4), (1.0, 5), (0.0, 4), (1.0, 6)]
    for alpha in (1.0, 2048.0):
        logs = torch.tensor([[log_reward(s, n, L, alpha) for s, n in outcomes]], dtype=torch.float64)
        a = relative_advantages(logs)[0]
        r = torch.tensor([reward(s, n, L, alpha) for s, n in outcomes], dtype=torch.float64)
        if alpha == 1.0:
            assert torch.allclose(a, r / r.mean() - 1, rtol=0, atol=1e-12)
            assert torch.allclose(group_advantages(r, 4), r - r.mean())
        assert abs(float(a.sum())) < 1e-9 and a[2] == -1 and a[0] > a[1] >= a[3] and a[0] > 0
        assert torch.isfinite(a).all()
    assert (relative_advantages(torch.full((2, 3), -math.inf, dtype=torch.float64)) == 0).all()  # nothing solved


def _row(sampler, params, acc, nfe, block=48):
    return Row("modchain", sampler, tuple(sorted(params.items())), block, 48, acc, nfe, 1.0, 0.01, 1000,
               stderr=math.sqrt(acc * (1 - acc) / 1000))


def test_the_report_checks_the_map_on_the_split_it_reports():
    rows = [_row("threshold", {"tau": 0.9}, 0.90, 4.0), _row("threshold", {"tau": 0.5}, 0.60, 3.0),
            _row("learned", {}, 0.97, 4.0), _row("learned", {"alpha": 2.0}, 0.95, 3.9),
            _row("learned", {"alpha": 16.0}, 0.58, 2.9)]
    amap = {"threshold(tau=0.9)": {"alpha": 2.0}, "threshold(tau=0.5)": {"alpha": 16.0}}
    text = targets(rows, {48: ("a48", amap)})
    assert ("the alpha map of `a48` (one alpha per heuristic setting, chosen on validation, on its card): "
            "1 of 2 matched on this split; missed: threshold(tau=0.5) 60.0 % @ 3.00 by alpha 16 58.0 % @ 2.90") in text
    assert "best: learned 97.0 ± 0.5 % (1 SE) @ 4.00" in text


def test_the_map_bisects_toward_each_settings_nfe_where_the_curve_jumps():
    """B = 16's curve once jumped from 4.9 NFE (alpha 0.1768) to 22 (alpha 0.125): no grid alpha was
    more careful than 4.9 NFE at a setting's 18. Bisecting toward 18 finds points in the jump, and the
    map then takes the most careful one that spends less. Where the curve is smooth nothing is added."""
    def at(a):  # 98 % above alpha 0.17, 100 % below; a cliff from about 5 NFE to 40 at alpha 0.133
        return _point(f"a{a}", 0.98 if a > 0.17 else 1.0, 40.0 if a < 0.133 else 4.9 + 10 * (0.1768 - a), n=1000)

    curve = {a: at(a) for a in (0.125, 0.1768, 0.25)}
    h = _point("confidence(k=2)", 1.0, 18.0, n=1000)
    assert choose_alpha(curve, h) == 0.1768  # before: the grid's best is 2 points short
    decoded = []
    refine(curve, {"confidence(k=2)": h}, lambda a: decoded.append(a) or at(a))
    assert decoded == [0.1487, 0.1363, 0.1305]  # into the cliff, to a sixteenth of an octave
    assert choose_alpha(curve, h) == 0.1363 and matches(curve[0.1363], h)
    # nothing to split: every alpha spends more; the smallest already spends no more; smooth (4.9 to 4.17 NFE)
    assert bisect_at(curve, 4.0) is None and bisect_at(curve, 50.0) is None and bisect_at(curve, 4.5) is None
    # a gap is split to a sixteenth of an octave at most, however many settings fall in it
    refine(curve, {f"k={k}": _point("c", 1.0, nfe, n=1000) for k, nfe in enumerate((17.9, 18.1, 4.5))}, at)
    assert sorted(curve) == [0.125, 0.1305, 0.1363, 0.1487, 0.1768, 0.25]


def _noisy(label, acc, nfe, n, seed):
    """A point whose per-problem NFE is its mean +- 1 at random (`seed`): alphas of one policy share a
    seed (the same problems are long for each), a heuristic has its own."""
    rng, right = random.Random(seed), round(acc * n)
    return Point(label, tuple([1.0] * right + [0.0] * (n - right)), tuple(nfe + rng.choice((-1.0, 1.0)) for _ in range(n)))


def test_a_map_on_many_problems_splits_a_steep_smooth_stretch_toward_the_settings_nfe():
    """Full diffusion's threshold 0.5 sat between alphas 128 (0.05 NFE cheaper) and 90.5 (0.1 dearer),
    on a smooth curve `refine` left alone. With SHARP x NEW problems (--fresh) the gap toward it is split
    until its ends differ by less than two standard errors of a new sample's NFE difference; with
    validation's 500 it stays as the grid left it (a pick among close alphas would be luck)."""
    def curve_on(n):
        at = lambda a: _noisy(f"a{a}", 0.6, 3.0 - 0.3 * math.log2(a / 64), n, seed=0)  # 2.85 at 90.5, 2.7 at 128
        return at, {a: at(a) for a in (64.0, 90.5097, 128.0)}, _noisy("threshold(tau=0.5)", 0.6, 2.75, n, seed=1)

    at, curve, h = curve_on(SHARP * NEW)
    resolve = 2 * paired(curve[128.0].nfes, h.nfes)[1] * math.sqrt(SHARP)  # about 2 * sqrt(2 / NEW)
    assert 0.075 < resolve < 0.15  # the grid's gap is wider than a new sample can tell apart; a quarter octave is not
    decoded = []
    refine(curve, {"t": h}, lambda a: decoded.append(a) or at(a), NEW)
    assert decoded == [round(math.sqrt(90.5097 * 128), 4)]  # one bisection: 2.775 to 2.7 is within the noise
    assert bisect_at(curve, h.nfe, resolve) is None
    at, curve, h = curve_on(500)
    refine(curve, {"t": h}, lambda a: decoded.append(a) or at(a), 500)  # chances for 500 new: too few to split
    refine(curve, {"t": h}, lambda a: decoded.append(a) or at(a), None)
    assert len(decoded) == 1 and sorted(curve) == [64.0, 90.5097, 128.0]
    # the chance is for a new sample of `new` problems: the estimate's noise here plus that sample's own
    p, q = _noisy("p", 0.62, 2.70, 4000, seed=0), _noisy("q", 0.60, 2.75, 4000, seed=1)
    z = [m / (se * math.sqrt(1 + 4000 / NEW)) for m, se in (paired(p.scores, q.scores), paired(q.nfes, p.nfes))]
    assert log_match_chance(p, q, NEW) == pytest.approx(sum(math.log(0.5 * math.erfc(-x / math.sqrt(2))) for x in z))
    assert log_match_chance(p, q, NEW) < log_match_chance(p, q)  # sure-er of a match on 4,000 new ones


def test_fresh_validation_problems_come_from_the_generator_only():
    with pytest.raises(DLLMError, match=r"^--fresh 10: task 'gsm8k' has no problem generator; valid: --fresh 0"):
        fresh_prompts(None, "gsm8k", 10, 7)
    with pytest.raises(DLLMError, match=r"^--fresh-seed: fresh problems with seed 2: that is a split's seed"):
        fresh_prompts(None, "modchain", 10, 2)
    env = SimpleNamespace(scorer=SimpleNamespace(prompt=lambda d, i: (i, d["question"])))
    got = fresh_prompts(env, "modchain", 3, 7)
    assert [i for i, _ in got] == [10 ** 6, 10 ** 6 + 1, 10 ** 6 + 2]


def test_alpha_map_writes_the_card_that_evaluation_then_uses(tmp_path, monkeypatch):
    """The whole command on a small alpha policy: every heuristic setting of the block gets an alpha from
    the swept ones, the operating points and the recommendation go on the card, and `alpha=fast` then
    runs the alpha the card names."""
    from results.alpha_map import alpha_map

    folder = tmp_path / "pol"
    pol = build_policy(PolicyConfig(alpha_range=[1.0, 4.0], init="threshold", skip_gain=20.0,
                                    base_model="bundled:tiny-modchain", task="modchain", block=16, gen_length=48))
    pol.save(folder, {"alpha_range": [1.0, 4.0], "command": "python -m train.grpo --task modchain --block 16 "
                      "--alpha-range 1,4 --val-size 8 --dtype float32"})
    out = alpha_map(str(folder), batch_size=16, cache_dir=tmp_path / "cache")
    card = json.loads((folder / "policy.json").read_text())["card"]
    assert card["alpha_map"] == out["alpha_map"]
    assert set(card["alpha_map"]) == {s.label for s in heuristic_settings(16)}
    swept = [a for a, _, _ in card["recommended"]["sweep"]]  # the grid's five and any bisections, ascending
    assert set(swept) >= {1.0, 1.4142, 2.0, 2.8284, 4.0} and swept == sorted(swept) and 1.0 <= min(swept)
    assert {m["alpha"] for m in card["alpha_map"].values()} <= set(swept) and max(swept) <= 4.0
    assert set(card["operating_points"]) == {"accurate", "balanced", "fast"}
    assert card["recommended"]["alpha"] == card["operating_points"]["balanced"]["alpha"]
    assert card["recommended"]["n"] == 8
    for label, m in card["alpha_map"].items():  # the accuracy difference is what one solves and the other not
        one, n = m["solved_by_one"], card["recommended"]["n"]
        assert one["learned"] - one["heuristic"] == round(n * (m["learned"][0] - m["heuristic"][0])), label
    summary = card["alpha_map_summary"]
    assert summary["matched_on_validation"] == sum(m["matched"] for m in card["alpha_map"].values())
    assert summary["expected_on_new_problems"] == pytest.approx(sum(m["chance"] for m in card["alpha_map"].values()),
                                                                abs=0.0005 * len(card["alpha_map"]) + 0.005)
    loaded = UnmaskPolicy.load(folder)
    s = make_sampler("learned", {"policy": str(folder), "alpha": "fast"})
    s.attach(loaded, 16, 48)
    assert s.settings["alpha"] == card["operating_points"]["fast"]["alpha"]
    assert s.settings["mode"] == "greedy"
    update_card(folder, alpha_map={})  # the cache makes a rerun read nothing again
    assert alpha_map(str(folder), batch_size=16, cache_dir=tmp_path / "cache", write=False)["alpha_map"] == out["alpha_map"]
    # --fresh: more problems from the generator, recorded on the card; its own cache, the split's points untouched
    sharp = alpha_map(str(folder), batch_size=16, cache_dir=tmp_path / "cache", write=False, fresh=4)
    assert sharp["recommended"]["fresh"] == {"n": 4, "seed": 7} and sharp["recommended"]["n"] == 8
    assert sharp["alpha_map_summary"]["problems"] == 12 == sharp["alpha_map_summary"]["new_problems"]
    assert sharp["recommended"]["command"].endswith("--fresh 4 --fresh-seed 7")
    with pytest.raises(DLLMError, match=r"^--fresh -1; valid: 0 or more problems$"):
        alpha_map(str(folder), cache_dir=tmp_path / "cache", fresh=-1)

    # another policy on the same validation setting decodes its own alphas only: the heuristics' points are shared
    from train.grpo import Env
    other = build_policy(PolicyConfig(alpha_range=[1.0, 4.0], init="threshold", skip_gain=20.0, alpha_shift=0.5,
                                      base_model="bundled:tiny-modchain", task="modchain", block=16, gen_length=48))
    other.save(tmp_path / "other", {"alpha_range": [1.0, 4.0], "command": "python -m train.grpo --task modchain "
                                    "--block 16 --alpha-range 1,4 --val-size 8 --dtype float32"})
    decoded, rollout = [], Env.rollout

    def counting(self, pol, *args, sampler=None, **kw):
        decoded.append(type(sampler).__name__)
        return rollout(self, pol, *args, sampler=sampler, **kw)

    monkeypatch.setattr(Env, "rollout", counting)
    second = alpha_map(str(tmp_path / "other"), batch_size=16, cache_dir=tmp_path / "cache", write=False)
    assert decoded == ["LearnedSampler"] * len(second["recommended"]["sweep"]) and len(decoded) >= 5
    heur = {label: h["heuristic"] for label, h in second["alpha_map"].items()}
    assert heur == {label: h["heuristic"] for label, h in out["alpha_map"].items()}


def test_alpha_map_ranks_several_policies_by_the_expected_count():
    """`python -m results alpha-map --policies A,B,...` (a run's --keep-validated checkpoints) ends with
    the policies ranked, most settings expected to match on new problems first."""
    from results.__main__ import ranking

    def summary(matched, expected):
        return {"alpha_map_summary": {"matched_on_validation": matched, "settings": 17, "expected_on_new_problems": expected}}

    rows = [r for r in ranking({"step-30": summary(15, 12.41), "step-60": summary(14, 13.02),
                                "step-90": summary(16, 11.9)}).splitlines() if r.startswith("| step")]
    assert [r.split("|")[1].strip() for r in rows] == ["step-60", "step-30", "step-90"]
    assert rows[0].split("|")[2].strip() == "14" and rows[0].split("|")[4].strip() == "13.02"


@pytest.mark.parametrize("argv", [["report", "--write", "r.md"], ["alpha-map", "--policies", "a", "--write", "r.md"]])
def test_write_is_refused_but_for_a_ranking_of_several_policies(argv, capsys):
    from results.__main__ import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--write 'r.md' is for alpha-map with --policies A,B,... (two or more)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["recommend", "--policy", "modchain-B8-alphas", "--fresh", "100"],
                                  ["run", "--fresh", "100"], ["report", "--fresh-seed", "9"]])
def test_fresh_is_refused_but_for_alpha_map(argv):
    from results.__main__ import main

    flag = " ".join(argv[-2:])
    with pytest.raises(SystemExit, match=rf"^results: error: {flag} is for alpha-map; valid: leave it out for "
                                         rf"{argv[0]}$"):
        main(argv)
