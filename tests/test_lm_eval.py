"""The `dllm` model inside an unmodified lm-eval: registry, tasks, results, samples, errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from .background import finish, start

SAMPLERS = ["confidence", "eb", "entropy", "factor", "margin", "random", "threshold"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)


def test_hook_costs_nothing_without_lm_eval():
    code = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'torch', 'lm_eval_dllm')))"
    out = run([sys.executable, "-c", code])
    assert out.stdout.strip() == "['lm_eval_dllm', 'lm_eval_dllm._hook']"


def test_registry_keeps_builtins_and_adds_dllm():
    code = ("from lm_eval.api.registry import get_model; "
            "print(get_model('hf').__name__, get_model('dummy').__name__, get_model('dllm').__name__)")
    out = run([sys.executable, "-c", code])
    assert out.stdout.split() == ["HFLM", "DummyLM", "DLLM"], out.stderr[-2000:]


def test_per_document_stats_go_from_the_model_info_into_the_samples_only():
    """The model hands its per-document statistics over in get_model_info; the report moves them
    into the logged samples (two requests of one document: a list) and out of the results' config."""
    from lm_eval_dllm.report import SAMPLES_KEY, attach_stats

    per_doc = {"t": {0: [{"nfe": 3}], 1: [{"nfe": 1}, {"nfe": 2}]}}
    res = {"config": {"dllm": {"per_task": {"t": {"mean_nfe": 2.0}}}, SAMPLES_KEY: per_doc},
           "results": {"t": {}}, "samples": {"t": [{"doc_id": 0}, {"doc_id": 1}, {"doc_id": 2}]}}
    attach_stats(res)
    assert list(res["config"]) == ["dllm"]
    assert [s.get("dllm") for s in res["samples"]["t"]] == [{"nfe": 3}, [{"nfe": 1}, {"nfe": 2}], None]
    assert res["results"]["t"]["nfe,none"] == 2.0


def test_bundled_task_is_found_without_include_path(task_manager):
    assert "modchain" in task_manager.all_tasks


