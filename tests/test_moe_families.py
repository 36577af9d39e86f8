"""Native LLaDA-MoE and LLaDA2.x against the official inclusionAI code (../shared/reference,
skipped where it is absent), one subprocess per family (`tests/moe_oracle.py` says how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .native_oracle import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps


def oracle(tmp_path, *args) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.moe_oracle", *args, str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def bound(rep: dict) -> float:
    """fp32 rounding of logits of this magnitude through a few layers, and never above 1e-4."""
    return min(1e-4, 16 * EPS32 * rep["max_abs_logit"])


@pytest.mark.skipif(not (REFERENCE / "llada-moe" / "modeling_lladamoe.py").exists(),
                    reason=f"no official LLaDA-MoE code at {REFERENCE}")
def test_native_llada_moe_logits_equal_the_official_code(tmp_path):
    rep = oracle(tmp_path, "llada_moe")["logits"]
    assert (rep["native_class"], rep["official_class"]) == ("NativeDLLM", "LLaDAMoEModelLM")
    assert rep["distinct_argmax"] > 10  # scaled output layer: decisions are not near ties
    assert rep["unpadded"] <= bound(rep)
    assert rep["padded"] <= bound(rep)  # it honours a 2-D mask plus position ids
    assert rep["native_padded_vs_alone"] <= bound(rep)  # a left-padded row = the row alone


@pytest.mark.skipif(not (REFERENCE / "llada2" / "modeling_llada2_moe.py").exists(),
                    reason=f"no official LLaDA2 code at {REFERENCE}")
def test_native_llada2_logits_equal_the_official_code_under_its_block_mask(tmp_path):
    rep = oracle(tmp_path, "llada2")["logits"]
    assert (rep["native_class"], rep["official_class"]) == ("NativeDLLM", "LLaDA2MoeModelLM")
    assert rep["distinct_argmax"] > 10
    assert rep["block_mask_changes_logits"] > 1.0  # the comparison would see a missing block mask
    assert rep["unpadded"] <= bound(rep)
    assert rep["padded"] <= bound(rep)  # its 4-D mask with padded keys, and position ids
    assert rep["native_padded_vs_alone"] <= bound(rep)


@pytest.mark.skipif(not (REFERENCE / "llada2" / "modeling_llada2_moe.py").exists(),
                    reason=f"no official LLaDA2 code at {REFERENCE}")
@pytest.mark.slow
def test_llada2_threshold_decode_gives_the_tokens_of_its_official_generate(tmp_path):
    """Blocks aligned to absolute positions (prompts of every length mod the block), threshold
    with at least one commit per step = official generate(steps=block_length) at batch 1."""
    rep = oracle(tmp_path, "llada2", "--generate")["generate"]
    for setting in ("B8_tau0.95", "B8_tau0.6", "B32_tau0.95", "B32_tau0.6"):
        assert all(rep[setting]["equal_official"]), (setting, rep[setting])
    assert rep["B32_tau0.6"]["mean_nfe"] < rep["B32_tau0.95"]["mean_nfe"]  # thresholds differ
    assert all(rep["batch8_equals_batch1"])  # per-row block offsets under left padding
    assert rep["distinct_tokens"] > 20  # not a degenerate decode
