"""Nothing is lost silently and nonsense is refused early, each with one line naming the culprit.

    python -m pytest tests/test_reliability.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest

from lm_eval_dllm import model as dllm_model
from lm_eval_dllm.decode import diffuse
from lm_eval_dllm.loading import load
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.utils import DLLMError
from train import grpo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _grpo_error(capsys_unused, argv) -> str:
    with pytest.raises(SystemExit) as e:
        grpo.main(argv)
    msg = str(e.value)
    assert msg.startswith("train.grpo: error: ") and "\n" not in msg
    return msg


# ------------------------------------------------------------------ training never destroys a run
def _a_finished_run(out):
    out.mkdir(parents=True)
    UnmaskPolicy(PolicyConfig()).save(out / "best", {"alpha": 1.0})
    (out / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")


def test_an_existing_run_is_not_overwritten_without_saying_so(tmp_path):
    out = tmp_path / "run"
    _a_finished_run(out)
    before = (out / "best" / "policy.safetensors").read_bytes()
    msg = _grpo_error(None, ["--out", str(out)])
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "best" / "policy.safetensors").read_bytes() == before


def test_resume_needs_a_readable_state(tmp_path):
    out = tmp_path / "run"
    _a_finished_run(out)
    msg = _grpo_error(None, ["--out", str(out), "--resume"])
    assert f"no trainer state at {out / 'trainer_state.pt'}" in msg
    (out / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    msg = _grpo_error(None, ["--out", str(out), "--resume"])
    assert f"{out / 'trainer_state.pt'} cannot be read" in msg and "--overwrite" in msg


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _grpo_error(None, ["--out", str(f)])


@pytest.mark.parametrize("argv,words", [
    (["--alpha", "-1"], "--alpha -1.0; valid: a number >= 0"),
    (["--group", "1"], "--group 1; valid: 2 or more"),
    (["--lr", "0"], "--lr 0.0; valid: a number > 0"),
    (["--init-tau", "1.5"], "--init-tau 1.5; valid: a number in (0, 1]"),
    (["--features", "conf,bogus"], "valid: a comma-separated subset of mask, eligible"),
    (["--block", "7", "--gen-length", "16"], "block=7 does not divide gen_length=16"),
    (["--init-from", "/nonexistent/policy"], "policy '/nonexistent/policy' does not exist"),
    (["--dtype", "int3"], "unsupported dtype 'int3'"),
])
def test_nonsense_flags_fail_before_anything_loads(tmp_path, monkeypatch, argv, words):
    monkeypatch.setattr(grpo, "load", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(grpo, "TaskScorer", lambda *a, **k: pytest.fail("task loaded"))
    out = tmp_path / "never"
    assert words in _grpo_error(None, argv + ["--out", str(out)])
    assert not out.exists()


def test_resumed_log_holds_each_step_once(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "rew')
    grpo.keep_log_until(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ corrupt files name themselves
def test_truncated_checkpoint_weights(tmp_path, tiny_ckpt):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(DLLMError, match=rf"{w} is not a whole safetensors file \(truncated.*valid: re-download"):
        load(str(ck), device="cpu")


@pytest.fixture
def policy_dir(tmp_path):
    d = tmp_path / "pol"
    UnmaskPolicy(PolicyConfig(block=8, gen_length=48)).save(d, {"alpha": 1.0})
    return d


def test_truncated_policy_weights(policy_dir):
    w = policy_dir / "policy.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(DLLMError, match=rf"{w} is not a whole safetensors file"):
        UnmaskPolicy.load(policy_dir)


def test_invalid_policy_card(policy_dir):
    (policy_dir / "policy.json").write_text('{"config": {"hidden": 12')
    with pytest.raises(DLLMError, match=rf"{policy_dir / 'policy.json'} is not a policy card \(JSONDecodeError"):
        UnmaskPolicy.load(policy_dir)
    (policy_dir / "policy.json").write_text('{"config": {"colour": "red"}}')
    with pytest.raises(DLLMError, match="is not a policy card \\(TypeError"):
        UnmaskPolicy.load(policy_dir)


def test_policy_weights_of_another_size(policy_dir):
    meta = json.loads((policy_dir / "policy.json").read_text())
    meta["config"]["hidden"] = 64
    (policy_dir / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(DLLMError, match=r"policy.safetensors does not match .*policy.json \(.*size mismatch"):
        UnmaskPolicy.load(policy_dir)


def test_corrupt_run_file_is_named_and_run_again(tmp_path):
    from results.grid import run_file_ok
    from results.report import load_rows

    bad = tmp_path / "modchain-threshold.json"
    bad.write_text('{"results": {"modchain": ')
    with pytest.raises(DLLMError, match=rf"run file {bad} is corrupt \(JSONDecodeError.*`python -m results run` re-runs it"):
        load_rows([bad])
    assert not run_file_ok(bad)  # `run` counts it as missing
    assert not run_file_ok(tmp_path / "absent.json")


def test_results_bad_blocks_is_one_line():
    from results.__main__ import main

    with pytest.raises(SystemExit, match=r"^results: error: --blocks 'abc'; valid: comma-separated whole numbers"):
        main(["report", "--blocks", "abc"])


# ------------------------------------------------------------------ model_args checked before weights
@pytest.mark.parametrize("args,words", [
    ({"sampler": "threshold", "tau": 1.5}, "tau=1.5 is out of range"),
    ({"sampler": "confidence", "block": 7, "gen_length": 16}, "block=7 does not divide gen_length=16"),
    ({"sampler": "learned", "policy": "/nonexistent/policy"}, "policy '/nonexistent/policy' does not exist"),
    ({"sampler": "learned", "block": 5}, None),  # nearest shipped policy: a warning, not an error
    ({"sampler": "confidence", "dtype": "int3"}, "unsupported dtype 'int3'"),
])
def test_model_args_fail_before_the_weights_load(monkeypatch, tiny_ckpt, args, words):
    calls = []
    monkeypatch.setattr(dllm_model, "load", lambda *a, **k: calls.append(1) or pytest.skip("loaded"))
    if words is None:
        with pytest.raises(pytest.skip.Exception):
            dllm_model.DLLM(pretrained=str(tiny_ckpt), **args)
        assert calls
        return
    with pytest.raises(DLLMError, match=words):
        dllm_model.DLLM(pretrained=str(tiny_ckpt), **args)
    assert not calls


# ------------------------------------------------------------------ empty prompts
@pytest.mark.parametrize("prompts", [[[]], [[], [5, 6]], [[5, 6], [], [7]]])
def test_an_empty_prompt_is_refused_at_every_batch_size(tiny_loaded, prompts):
    from lm_eval_dllm.decode import model_forward

    model, _, spec = tiny_loaded
    with pytest.raises(DLLMError, match=r"empty prompt \(row \d+ of \d+\); valid: at least one prompt token"):
        diffuse(model_forward(model, spec), prompts, spec, make_sampler("confidence", {}), 8, 8)
