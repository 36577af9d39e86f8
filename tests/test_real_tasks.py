"""Stock lm-eval tasks offline: gsm8k from ../shared/data through the unmodified harness."""

import json
import os
import sys

import pytest

from lm_eval_dllm.reward import TaskScorer
from tests.background import Early
from tests.conftest import SHARED_GSM8K
from tests.grpo_smoke import run_one_step

CLI_TEST = "test_stock_gsm8k_through_the_cli_with_the_bundled_model"


@pytest.fixture(scope="module", autouse=True)
def early(request, tmp_path_factory):
    """The command-line run of the test at the end, started with the module (`tests/background.py`)."""
    runs = Early(request, tmp_path_factory.mktemp("gsm8k_early"))
    if (SHARED_GSM8K / "test.jsonl").exists():  # else that test skips (gsm8k_offline says why)
        cache = request.getfixturevalue("gsm8k_offline")
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
        runs.start(CLI_TEST, [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "dllm",
                              "--model_args", "sampler=threshold,tau=0.9,dtype=float32", "--tasks", "gsm8k",
                              "--limit", "5", "--batch_size", "5", "--output_path", str(runs.out(CLI_TEST))], env=env)
    yield runs
    runs.close()


@pytest.mark.slow
def test_stock_gsm8k_with_chat_template_on_a_llada_interface_checkpoint(gsm8k_offline, llada_ckpt, task_manager):
    import lm_eval

    res = lm_eval.simple_evaluate(
        model="dllm",
        model_args=f"pretrained={llada_ckpt},sampler=threshold,tau=0.5,gen_length=16,block=8,dtype=float32",
        tasks=["gsm8k"], limit=3, task_manager=task_manager, device="cpu", log_samples=True,
        apply_chat_template=True)
    assert res["results"]["gsm8k"]["nfe,none"] >= 2
    prompt = res["samples"]["gsm8k"][0]["arguments"][0][0]
    assert "<|start_header_id|>assistant" in prompt and "Question:" in prompt


@pytest.mark.slow
def test_grpo_on_stock_gsm8k_offline(gsm8k_offline, tmp_path):
    """Prompts (5-shot, left-truncated to the bundled model's context) and reward from lm-eval's gsm8k."""
    scorer = TaskScorer("gsm8k")  # what train.grpo rewards with
    doc = scorer.docs("test")[0]
    assert scorer.prompt(doc, 0).context.count("Question:") == 6  # 5 shots + the question
    assert scorer.score(doc, doc["answer"]) == 1.0 and scorer.score(doc, "#### 123456789") == 0.0
    run_one_step(tmp_path, "gsm8k", "--val-split", "test")


@pytest.mark.slow
def test_grpo_on_humaneval_with_the_sandbox_as_reward(tmp_path):
    scorer = TaskScorer("humaneval_dllm")
    doc = scorer.docs("test")[0]
    assert scorer.score(doc, doc["canonical_solution"]) == 1.0  # ran in the sandbox
    assert scorer.score(doc, "    return None\n") == 0.0
    run_one_step(tmp_path, "humaneval_dllm", "--train-split", "test", "--val-split", "test")


@pytest.mark.slow
def test_stock_gsm8k_through_the_cli_with_the_bundled_model(gsm8k_offline, early):
    """5-shot gsm8k prompts are longer than the bundled model's context: left-truncated, one warning.
    (Last in the file: its run, started with the module, goes on while the tests above run.)"""
    r = early.result(CLI_TEST)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(early.out(CLI_TEST).rglob("results_*.json")).read_text())
    row = res["results"]["gsm8k"]
    assert "exact_match,strict-match" in row and "exact_match,flexible-extract" in row
    assert 1 <= row["nfe,none"] <= 48
    assert res["n-samples"]["gsm8k"]["effective"] == 5
    assert r.stderr.count("exceeds the context of") == 1  # one warning for the run, not one per prompt
    assert "was trained only on" in r.stderr and "GSAI-ML/LLaDA-8B-Instruct" in r.stderr
