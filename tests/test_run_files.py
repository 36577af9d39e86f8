"""A training run's files: resume loses no log line and leaves no partial save; an --out that
cannot be written is refused in one line before anything loads.

    python -m pytest tests/test_run_files.py -q
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from lm_eval_dllm.policy import UnmaskPolicy
from train import grpo
from train.run_files import keep_log_until, remove_partial_saves


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_resume_keeps_every_line_and_sets_damaged_ones_aside(tmp_path, caplog):
    log = tmp_path / "log.jsonl"
    steps = [json.dumps({"step": s, "reward": 0.5}) for s in (1, 2, 3, 4)]
    damaged = ['{"step": 3, "rew', "not json at all"]
    original = [steps[0], damaged[1], steps[1], steps[2], steps[3], damaged[0]]
    log.write_text("\n".join(original))  # the last line was cut by a kill (no newline)
    with caplog.at_level("WARNING"):
        keep_log_until(log, 2)
    assert _lines(log) == steps[:2]  # each step up to the resume point, once
    assert _lines(tmp_path / "log.jsonl.rerun") == steps[2:]
    assert _lines(tmp_path / "log.jsonl.bad") == [damaged[1], damaged[0]]
    assert sorted(_lines(log) + _lines(tmp_path / "log.jsonl.rerun") + _lines(tmp_path / "log.jsonl.bad")) \
        == sorted(original)  # nothing lost
    assert "lines 2, 6 damaged" in caplog.text and "log.jsonl.bad" in caplog.text
    keep_log_until(log, 2)  # a second resume changes nothing
    assert _lines(log) == steps[:2] and len(_lines(tmp_path / "log.jsonl.bad")) == 2


def test_partial_saves_are_removed_and_whole_files_kept(tmp_path):
    (tmp_path / "last").mkdir()
    (tmp_path / "validated" / "step-25").mkdir(parents=True)
    keep = [tmp_path / "trainer_state.pt", tmp_path / "last" / "policy.safetensors", tmp_path / "notes.tmp",
            tmp_path / "validated" / "step-25" / "policy.json"]
    partial = [tmp_path / ".trainer_state.pt.k2j3.tmp", tmp_path / "last" / ".policy.safetensors.x1.tmp",
               tmp_path / "validated" / "step-25" / ".policy.json.q9.tmp"]
    for p in keep + partial:
        p.write_bytes(b"x")
    assert sorted(remove_partial_saves(tmp_path)) == sorted(partial)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in partial)


def _grpo_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        grpo.main(argv)
    msg = str(e.value)
    assert msg.startswith("train.grpo: error: ") and "\n" not in msg
    return msg


def test_out_under_a_file_fails_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "load", lambda *a, **k: pytest.fail("weights loaded"))
    f = tmp_path / "file"
    f.write_text("x")
    assert f"lies under {str(f)!r}, which is a file; valid: a folder path" in _grpo_error(
        ["--out", str(f / "run")])


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: a read-only bind mount as root, chmod 555 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
        yield d
        os.chmod(d, 0o755)
        return
    ok = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(d)], capture_output=True)
        pytest.skip("root here cannot make a read-only mount")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_read_only_out_fails_before_anything_loads(read_only_dir, monkeypatch):
    monkeypatch.setattr(grpo, "load", lambda *a, **k: pytest.fail("weights loaded"))
    for out in (read_only_dir, read_only_dir / "new" / "run"):
        msg = _grpo_error(["--out", str(out)])
        assert f"--out {str(out)!r} cannot be written" in msg and "valid: a folder you can write to" in msg


@pytest.mark.slow
def test_a_resume_cleans_partial_saves_and_keeps_the_log(tmp_path, tiny_ckpt):
    """Through train.grpo's entry point (in this process: imports cost more than the run): a
    finished run, then a kill's leftovers planted, then --resume."""
    out = tmp_path / "run"
    argv = ["--pretrained", str(tiny_ckpt), "--steps", "1", "--prompts-per-step", "2", "--group", "2",
            "--val-size", "2", "--val-every", "100", "--save-every", "1", "--gen-length", "16", "--block", "8",
            "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    grpo.main(argv)
    partial = [out / ".trainer_state.pt.a1b2.tmp", out / "last" / ".policy.safetensors.c3.tmp"]
    for p in partial:
        p.write_bytes(b"half a save")
    logged = _lines(out / "log.jsonl")
    (out / "log.jsonl").write_text("\n".join(logged) + '\n{"step": 2, "rewa')
    grpo.main(argv + ["--resume"])
    assert not any(p.exists() for p in partial)
    assert _lines(out / "log.jsonl") == logged and _lines(out / "log.jsonl.bad") == ['{"step": 2, "rewa']


@pytest.mark.slow
def test_keep_validated_keeps_each_validated_policy_and_overwrite_clears_them(tmp_path, tiny_ckpt):
    """--keep-validated: OUT/validated/step-N for every validation, each the policy validated then
    (its card's step and metrics), and step-0, the start; OUT/best is one of them. --overwrite starts
    clean without it."""
    out = tmp_path / "run"
    argv = ["--pretrained", str(tiny_ckpt), "--steps", "2", "--prompts-per-step", "2", "--group", "2",
            "--val-size", "2", "--val-every", "1", "--save-every", "1", "--gen-length", "16", "--block", "8",
            "--lr", "0.05", "--weight-decay", "0.5", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    grpo.main(argv + ["--keep-validated"])
    kept = {p.name: UnmaskPolicy.load(p) for p in sorted((out / "validated").iterdir())}
    assert sorted(kept) == ["step-0", "step-1", "step-2"]
    start = kept.pop("step-0")
    assert start.card["steps"] == 0 and start.card["metrics"] == {}
    logged = {json.loads(line)["step"]: json.loads(line)["val_reward"] for line in _lines(out / "log.jsonl")}
    for name, pol in kept.items():
        step = int(name.split("-")[1])
        assert pol.card["steps"] == step and pol.card["metrics"]["val_reward"] == logged[step]
    weights = [torch.cat([t.flatten() for t in p.state_dict().values()]) for p in (start, *kept.values())]
    assert not any(torch.equal(weights[i], weights[j]) for i in range(3) for j in range(i))  # weight decay moves them
    best = UnmaskPolicy.load(out / "best")
    assert best.card["steps"] in (1, 2)
    best_weights = torch.cat([t.flatten() for t in best.state_dict().values()])
    assert torch.equal(best_weights, weights[best.card["steps"]])
    grpo.main(argv + ["--steps", "1", "--overwrite"])
    assert not (out / "validated").exists()
