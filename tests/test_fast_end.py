"""benchmarks.fast_end: its rules, its AUC and its reading of the threshold curve (no decoding here)."""

import pytest
import torch

from benchmarks.fast_end import INPUTS, TwoStage, auc, first_step, main, on_curve, probe_inputs
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.base import StepState


def state(conf, eligible, block_start=0, block_size=4, hidden=None):
    conf = torch.tensor(conf)
    masked = torch.tensor(eligible)
    return StepState(conf=conf, margin=conf / 2, entropy=1 - conf, masked=masked, eligible=masked.clone(),
                     generators=[], block_start=block_start, block_size=block_size, hidden=hidden)


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
