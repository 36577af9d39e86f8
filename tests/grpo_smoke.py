"""One GRPO step on a task, and the checks a user relies on afterwards (shared by the task tests).

What a run on a real task must give: one log record per step, a validation record, and a `best/`
policy whose card names the task, block and L it was trained for and holds the validation numbers
that were logged; the policy loads for evaluation; the logged reward is the task's verdict times the
NFE discount, so it never exceeds the accuracy, and it is 0 where nothing was solved.
"""

import json

from lm_eval_dllm.policy import UnmaskPolicy
from train.grpo import main


def run_one_step(tmp_path, task: str, *args) -> dict:
    """Train one step (group 2, 2 prompts, L = block = 32) on `task`; returns the last log record."""
    out = tmp_path / "grpo"
    main(["--task", task, *args, "--steps", "1", "--group", "2", "--prompts-per-step", "2",
          "--val-every", "1", "--val-size", "2", "--gen-length", "32", "--block", "32",
          "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]
    rec = log[0]
    for kind in ("", "val_"):
        assert 0.0 <= rec[f"{kind}reward"] <= rec[f"{kind}accuracy"] <= 1.0, rec
        assert rec[f"{kind}accuracy"] > 0 or rec[f"{kind}reward"] == 0, rec
        assert 1 <= rec[f"{kind}nfe"] <= 32, rec
    card = json.loads((out / "best" / "policy.json").read_text())["card"]
    assert (card["task"], card["block"], card["gen_length"], card["steps"]) == (task, 32, 32, 1)
    assert card["metrics"] == {k: v for k, v in rec.items() if k.startswith("val_")}
    assert UnmaskPolicy.load(out / "best").cfg.task == task
    return rec