def test_task_prompt_matches_pretraining_prompt(task_manager):
    from lm_eval_dllm.tasks import modchain

    task = task_manager.load(["modchain"])["tasks"]["modchain"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == modchain.prompt(doc["question"])
    # the gsm8k scorer applies unchanged: the reference answer scores 1, a wrong one 0
    ok = task.process_results(doc, [doc["answer"]])
    assert ok["exact_match"] == 1.0


def final_answer(text: str) -> str | None:
    """The number after the last `#### ` (modchain's answer format), read independently of lm-eval."""
    found = re.findall(r"#### (-?\d+)", text)
    return found[-1] if found else None


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_through_simple_evaluate(sampler, task_manager):
    """The bundled model on 8 problems: the reported accuracy is the share of logged completions
    whose final answer is the reference's, and NFE is the mean of the samples' own counts."""
    import lm_eval

    k = ",k=4" if sampler in ("confidence", "entropy", "margin", "random") else ""  # 12 forwards, not 48
    res = lm_eval.simple_evaluate(
        model="dllm", model_args=f"sampler={sampler}{k},batch_size=4,dtype=float32",
        tasks=["modchain"], limit=8, task_manager=task_manager, device="cpu", log_samples=True)
    row = res["results"]["modchain"]
    samples = [s for s in res["samples"]["modchain"] if s["filter"] == "flexible-extract"]
    assert len(samples) == 8  # one logged sample per doc and filter
    right = [final_answer(s["resps"][0][0]) == final_answer(s["target"]) for s in samples]
    assert row["exact_match,flexible-extract"] == pytest.approx(sum(right) / 8)
    if sampler == "threshold":  # tau = 0.9 at B = 8 solves 99 % of the test problems (results/README.md)
        assert all(right)
    per_task = res["config"]["dllm"]["per_task"]["modchain"]
    assert per_task["n"] == 8 and per_task["mean_nfe"] == row["nfe,none"]
    nfes = [s["dllm"]["nfe"] for s in samples]
    assert sum(nfes) / 8 == pytest.approx(row["nfe,none"]) and row["tpf,none"] > 0 and row["wall_s,none"] > 0
    assert all(1 <= n <= 48 for n in nfes)  # early exit: a short answer ends before its last block
    assert all(s["dllm"]["doc_id"] == s["doc_id"] for s in samples)


@pytest.mark.slow
def test_batch_size_does_not_change_outputs(tiny_ckpt, task_manager):
    import lm_eval

    outs = []
    for bs in (1, 8):
        res = lm_eval.simple_evaluate(
            model="dllm", model_args=f"pretrained={tiny_ckpt},sampler=threshold,tau=0.3,batch_size={bs},dtype=float32",
            tasks=["modchain"], limit=8, task_manager=task_manager, device="cpu", log_samples=True)
        outs.append([(s["resps"], s["dllm"]["nfe"]) for s in res["samples"]["modchain"]])
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_cli_end_to_end(tiny_ckpt, tmp_path):
    """`lm_eval` and `python -m lm_eval`, results JSON with accuracy and NFE, samples with NFE."""
    args = ["--model", "dllm", "--model_args", f"pretrained={tiny_ckpt},sampler=threshold,tau=0.7,dtype=float32",
            "--tasks", "modchain", "--limit", "4", "--batch_size", "2", "--log_samples"]
    exes = [[os.path.join(os.path.dirname(sys.executable), "lm_eval")], [sys.executable, "-m", "lm_eval"]]
    # both side by side: each spends seconds importing, on one core
    runs = [start(exe + args + ["--output_path", str(tmp_path / f"out{i}")], tmp_path / f"log{i}", env=ENV)
            for i, exe in enumerate(exes)]
    for i, proc in enumerate(runs):
        out_dir = tmp_path / f"out{i}"
        r = finish(proc)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "nfe" in r.stdout and "exact_match" in r.stdout
        res_file = next(out_dir.rglob("results_*.json"))
        res = json.loads(res_file.read_text())["results"]["modchain"]
        assert "exact_match,strict-match" in res and res["nfe,none"] >= 1
        sample = json.loads(next(out_dir.rglob("samples_modchain_*.jsonl")).read_text().splitlines()[0])
        assert sample["dllm"]["nfe"] >= 1 and sample["dllm"]["task"] == "modchain"


BAD_INPUT = [
    ("sampler=bogus", "unknown sampler 'bogus'; valid: confidence"),
    ("sampler=threshold,tau=abc", "tau='abc' is not a valid float"),
    ("sampler=threshold,tau=1.5", "tau=1.5 is out of range; valid: (0.0, 1.0]"),
    ("block=0", "block=0 must be a positive integer"),
    ("block=5,gen_length=48", "block=5 does not divide gen_length=48"),
    ("gen_length=-3", "gen_length=-3 must be a positive integer"),
    ("pretrained=/no/such/dir", "pretrained path '/no/such/dir' does not exist"),
    ("dtype=float7", "unsupported dtype 'float7'; valid: auto"),
    ("device=toaster", "unsupported device 'toaster'"),
    ("colour=blue", "unknown model_args key 'colour'; valid: batch_size"),
]


@pytest.mark.parametrize("model_args,needle", BAD_INPUT)
def test_bad_model_args_are_one_line(model_args, needle, tiny_ckpt):
    """What lm-eval does with --model_args, in-process: one DLLMError line (the CLI prints it)."""
    from lm_eval_dllm.model import DLLM
    from lm_eval_dllm.utils import DLLMError

    if "pretrained" not in model_args:
        model_args = f"pretrained={tiny_ckpt},{model_args}"
    with pytest.raises(DLLMError) as e:
        DLLM.create_from_arg_string(model_args, {"batch_size": 1, "device": "cpu"})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_cli_bad_input_exits_with_one_line(tiny_ckpt, task_manager, monkeypatch):
    """lm-eval's CLI entry point in this process; that the process prints this line last, with exit
    status 1 and no traceback, test_bad_inputs checks once."""
    from .test_bad_inputs import cli_error

    code = cli_error(monkeypatch, task_manager, f"pretrained={tiny_ckpt},sampler=threshold,tau=1.5")
    assert code == "lm_eval_dllm: error: sampler 'threshold': tau=1.5 is out of range; valid: (0.0, 1.0]"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_family_checkpoints_with_chat_template(family, llada_ckpt, dream_ckpt, task_manager):
    import lm_eval

    ckpt = {"llada": llada_ckpt, "dream": dream_ckpt}[family]
    res = lm_eval.simple_evaluate(
        model="dllm", model_args=f"pretrained={ckpt},sampler=threshold,tau=0.5,gen_length=16,block=8,dtype=float32",
        tasks=["modchain"], limit=2, task_manager=task_manager, device="cpu", log_samples=True,
        apply_chat_template=True)
    assert res["config"]["dllm"]["family"] == family
    sample = res["samples"]["modchain"][0]
    prompt = sample["arguments"][0][0]
    marker = {"llada": "<|start_header_id|>assistant", "dream": "<|im_start|>assistant"}[family]
    assert marker in prompt  # the tokenizer's chat template was applied
    assert 2 <= sample["dllm"]["nfe"] <= 16


@pytest.mark.slow
def test_learned_sampler_with_a_policy_folder(tiny_ckpt, task_manager, tmp_path):
    import lm_eval

    from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy

    UnmaskPolicy(PolicyConfig(base_model=str(tiny_ckpt), block=8, gen_length=48)).save(tmp_path / "pol")
    res = lm_eval.simple_evaluate(
        model="dllm",
        model_args=f"pretrained={tiny_ckpt},sampler=learned,policy={tmp_path / 'pol'},block=8,dtype=float32",
        tasks=["modchain"], limit=4, task_manager=task_manager, device="cpu")
    assert res["results"]["modchain"]["nfe,none"] >= 6  # at least one forward per block
    assert res["config"]["dllm"]["sampler"] == "learned"


def test_prompt_fitter_truncates_left_and_warns_once(caplog):
    from lm_eval_dllm.text import PromptFitter
    from lm_eval_dllm.utils import DLLMError

    fit = PromptFitter(limit=10)
    with caplog.at_level("WARNING"):
        assert fit(list(range(8)), 4) == [2, 3, 4, 5, 6, 7]
        assert fit(list(range(9)), 4) == [3, 4, 5, 6, 7, 8]
        assert fit([1, 2], 4) == [1, 2]
    assert caplog.text.count("exceeds the context of 10") == 1
    with pytest.raises(DLLMError, match="exceeds the context limit of 10 tokens; valid: .*truncation=left"):
        PromptFitter(limit=10, truncation="error")(list(range(8)), 4)
    assert PromptFitter(limit=None)(list(range(500)), 4) == list(range(500))
