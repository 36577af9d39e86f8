"""benchmarks.fast_end: its rules, its AUC and its reading of the threshold curve (no decoding here)."""

from pathlib import Path

import pytest
import torch

from benchmarks.fast_end import (INPUTS, BlockGate, LinearGate, Oracle, Rechecker, TwoStage, Veto, auc, first_step, main, on_curve, probe_inputs,
                                 recheck_table)
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.base import StepState
from results.grid import policy_card

ROOT = Path(__file__).resolve().parents[1]


def state(conf, eligible, block_start=0, block_size=4, hidden=None, x0=None, rows=None):
    conf = torch.tensor(conf)
    masked = torch.tensor(eligible)
    return StepState(conf=conf, margin=conf / 2, entropy=1 - conf, masked=masked, eligible=masked.clone(),
                     generators=[], block_start=block_start, block_size=block_size, hidden=hidden,
                     x0=None if x0 is None else torch.tensor(x0), rows=None if rows is None else torch.tensor(rows))


def test_auc_counts_pairs_and_halves_ties():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 0.75
    # a tie with a negative counts half: 0.4 vs 0.4 -> (1 + 0.5 + 2) / 4
    assert auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 0.875
    assert auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])) == 1.0


def test_on_curve_is_linear_between_neighbours_and_none_outside():
    curve = [(4.0, 0.9), (3.0, 0.5), (3.5, 0.8)]  # any order
    assert on_curve(curve, 3.25) == pytest.approx(0.65, abs=4 * torch.finfo(torch.float64).eps)
    assert on_curve(curve, 3.5) == 0.8
    assert on_curve(curve, 2.9) is None and on_curve(curve, 4.1) is None


def test_two_stage_is_the_threshold_rule_at_equal_taus_and_finishes_a_block_in_two_steps_at_tau2_0():
    first = state([[0.95, 0.6, 0.3, 0.1], [0.2, 0.7, 0.55, 0.8]], [[True] * 4, [True] * 4])
    later = state([[0.0, 0.6, 0.3, 0.1], [0.2, 0.7, 0.0, 0.8]], [[False, True, True, True], [True, True, False, True]])
    assert first_step(first).tolist() == [True, True] and first_step(later).tolist() == [False, False]
    for s in (first, later):
        assert torch.equal(TwoStage(0.5, 0.5).select(s), make_sampler("threshold", {"tau": 0.5}).select(s))
    assert torch.equal(TwoStage(0.9, 0.0).select(first), torch.tensor([[True, False, False, False],
                                                                        [False, False, False, True]]))
    assert torch.equal(TwoStage(0.9, 0.0).select(later), later.eligible)
    # near_conf holds back what follows an unsure masked position: 0.55 at position 2 has 0.3 masked just before it
    s = state([[0.95, 0.3, 0.55, 0.2]], [[True] * 4])
    assert TwoStage(0.5, 0.5).select(s).tolist() == [[True, False, True, False]]
    assert TwoStage(0.5, 0.5, beta=0.2).select(s).tolist() == [[True, False, False, False]]  # 0.55-0.5-0.2*0.7 < 0


def test_the_probe_reads_the_policys_inputs_the_first_step_flag_and_optionally_the_hidden_states():
    s = state([[0.9, 0.2, 0.6, 0.4]], [[True] * 4], hidden=torch.randn(1, 4, 3))
    x = probe_inputs(s, False)
    assert x.shape == (1, 4, len(INPUTS) + 1) and (x[..., -1] == 1).all()
    assert torch.equal(x[..., 0], s.conf)
    assert torch.equal(probe_inputs(s, True)[..., len(INPUTS) + 1:], s.hidden)


@pytest.mark.parametrize("args, needle", [(["--train-size", "3"], r"--train-size 3; valid: 10 or more problems"),
                                          (["--check-size", "0"], r"--check-size 0; valid: 10 or more problems"),
                                          (["--probe-tau", "0"], r"--probe-tau 0.0; valid: a number in \(0, 1\]")])
def test_bad_arguments_are_one_line(args, needle):
    with pytest.raises(SystemExit, match=rf"^error: {needle}$"):
        main(["--block", "16", *args])


