"""MATH through lm-eval's minerva_math tasks, scored by its own code under a time limit.

The hub's MATH data cannot be fetched here, so the tests point a copy of our task at a few
hand-written problems in MATH's format (problem, level, type, solution with a boxed answer).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from lm_eval_dllm import math_check
from lm_eval_dllm.tasks import minerva, task_dir
from tests.background import Early
from tests.grpo_smoke import run_one_step

PROBLEMS = [
    {"problem": "What is $\\frac{2}{4}$?", "level": "Level 1", "type": "Algebra",
     "solution": "Reduce: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
    {"problem": "Simplify $\\sqrt{8}$.", "level": "Level 2", "type": "Algebra",
     "solution": "$\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$."},
    {"problem": "What is $3+4$?", "level": "Level 1", "type": "Algebra", "solution": "$3+4=\\boxed{7}$."},
]


def said(answer: str) -> str:
    """A completion in the minerva format, whose final answer lm-eval extracts."""
    return f" Some work.\nFinal Answer: The final answer is ${answer}$. I hope it is correct."


@pytest.fixture(scope="module")
def local_math(tmp_path_factory):
    """A task like minerva_math_algebra_dllm (same include, same scorer) over PROBLEMS."""
    d = tmp_path_factory.mktemp("math")
    data = d / "math.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    (d / "math_local_dllm.yaml").write_text(
        f"include: {str(task_dir() / 'minerva_math_algebra_dllm.yaml')!r}\n"
        "task: math_local_dllm\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {str(data)!r}\n    test: {str(data)!r}\n")
    return d


CLI_TEST = "test_math_through_the_cli_with_the_bundled_model"


@pytest.fixture(scope="module", autouse=True)
def early(request, local_math, tmp_path_factory):
    """The command-line run of the slow test below, started with the module (`tests/background.py`)."""
    runs = Early(request, tmp_path_factory.mktemp("math_early"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs.start(CLI_TEST, [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "dllm",
                          "--model_args", "sampler=threshold,tau=0.9,dtype=float32", "--tasks", "math_local_dllm",
                          "--include_path", str(local_math), "--limit", "2", "--output_path", str(runs.out(CLI_TEST))],
               env=env)
    yield runs
    runs.close()


@pytest.fixture(scope="module")
def task(local_math):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_math)).load(["math_local_dllm"])["tasks"]["math_local_dllm"]


def test_shipped_math_tasks_are_lm_evals_with_only_the_scorer_swapped(task_manager):
    assert set(minerva.TASKS) <= set(task_manager.all_tasks) and minerva.GROUP in task_manager.all_groups
    for name in minerva.TASKS:
        text = (task_dir() / f"{name}.yaml").read_text()
        keys = {line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha()}
        assert keys == {"include", "task", "tag", "process_results"}, name


def test_equivalent_forms_score_one_and_wrong_ones_zero(task):
    docs = list(task.test_docs())
    assert [d["answer"] for d in docs] == ["\\frac{1}{2}", "2\\sqrt{2}", "7"]
    assert task.process_results(docs[0], [said("0.5")])["exact_match"] == 1
    assert task.process_results(docs[1], [said("\\sqrt{8}")])["exact_match"] == 1
    assert task.process_results(docs[2], [said("7")]) == {"exact_match": 1, "math_verify": 1}
    assert task.process_results(docs[0], [said("0.33")])["exact_match"] == 0
    assert task.process_results(docs[1], [said("\\sqrt{2}")])["exact_match"] == 0
    assert task.process_results(docs[2], ["no final answer at all"])["exact_match"] == 0


def test_verdicts_are_lm_evals_own(task):
    from lm_eval.tasks.minerva_math.utils import process_results as lm_eval_process_results

    for doc in task.test_docs():
        for text in (said(doc["answer"]), said("0.5"), said("x+1"), "Final Answer: 7"):
            assert task.process_results(doc, [text]) == lm_eval_process_results(doc, [text]), text


@pytest.mark.parametrize("answer", ["10^{10^{10}}", "2^{2^{2^{2^{2^{100}}}}}", "(" * 1000 + "1" + ")" * 1000])
def test_a_hostile_answer_scores_zero_within_the_limit(task, monkeypatch, answer):
    monkeypatch.setattr(math_check, "SCORE_TIMEOUT_S", 2.0)
    math_check.warm_up()  # a replacement worker may still be importing; not part of the limit
    doc = next(iter(task.test_docs()))
    start = time.monotonic()
    assert task.process_results(doc, [said(answer)]) == {"exact_match": 0, "math_verify": 0}
    assert time.monotonic() - start < 2.0 + 1.5
    assert task.process_results(doc, [said("1/2")])["exact_match"] == 1  # and scoring goes on


def test_the_grpo_reward_is_the_bounded_scorer_times_the_discount(local_math, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lm_eval_dllm.reward import TaskScorer, nfe_discount

    monkeypatch.setattr(math_check, "SCORE_TIMEOUT_S", 2.0)  # the hostile answer below runs to the limit
    math_check.warm_up()
    scorer = TaskScorer("math_local_dllm", task_manager=TaskManager(include_path=str(local_math)))
    doc = scorer.docs("train")[0]
    assert scorer.reward(doc, said("0.5"), nfe=12, gen_length=48, alpha=1.0) == nfe_discount(12, 48, 1.0)
    assert scorer.reward(doc, said("10^{10^{10}}"), nfe=12, gen_length=48, alpha=1.0) == 0.0


@pytest.mark.slow
def test_math_through_the_cli_with_the_bundled_model(early):
    r = early.result(CLI_TEST)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(next(early.out(CLI_TEST).rglob("results_*.json")).read_text())["results"]["math_local_dllm"]
    assert {"exact_match,none", "math_verify,none", "nfe,none"} <= set(row)


@pytest.mark.slow
def test_grpo_on_math(local_math, tmp_path):
    run_one_step(tmp_path, "math_local_dllm", "--include-path", str(local_math), "--val-split", "test")
