"""`python -m results --preset paper`: the plan and its cost before running, the policy error, and
a short run of the offline part of the grid under `accelerate launch` with 2 CPU processes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from results.grid import Setting
from results.plan import nfe_bound

from .background import finish, start


def env() -> dict:
    """Read when a run starts: the gsm8k_offline fixture sets HF_DATASETS_CACHE."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args, launch=()):
    return subprocess.run([sys.executable, *launch, "-m", "results", *args], capture_output=True, text=True,
                          env=env(), timeout=600)


def test_nfe_bound():
    assert nfe_bound(Setting.make("confidence", {"k": 4}, 32), 256) == 64
    assert nfe_bound(Setting.make("confidence", {"k": 3}, 256), 256) == 86  # ceil: the last step commits what is left
    assert nfe_bound(Setting.make("threshold", {"tau": 0.9}, 32), 256) == 256


@pytest.mark.slow
def test_dry_run_prints_plan_and_estimate_and_learned_needs_a_policy(gsm8k_offline, llada_ckpt, tmp_path):
    base = ["--preset", "paper", "--pretrained", str(llada_ckpt), "--tasks", "gsm8k,humaneval_dllm",
            "--batch-size", "2", "--out", str(tmp_path), "--dry-run"]
    # both dry runs side by side (one thread each, seconds of imports each)
    runs = [start([sys.executable, "-m", "results", *args], tmp_path / "logs" / f"dry{i}", env=env())
            for i, args in enumerate([base, base + ["--samplers", "confidence,threshold"]])]
    r, r2 = (finish(proc) for proc in runs)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no shipped policy for" in r.stderr and "python -m train.grpo --task gsm8k" in r.stderr
    assert "--block 256 --gen-length 256" in r.stderr
    r = r2
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and "task" not in line}
    # few-shot, documents, prompt tokens, runs, on disk, to run, forwards, hours
    assert rows["gsm8k"][:2] == ["5", "1319"] and rows["humaneval_dllm"][:2] == ["0", "164"]
    assert rows["gsm8k"][3:6] == ["16", "0", "16"]  # (3 confidence + 5 threshold) x 2 blocks
    # every gsm8k document at most (k=1: 256, k=2: 128, k=4: 64) + 5 thresholds x 256 forwards, at 2 blocks
    assert rows["gsm8k"][6] == f"{1319 * 2 * (256 + 128 + 64 + 5 * 256):,}"
    assert float(rows["gsm8k"][7]) > 0 and "device hours" in r.stdout
    assert not (tmp_path / "runs").exists()  # a dry run runs nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_offline_part_runs_under_accelerate_with_two_processes(gsm8k_offline, llada_ckpt, tmp_path):
    """gsm8k and humaneval_dllm, --limit 2 (one document per process); L shortened to 32 to keep the
    test short (at L = 256 the same command takes minutes on a CPU, the vocabulary being LLaDA's)."""
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(_free_port())]
    r = run(["--preset", "paper", "--pretrained", str(llada_ckpt), "--tasks", "gsm8k,humaneval_dllm",
             "--samplers", "margin", "--gen-length", "32", "--blocks", "32", "--limit", "2",
             "--batch-size", "2", "--out", str(tmp_path)], launch)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted((tmp_path / "runs").rglob("*.json"))
    assert [f.parent.name.split("-L32-")[0] + "/" + f.name for f in files] == [
        "gsm8k/margin-k4-B32.json", "humaneval_dllm/margin-k4-B32.json"]
    assert [f.parent.name.split("-")[2] for f in files] == ["5shot", "0shot"]
    for f in files:
        res = json.loads(f.read_text())
        task = res["dllm_setting"]["task"]
        assert res["n-samples"][task]["effective"] == 2 and res["config"]["dllm"]["per_task"][task]["n"] == 2
        assert res["results"][task]["nfe,none"] == 8  # L / k: one block, 4 tokens a step
        assert res["dllm_setting"]["num_fewshot"] == {"gsm8k": 5, "humaneval_dllm": 0}[task]
    assert next(tmp_path.glob("*/tables.md")).exists()
