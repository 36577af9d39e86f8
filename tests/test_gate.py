"""The block gate (PolicyConfig.gate_hi, `python -m policies.gate`): issue 32's fast end.

    python -m pytest tests/test_gate.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.fast_end import BlockGate
from lm_eval_dllm.policy import DEFAULT_FEATURES, PolicyConfig, UnmaskPolicy
from lm_eval_dllm.samplers.base import StepState
from lm_eval_dllm.utils import DLLMError
from policies.gate import main as gate_main
from train.grpo import GRPOConfig, check_config, network_config


def _start(gate_hi: float, tau: float = 0.5, **kw) -> UnmaskPolicy:
    """The threshold start at tau, its network's share of the logit zero: logit = 20 (conf - tau)."""
    pol = UnmaskPolicy(PolicyConfig(init="threshold", init_tau=tau, skip_gain=20.0, gate_hi=gate_hi, **kw))
    torch.nn.init.zeros_(pol.out.weight)
    return pol


def _canvas(b=64, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(b, L, generator=g) * 0.6 + 0.4  # many rows whose every eligible conf clears 0.5
    eligible = torch.rand(b, L, generator=g) < 0.5
    return conf, eligible


def test_the_gated_threshold_start_commits_what_the_benchmarks_block_gate_does():
    conf, eligible = _canvas()
    args = (conf, conf / 2, 1 - conf, eligible, eligible)
    gated = _start(0.9).logits_for(*args) > 0
    sure = torch.where(eligible, conf, 1.0).amin(-1) >= 0.5  # every eligible position clears the threshold
    assert sure.sum() > 10 and (~sure).sum() > 10  # both kinds of blocks
    want = eligible & (sure[:, None] | (conf >= 0.9))
    assert torch.equal(gated & eligible, want)
    # the benchmark's rule, which adds the most confident position to a row that would commit none
    s = StepState(conf=conf, margin=conf / 2, entropy=1 - conf, masked=eligible, eligible=eligible, generators=[])
    some = want.any(-1)
    assert torch.equal(BlockGate(0.5, 0.9).select(s)[some], want[some])
    plain = _start(0.0).logits_for(*args) > 0  # no gate: the threshold rule at 0.5
    assert torch.equal(plain & eligible, eligible & (conf >= 0.5))
    assert ((plain & ~gated) & eligible).any()  # what the gate holds back


def test_a_row_with_no_eligible_position_keeps_its_logits_and_gate_0_is_no_gate():
    conf, eligible = _canvas(b=4)
    eligible[1] = False
    args = (conf, conf / 2, 1 - conf, eligible, eligible)
    gated, plain = _start(0.9), _start(0.0)
    plain.load_state_dict(gated.state_dict())  # the same weights: the gate has none of its own
    torch.testing.assert_close(gated.logits_for(*args)[1], plain.logits_for(*args)[1], rtol=0, atol=0)


def test_train_grpo_builds_the_gate_it_is_asked_for():
    assert network_config(GRPOConfig(gate_hi=0.9)).gate_hi == 0.9
    assert network_config(GRPOConfig()).gate_hi == 0.0


def test_bad_gates_are_one_line_errors(tmp_path):
    with pytest.raises(DLLMError, match=r"^policy gate_hi=1.5; valid: a number in \(0, 1\], or 0 for no gate$"):
        PolicyConfig(gate_hi=1.5)
    with pytest.raises(DLLMError, match=r"^policy gate_hi=0.9 needs arch features with the conf and eligible "):
        PolicyConfig(gate_hi=0.9, features=("mask", "conf"))
    with pytest.raises(DLLMError, match=r"^--gate-hi -0.1; valid: a number in \(0, 1\], or 0 for no gate$"):
        check_config(GRPOConfig(out=str(tmp_path / "r"), gate_hi=-0.1), resume=False, overwrite=False)
    with pytest.raises(DLLMError, match=r"^--gate-hi 0.9; valid: 0 with --arch features --features mask,conf, or "):
        check_config(GRPOConfig(out=str(tmp_path / "r"), gate_hi=0.9, features="mask,conf"), resume=False,
                     overwrite=False)


def test_policies_gate_keeps_the_weights_and_the_training_record_and_drops_what_was_chosen_without_it(tmp_path):
    src = UnmaskPolicy(PolicyConfig(features=DEFAULT_FEATURES, init="threshold", skip_gain=20.0))
    src.save(tmp_path / "src", {"command": "python -m train.grpo ...", "train_minutes": 3.0,
                                "alpha_map": {"x": 1}, "recommended": {"alpha": 1.0}})
    gate_main(["--policy", str(tmp_path / "src"), "--gate-hi", "0.95", "--out", str(tmp_path / "gated")])
    out = UnmaskPolicy.load(tmp_path / "gated")
    assert out.cfg.gate_hi == 0.95
    for k, v in src.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
    card = json.loads((tmp_path / "gated" / "policy.json").read_text())["card"]
    assert card["command"] == "python -m train.grpo ..." and card["train_minutes"] == 3.0
    assert "alpha_map" not in card and "recommended" not in card
    assert card["gate"]["gate_hi"] == 0.95 and card["gate"]["retrained"] is False
    with pytest.raises(SystemExit, match=r"^policies.gate: error: --out .* is not empty; valid: a new folder$"):
        gate_main(["--policy", str(tmp_path / "src"), "--gate-hi", "0.95", "--out", str(tmp_path / "gated")])
    with pytest.raises(SystemExit, match=r"^policies.gate: error: policy .* already has the gate \(gate_hi 0.95\)"):
        gate_main(["--policy", str(tmp_path / "gated"), "--gate-hi", "0.9", "--out", str(tmp_path / "again")])
    with pytest.raises(SystemExit, match=r"^policies.gate: error: --gate-hi 0.0; valid: a number in \(0, 1\]$"):
        gate_main(["--policy", str(tmp_path / "src"), "--gate-hi", "0", "--out", str(tmp_path / "none")])
