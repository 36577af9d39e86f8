"""`humaneval_dllm`: offline HumanEval, completions scored in the sandbox."""

import gzip
import json

import pytest

from lm_eval_dllm.tasks import humaneval


@pytest.fixture(scope="module")
def problems():
    with gzip.open(humaneval.data_path(), "rt") as f:
        return [json.loads(line) for line in f]


def test_canonical_solutions_pass_and_pass_bodies_fail(problems):
    assert len(problems) == 164
    docs = problems[:20]
    good = [humaneval.process_results(d, [d["canonical_solution"]])["pass@1"] for d in docs]
    bad = [humaneval.process_results(d, ["    pass\n"])["pass@1"] for d in docs]
    assert good == [1.0] * 20
    assert bad == [0.0] * 20


HOSTILE = [  # (function body, how the sandbox must end the run)
    ("    while True:\n        pass\n", {"timeout"}),                                  # never returns
    ("    import os\n    while True:\n        os.fork()\n", {"failed", "timeout"}),     # fork bomb
    ("    x = bytearray(1 << 34)\n    return x\n", {"memory"}),                       # over the memory limit
    ("    import socket\n    s = socket.socket()\n    s.bind(('127.0.0.1', 0))\n    return s\n", {"failed"}),
    ("    while True:\n        print('x' * 100_000)\n", {"output_limit"}),           # endless output
]


@pytest.mark.parametrize("body,statuses", HOSTILE)
def test_hostile_completions_are_contained_and_score_zero(problems, body, statuses):
    from lm_eval_dllm.sandbox import run_python

    doc = problems[0]
    res = run_python(humaneval.program(doc, body), timeout_s=2.0, memory_mb=256)
    assert res.status in statuses and res.seconds < 6, (res.status, res.stderr[-500:])
    assert humaneval.passes(doc, body, timeout_s=2.0, memory_mb=256) is False


@pytest.mark.parametrize("body", ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                                  "    raise SystemExit\n"])
def test_exiting_early_is_not_passing(problems, body):
    """Exit status 0 before the tests ran must not count as a pass."""
    assert humaneval.passes(problems[0], body, timeout_s=5.0) is False


def test_the_task_loads_through_lm_eval_and_scores_with_the_sandbox(problems, task_manager):
    task = task_manager.load(["humaneval_dllm"])["tasks"]["humaneval_dllm"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == problems[0]["prompt"]
    assert task.process_results(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}
    assert task.process_results(doc, ["    return None\n"]) == {"pass@1": 0.0}


MBPP_ITEMS = [  # hand-written, in MBPP's format
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"], "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function to reverse a string.", "code": "def rev(s):\n    return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba'"],
     "test_setup_code": ""},
]


def test_mbpp_from_a_local_file(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lm_eval_dllm.tasks import mbpp

    f = tmp_path / "mbpp.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in MBPP_ITEMS))
    monkeypatch.setenv(mbpp.ENV, str(f))
    task = TaskManager().load(["mbpp_dllm"])["tasks"]["mbpp_dllm"]
    docs = list(task.test_docs())
    assert task.doc_to_text(docs[0]).endswith("assert add(-1, 1) == 0\n[BEGIN]\n")
    for d in docs:
        assert task.process_results(d, [d["code"] + "\n[DONE]"]) == {"pass@1": 1.0}
        assert task.process_results(d, ["```python\n" + d["code"] + "\n```"]) == {"pass@1": 1.0}
        assert task.process_results(d, ["def add(a, b):\n    return 0\n"]) == {"pass@1": 0.0}


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_and_pass_bodies_fail(problems):
    """Both scoring paths (split and tests inside) keep every canonical solution passing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # the work is in the sandbox's processes
        good = list(pool.map(lambda d: humaneval.passes(d, d["canonical_solution"]), problems))
        bad = list(pool.map(lambda d: humaneval.passes(d, "    pass\n"), problems))
    assert [d["task_id"] for d, ok in zip(problems, good) if not ok] == []
    assert [d["task_id"] for d, ok in zip(problems, bad) if ok] == []
    assert sum(humaneval.split(d) is not None for d in problems) > 150