def test_the_oracle_commits_the_right_proposals_and_else_the_most_confident_one():
    refs = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    # rows 0 and 1 of a chunk that starts at problem 1: their references are refs[1] and refs[2]
    s = state([[0.9, 0.3, 0.6, 0.2], [0.8, 0.7, 0.1, 0.4]], [[True] * 4, [True, True, True, False]],
              x0=[[1, 2, 0, 4], [0, 0, 0, 9]], rows=[0, 1])
    o = Oracle(refs)
    o.offset = 1
    assert o.select(s).tolist() == [[True, True, False, True], [True, False, False, False]]  # row 1: none right
    o.tau = 0.5
    assert o.select(s).tolist() == [[True, False, False, False], [True, False, False, False]]
    o.tau, o.trust = 0.5, 0.6  # a wrong proposal as confident as 0.6 is committed all the same
    assert o.select(s).tolist() == [[True, False, True, False], [True, True, False, False]]


class FixedProbe:
    """A probe whose P(correct) at each position is fixed."""

    def __init__(self, p):
        self.p = torch.tensor(p)

    def logit(self, X):
        return torch.logit(self.p).expand(X.shape[:-1])


def test_the_veto_holds_back_the_threshold_rules_commits_below_g_but_never_all():
    s = state([[0.9, 0.8, 0.6, 0.2]], [[True] * 4])
    veto = Veto(FixedProbe([[0.9, 0.1, 0.5, 0.9]]), tau=0.5, g=0.3, hidden=False)
    assert veto.select(s).tolist() == [[True, False, True, False]]
    every = Veto(FixedProbe([[0.1, 0.1, 0.1, 0.1]]), tau=0.5, g=0.3, hidden=False)
    assert every.select(s).tolist() == [[True, False, False, False]]  # the most confident one stays


def test_the_rechecker_pairs_each_commit_with_its_blocks_next_proposal():
    r = Rechecker(0.5)
    first = state([[0.9, 0.3, 0.6, 0.2], [0.7, 0.2, 0.1, 0.3]], [[True] * 4, [True] * 4],
                  x0=[[1, 2, 3, 4], [5, 6, 7, 8]], rows=[0, 1])
    assert r.select(first).tolist() == [[True, False, True, False], [True, False, False, False]]
    # row 0 finished; row 1 (now batch row 0) takes another step of the same block
    later = state([[0.1, 0.9, 0.9, 0.9]], [[False, True, True, True]], x0=[[9, 6, 7, 8]], rows=[1])
    r.select(later)
    assert len(r.pairs) == 1
    row, pos, tok, nxt = r.pairs[0]
    assert (row.tolist(), pos.tolist(), tok.tolist(), nxt.tolist()) == ([1], [0], [5], [9])
    # a new block's first step pairs nothing with the block before
    r.select(state([[0.9, 0.9, 0.9, 0.9]], [[True] * 4], block_start=4, x0=[[1, 1, 1, 1]], rows=[1]))
    assert len(r.pairs) == 1
    refs = torch.tensor([[0, 0, 0, 0], [5, 0, 0, 0]])
    wrong, right = recheck_table(r.pairs, refs)
    assert wrong[1] == "0" and right[1:] == ["1", "100.0", "0.0"]  # the right 5 met a proposed 9


def test_the_block_gate_ends_a_sure_block_and_else_keeps_only_the_surest_and_is_the_threshold_rule_at_equal_taus():
    s = state([[0.9, 0.8, 0.6, 0.55], [0.97, 0.8, 0.4, 0.3], [0.2, 0.3, 0.1, 0.0]],
              [[True] * 4, [True, True, True, False], [True] * 4])
    assert BlockGate(0.5, 0.95).select(s).tolist() == [[True] * 4,  # every eligible one is >= 0.5
                                                       [True, False, False, False],  # 0.4 < 0.5: only >= 0.95
                                                       [False, True, False, False]]  # none: the most confident
    for t in (0.3, 0.5, 0.85):
        assert torch.equal(BlockGate(t, t).select(s), make_sampler("threshold", {"tau": t}).select(s))
    # linear: the block ends where its lowest conf is >= tau / (1 + beta) = 0.5; else the bar is 1 - beta * min
    assert LinearGate(1.0, 1.0).select(s).tolist() == [[True] * 4, [True, True, False, False],
                                                       [False, True, False, False]]


