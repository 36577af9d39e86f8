"""Data-parallel evaluation: two processes under `accelerate launch` report what one process does."""

import json
import os
import socket
import sys
from types import SimpleNamespace

import pytest

from lm_eval_dllm.parallel import padding

from .background import finish, start

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_padding_is_what_exceeds_repeats():
    a, b = SimpleNamespace(repeats=1), SimpleNamespace(repeats=2)
    # as the evaluator builds them: each request `repeats` times, then the rank's last one again
    assert padding([a, b, b, b, b]) == [False, False, False, True, True]
    assert padding([a, b, b]) == [False, False, False]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(launch: list[str], out):
    """Started in the background: one process and two go side by side (one thread each)."""
    args = ["-m", "lm_eval", "--model", "dllm", "--model_args", "sampler=threshold,tau=0.7,dtype=float32",
            "--tasks", "modchain", "--limit", "7", "--batch_size", "2", "--log_samples",
            "--output_path", str(out)]
    return start([sys.executable] + launch + args, out.with_suffix(".log"), env=ENV), out


def _results(run) -> tuple[dict, list[dict]]:
    proc, out = run
    r = finish(proc)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(x) for x in next(out.rglob("samples_modchain_*.jsonl")).read_text().splitlines()]
    return res, samples


@pytest.mark.slow
def test_two_processes_report_what_one_does(tmp_path):
    """7 documents on 2 ranks (4 + 3, the second padded with a copy): same accuracy, texts, NFE."""
    # --multi_gpu: without it accelerate starts a single process on a machine without GPUs
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(_free_port())]
    runs = [_evaluate([], tmp_path / "one"), _evaluate(launch, tmp_path / "two")]
    (one, one_s), (two, two_s) = (_results(run) for run in runs)
    r1, r2 = one["results"]["modchain"], two["results"]["modchain"]
    for k in ("exact_match,strict-match", "exact_match,flexible-extract", "nfe,none", "tpf,none"):
        assert r1[k] == r2[k], k
    assert two["config"]["dllm"]["per_task"]["modchain"]["n"] == 7
    assert two["config"]["dllm"]["per_task"]["modchain"]["mean_nfe"] == r1["nfe,none"]

    def per_doc(samples):
        out = {}
        for s in samples:
            assert isinstance(s["dllm"], dict), s["dllm"]  # one measurement per sample, the copy not counted
            key = (s["doc_id"], s["filter"])
            assert key not in out  # every document exactly once
            out[key] = (s["resps"][0][0], s["filtered_resps"], s["dllm"]["nfe"], s["dllm"]["tokens"])
        return out

    d1, d2 = per_doc(one_s), per_doc(two_s)
    assert len(d1) == 14 and d1 == d2
    # sharded as lm-eval does it, document i on rank i % 2 (not the whole task on each process)
    assert all(s["dllm"]["rank"] == s["doc_id"] % 2 for s in two_s)
    assert all("rank" not in s["dllm"] for s in one_s)

