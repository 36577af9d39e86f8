"""Data-parallel GRPO: two processes with half the rollouts each make one process's update."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
from lm_eval_dllm.testing import float_tol
from train.grpo import GRPOConfig, step_prompts

from .background import finish, start

WORKER = Path(__file__).with_name("grpo_dp_worker.py")
ROOT = WORKER.parent.parent
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def test_processes_split_one_draw_of_prompts_and_seeds():
    """2 processes x 3 prompts roll out the prompts and seeds of 1 process x 6, and 1 process
    draws as before data parallelism (its seeds stay those of existing runs)."""
    one = step_prompts(GRPOConfig(prompts_per_step=6, group=2), 5, 100)
    halves = [step_prompts(GRPOConfig(prompts_per_step=3, group=2), 5, 100, r, 2) for r in (0, 1)]
    assert one[0] == halves[0][0] + halves[1][0] and one[1] == halves[0][1] + halves[1][1]
    assert len(set(one[0])) == 6 and one[0][0] == one[0][1]  # distinct prompts, each --group times in a row
    assert one[1][3] == hash((0, 5, 0, 3)) % (2**62)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update(launch: list[str], out: Path):
    """Started in the background: one process and two go side by side (one thread each)."""
    return start([sys.executable] + launch + [str(WORKER), str(out)], out.with_suffix(".log"), env=ENV), out


def _result(run) -> dict:
    r = finish(run[0])
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(run[1])


@pytest.mark.slow
def test_two_processes_make_one_process_update(tmp_path):
    """Per loss normalisation: with "step", halves hold unequal step counts, so averaging the
    processes' own means would be off (by 1e-4 here); the global count puts it within float
    rounding: of the parameters' size, over a gradient summed from 16 rollouts."""
    torch.manual_seed(0)
    init = UnmaskPolicy(PolicyConfig()).state_dict()  # what the worker starts from
    runs = [_update([], tmp_path / "one.pt"),
            _update(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--main_process_port", str(_free_port())], tmp_path / "two.pt")]
    one, two = (_result(run) for run in runs)
    for norm in ("step", "rollout"):
        assert all(not torch.equal(one[norm][k], init[k]) for k in init)  # the update moved every parameter
        diff = max((one[norm][k] - two[norm][k]).abs().max().item() for k in init)
        tol = float_tol(max(one[norm][k].abs().max().item() for k in init), 16)  # 4 prompts x 4 rollouts
        assert diff <= tol, (norm, diff, tol)
