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

from .background import finish, start, stop

SMALL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
         "--warmup", "2", "--eval-problems", "4", "--threads", "1"]


def pretrain_cmd(out, *args) -> list[str]:
    return [sys.executable, "-m", "train.pretrain", "--out", str(out), *SMALL, *args]


ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def weights(out):
    return load_file(str(out / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


RUN = ["--steps", "12", "--save-every", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run the tests compare, started together (one thread each, seconds of imports each): an
    uninterrupted one (`whole`: the same-seed rerun and the resumed run must both equal it), its
    same-seed rerun, another seed, and one killed at the end of step 7."""
    d = tmp_path_factory.mktemp("pretrain")
    args = {"whole": RUN, "b": RUN, "c": [*RUN, "--seed", "1"], "cut": RUN}
    kill = {"cut": {crash.ENV: "7"}}
    procs = {name: start(pretrain_cmd(d / name, *a), d / f"{name}_log", env=ENV | kill.get(name, {}))
             for name, a in args.items()}
    yield d, procs
    for proc in procs.values():
        stop(proc)


def _done(runs, name):
    d, procs = runs
    r = finish(procs[name])
    assert r.returncode == (-signal.SIGKILL if name == "cut" else 0), r.stderr[-2000:]
    return d / name


def test_same_seed_gives_the_same_checkpoint_and_card(runs):
    whole, b, c = (_done(runs, name) for name in ("whole", "b", "c"))
    assert same(weights(whole), weights(b))
    assert not same(weights(whole), weights(c))
    card_a, card_b = (json.loads((d / "card.json").read_text()) for d in (whole, b))
    assert card_a["validation"] == card_b["validation"]
    assert card_a["final_loss_mean_last_100"] == card_b["final_loss_mean_last_100"]
    assert card_a["command"].startswith("python -m train.pretrain --steps 12 ")


def test_a_killed_run_resumes_to_the_same_checkpoint(runs):
    whole, cut = _done(runs, "whole"), _done(runs, "cut")
    state = cut / "train_state.pt"
    assert torch.load(state, weights_only=False)["step"] == 5  # the last state written before step 7
    assert not (cut / "model.safetensors").exists(), "killed before it finished"
    subprocess.run(pretrain_cmd(cut, *RUN, "--resume"), check=True, capture_output=True, text=True, env=ENV,
                   timeout=600)
    assert same(weights(whole), weights(cut))
    assert not state.exists()  # the finished checkpoint supersedes the training state