def test_near_ties_pairs_the_differences_and_names_bad_settings(capsys):
    from benchmarks.near_ties import between, main, split_labels, verdict
    from results.alpha_map import Point, paired

    assert split_labels("threshold(tau=0.5), eb(gamma=1.0),") == ["threshold(tau=0.5)", "eb(gamma=1.0)"]
    assert split_labels("two(a=1, b=2),x") == ["two(a=1, b=2)", "x"]  # a comma inside the parentheses stays
    # the same problems: learned solves one more of four
    m, se = paired([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0])
    assert m == 0.25 and se == pytest.approx(0.25, rel=1e-12)  # sd 0.5 over sqrt(4)
    assert paired([3.0, 4.0], [3.0, 4.0]) == (0.0, 0.0)
    assert verdict((0.03, 0.01), (-0.1, 0.02)) == "accuracy ahead, NFE ahead"
    assert verdict((-0.03, 0.01), (0.1, 0.02)) == "accuracy behind, NFE behind"
    assert verdict((0.01, 0.01), (0.0, 0.0)) == "accuracy within 2 SE, NFE within 2 SE"
    # the curve at the heuristic's NFE: p (NFE 2) and q (NFE 5) mixed 2:1 give NFE 3, the heuristic's
    p, q, h = (Point(x, s, n) for x, s, n in (("p", (1.0, 0.0, 1.0), (2.0,) * 3), ("q", (1.0,) * 3, (5.0,) * 3),
                                             ("h", (1.0, 0.0, 0.0), (3.0,) * 3)))
    m, se = between(p, q, h)
    assert m == pytest.approx(4 / 9, rel=1e-12)  # per problem 2/3 p + 1/3 q = 1, 1/3, 1, so 0, 1/3, 1 ahead
    assert se == pytest.approx(21 ** 0.5 / 9 / 3 ** 0.5, rel=1e-12)  # their sd, sqrt(21) / 9, over sqrt(3)
    assert between(p, Point("c", (1.0,) * 3, (2.5,) * 3), h) is None  # both cheaper than the heuristic: nothing to read
    main(["--block", "48", "--settings", "threshold(tau=0.5)", "--n", "4"])
    out = capsys.readouterr().out
    assert "on 4 fresh modchain problems (seed 6, in no split), block 48" in out
    (row,) = [x for x in out.splitlines() if x.startswith("| threshold(tau=0.5)")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    card = policy_card(ROOT / "policies" / "modchain-B48-alphas")
    mapped, sweep = card["alpha_map"]["threshold(tau=0.5)"]["alpha"], [x[0] for x in card["recommended"]["sweep"]]
    i = sweep.index(mapped)
    assert len(cells) == 11 and cells[2] == f"{mapped:g}"
    assert cells[9].split(":")[0] in (f"{sweep[i - 1]:g}", f"{sweep[i + 1]:g}")  # its swept neighbours, toward its NFE
    assert cells[1].count("%") == cells[3].count("%") == 1 and "±" in cells[4] and "±" in cells[5]
    with pytest.raises(SystemExit, match=r"--settings 'threshold\(tau=0.3\)': not in the map of modchain-B48-alphas; "
                                         r"valid: confidence\(k=1\)"):
        main(["--block", "48", "--settings", "threshold(tau=0.3)", "--n", "4"])
    with pytest.raises(SystemExit, match="--seed: fresh problems with seed 1: that is a split's seed"):
        main(["--block", "48", "--settings", "threshold(tau=0.5)", "--n", "4", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"--seed 7: the map of modchain-B16-alphas was chosen on those problems "
                                         r"\(alpha-map --fresh 3500 --fresh-seed 7\); valid: another seed"):
        main(["--block", "16", "--settings", "threshold(tau=0.99)", "--n", "4", "--seed", "7"])
    with pytest.raises(SystemExit, match="--n 1; valid: 2 or more problems"):
        main(["--block", "48", "--settings", "threshold(tau=0.5)", "--n", "1"])
