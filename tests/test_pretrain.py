"""`python -m train.pretrain`: same seed, same checkpoint; a killed run resumes to the same end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train import crash

SMALL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
         "--warmup", "2", "--eval-problems", "4", "--threads", "1"]


def pretrain(out, *args, check=True, env=None):
    cmd = [sys.executable, "-m", "train.pretrain", "--out", str(out), *SMALL, *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} | (env or {})
    return subprocess.run(cmd, check=check, capture_output=True, text=True, env=env, timeout=600)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


RUN = ["--steps", "12", "--save-every", "5"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted run, shared: the same-seed rerun and the resumed run must both equal it."""
    out = tmp_path_factory.mktemp("pretrain") / "whole"
    pretrain(out, *RUN)
    return out


def test_same_seed_gives_the_same_checkpoint_and_card(whole, tmp_path):
    pretrain(tmp_path / "b", *RUN)
    pretrain(tmp_path / "c", *RUN, "--seed", "1")
    assert same(weights(whole), weights(tmp_path / "b"))
    assert not same(weights(whole), weights(tmp_path / "c"))
    card_a, card_b = (json.loads((d / "card.json").read_text()) for d in (whole, tmp_path / "b"))
    assert card_a["validation"] == card_b["validation"]
    assert card_a["final_loss_mean_last_100"] == card_b["final_loss_mean_last_100"]
    assert card_a["command"].startswith("python -m train.pretrain --steps 12 ")


def test_a_killed_run_resumes_to_the_same_checkpoint(whole, tmp_path):
    cut = tmp_path / "cut"
    r = pretrain(cut, *RUN, check=False, env={crash.ENV: "7"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = cut / "train_state.pt"
    assert torch.load(state, weights_only=False)["step"] == 5  # the last state written before step 7
    assert not (cut / "model.safetensors").exists(), "killed before it finished"
    pretrain(cut, *RUN, "--resume")
    assert same(weights(whole), weights(cut))
    assert not state.exists()  # the finished checkpoint supersedes the training state
