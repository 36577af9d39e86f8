"""Every bad input gets one line naming the value and the valid choices, before the weights load:
NaN and out-of-range numbers in model_args, policy cards and run files; contexts; corrupt files.

    python -m pytest tests/test_bad_inputs.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_dllm import model as dllm_model
from lm_eval_dllm.loading import read_checkpoint
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
from lm_eval_dllm.utils import DLLMError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ model_args
@pytest.mark.parametrize("args,words", [
    ({"temperature": "nan"}, "temperature='nan' is not a valid float; valid: a finite number"),
    ({"temperature": float("inf")}, "temperature=inf is not a valid float; valid: a finite number"),
    ({"temperature": -1}, "temperature=-1.0 must be >= 0"),
    ({"sampler": "threshold", "tau": "nan"}, "tau='nan' is not a valid float; valid: a finite number"),
    ({"steps": float("inf")}, "steps=inf is not a valid int; valid: a whole number"),
    ({"max_length": -5}, "max_length=-5 must be a positive integer; valid: 1, 2, ..."),
    ({"gen_length": 100_000}, "gen_length=100000 leaves no room for a prompt within the model's context of"),
    ({"gen_length": 48, "max_length": 40}, "gen_length=48 leaves no room for a prompt within max_length=40; "
                                           "valid: gen_length 1 to 39"),
])
def test_bad_model_args_fail_before_the_weights_load(monkeypatch, tiny_ckpt, args, words):
    monkeypatch.setattr(dllm_model, "load", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(DLLMError) as e:
        dllm_model.DLLM(pretrained=str(tiny_ckpt), **args)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_corrupt_config_json_is_named(tmp_path, tiny_ckpt):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    for text in ('{"model_type": "llada",', "[1, 2]"):
        (ck / "config.json").write_text(text)
        with pytest.raises(DLLMError, match=rf"^{ck / 'config.json'} is not a model config \(.*valid: "):
            read_checkpoint(str(ck))


# ------------------------------------------------------------------ policy cards
def _card(tmp_path: Path, name: str, edit) -> Path:
    d = tmp_path / name
    UnmaskPolicy(PolicyConfig(block=8, gen_length=48)).save(d, {"alpha": 1.0})
    meta = json.loads((d / "policy.json").read_text())
    edit(meta)
    (d / "policy.json").write_text(json.dumps(meta))
    return d


CARDS = {  # name: (edit of policy.json, words of the error)
    "heads": (lambda m: m["config"].update(heads=3), "heads=3 does not divide hidden=128; valid: a divisor"),
    "hidden": (lambda m: m["config"].update(hidden=-4), "hidden=-4; valid: a whole number >= 1"),
    "bias": (lambda m: m["config"].update(init_bias=float("nan")), "init_bias=nan; valid: a finite number"),
    "card": (lambda m: m.update(card=5), "its card is int, not an object"),
    "config": (lambda m: m.update(config=[1]), "its config is list, not an object"),
}


@pytest.mark.parametrize("name", CARDS)
def test_bad_policy_cards_are_one_line(tmp_path, name):
    edit, words = CARDS[name]
    d = _card(tmp_path, name, edit)
    with pytest.raises(DLLMError) as e:
        UnmaskPolicy.load(d)
    assert str(e.value).startswith(str(d / "policy.json")) and words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), -0.5, "hot"])
def test_a_cards_recommended_temperature_is_checked(value):
    from lm_eval_dllm.samplers.learned import from_card

    with pytest.raises(DLLMError, match=r"temperature=.*valid: "):
        from_card({}, {"recommended": {"mode": "sample", "temperature": value}})


# ------------------------------------------------------------------ run files (results report)
def _default_run() -> Path:
    """A non-learned run file of the default report (`python -m results report`)."""
    from results.__main__ import report_paths
    from results.grid import Grid

    grid = Grid(tasks=["modchain"], blocks=[8], samplers=["threshold"], out=REPO / "results")
    return next(p for p in report_paths(grid) if "-pol" not in p.stem)


RUN = _default_run()

RUN_FILES = {  # name: (edit of the run file, words of the error)
    "string accuracy": (lambda d, r: r.update({k: "high" for k in r if k.startswith(("exact", "pass", "acc"))
                                               and "stderr" not in k}), "is 'high'; valid: a number in [0, 1]"),
    "NaN accuracy": (lambda d, r: r.update({k: float("nan") for k in r if k.startswith(("exact", "pass", "acc"))
                                            and "stderr" not in k}), "is nan; valid: a number in [0, 1]"),
    "accuracy 2.5": (lambda d, r: r.update({k: 2.5 for k in r if k.startswith(("exact", "pass", "acc"))
                                            and "stderr" not in k}), "is 2.5; valid: a number in [0, 1]"),
    "missing nfe": (lambda d, r: r.pop("nfe,none"), "nfe,none is None; valid: a number in [0, inf]"),
    "block a word": (lambda d, r: d["dllm_setting"].update(block="eight"), "block is 'eight'; valid: a whole number"),
}


@pytest.mark.parametrize("name", [*RUN_FILES, "a directory"])
def test_bad_run_files_are_one_line_through_the_cli(tmp_path, name):
    from results.__main__ import main

    target = tmp_path / RUN.relative_to(REPO / "results")
    target.parent.mkdir(parents=True)
    if name == "a directory":
        target.mkdir()
        words = "IsADirectoryError"
    else:
        edit, words = RUN_FILES[name]
        d = json.loads(RUN.read_text())
        edit(d, d["results"][d["dllm_setting"]["task"]])
        target.write_text(json.dumps(d))
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(tmp_path), "--tasks", "modchain"])
    msg = str(e.value)
    assert msg.startswith(f"results: error: run file {target} is corrupt") and words in msg, msg
    assert "\n" not in msg


# ------------------------------------------------------------------ through lm_eval's own CLI
def cli_error(monkeypatch, task_manager, model_args: str) -> str:
    """What lm-eval's CLI entry point exits with for `--model_args model_args`, called in this process
    with the session's TaskManager: lm-eval indexes all its tasks on each call, seconds each, and the
    error comes before any task loads. The process boundary is tested once, below."""
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: task_manager)
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "dllm", "--tasks", "modchain", "--limit", "1",
                                      "--model_args", model_args])
    with pytest.raises(SystemExit) as e:
        cli_evaluate()
    return e.value.code


@pytest.mark.slow
def test_bad_inputs_through_the_lm_eval_cli(tmp_path, tiny_ckpt, task_manager, monkeypatch):
    bad_config = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, bad_config)
    (bad_config / "config.json").write_text('{"model_type": ')
    heads = _card(tmp_path, "heads", CARDS["heads"][0])
    # one case of each kind (the unit tests above cover every value)
    cases = {"temperature=nan": "temperature=nan is not a valid float; valid: a finite number",
             "gen_length=100000": "gen_length=100000 leaves no room",
             f"pretrained={bad_config}": "config.json is not a model config",
             f"sampler=learned,policy={heads}": "heads=3 does not divide hidden=128"}
    for args, words in cases.items():
        code = cli_error(monkeypatch, task_manager, args)
        assert isinstance(code, str) and code.startswith("lm_eval_dllm: error: ") and words in code, (args, code)
        assert "\n" not in code
    # and the process itself: exit status 1, the one line last on stderr, no traceback
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "dllm", "--tasks", "modchain",
                        "--model_args", "max_length=-5"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lm_eval_dllm: error: max_length=-5 must be")
