"""loglikelihood / loglikelihood_rolling: the ELBO estimator against exact enumeration, invariances,
rolling windows, the bundled multiple-choice task and an ARC-style local task through the CLI."""

import glob
import itertools
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from lm_eval_dllm.config import DLLMConfig
from lm_eval_dllm.decode import model_forward
from lm_eval_dllm.likelihood import (all_patterns, elbo_loglikelihoods, mask_counts, plan,
                                     rolling_windows, split_pair)
from lm_eval_dllm.loading import load
from lm_eval_dllm.model import DLLM
from lm_eval_dllm.testing import float_tol
from lm_eval_dllm.tasks import modchain, modchain_mc
from lm_eval_dllm.utils import DLLMError

from .background import Early

DATA = Path(__file__).resolve().parent / "data"
CLI_TEST = "test_cli_modchain_mc_and_a_local_arc_style_task"


@pytest.fixture(scope="module", autouse=True)
def early(request, tmp_path_factory):
    """The command-line run of that slow test, started with the module (`tests/background.py`): the
    unmodified CLI on the bundled multiple-choice task and an ARC-style YAML over local data."""
    import lm_eval.tasks

    runs = Early(request, tmp_path_factory.mktemp("ll_early"))
    out = runs.out(CLI_TEST)
    arc = Path(lm_eval.tasks.__file__).resolve().parent / "arc" / "arc_easy.yaml"
    (out / "tasks").mkdir(parents=True)
    (out / "tasks" / "arc_local.yaml").write_text(
        f"include: {str(arc)!r}\ntask: arc_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {str(DATA / 'arc_mini.jsonl')!r}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs.start(CLI_TEST, [sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args",
                          "mc_num=8,batch_size=64,dtype=float32", "--tasks", "modchain_mc,arc_local", "--limit", "8",
                          "--include_path", str(out / "tasks"), "--output_path", str(out / "out"),
                          "--log_samples", "--device", "cpu"], env=env)
    yield runs
    runs.close()


@torch.no_grad()
def exact_elbo(forward, ctx: list[int], tgt: list[int], mask_id: int, shifted: bool) -> float:
    """E_k E_M [(L/k) sum_{i in M} log p(x_i)] by scoring every mask pattern, written out here
    (`forward`: the model's forward strategy, `decode.model_forward`; the enumeration is the oracle)."""
    L, P, total = len(tgt), len(ctx), 0.0
    for k in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), k))
        for M in subsets:
            seq = torch.tensor([ctx + [mask_id if j in M else t for j, t in enumerate(tgt)]])
            logits = forward(seq, torch.ones_like(seq))[0]
            lp = F.log_softmax(logits.double(), -1)
            s = sum(float(lp[P + j - (1 if shifted else 0), tgt[j]]) for j in M)
            total += (1 / L) * (1 / len(subsets)) * (L / k) * s
    return total


def ll_tol(model, ll: float) -> float:
    """How far two evaluations of one log-likelihood may differ (batch shape, CPU kernels): its
    terms are log-probabilities <= 0, so they sum to |ll| in absolute value; each comes through
    the forward, whose longest reduction is the feed-forward width."""
    return float_tol(abs(ll), model.config.d_ff)


def test_mask_counts_are_stratified_and_uniform():
    gen = torch.Generator().manual_seed(0)
    k = mask_counts(L=10, n=8000, group=8, gen=gen)
    assert k.min() == 1 and k.max() == 10
    for g in k.view(-1, 8):  # one draw per eighth of 1..10, in order
        assert all(((j * 10) // 8) + 1 <= int(g[j]) <= ((j + 1) * 10 + 7) // 8 for j in range(8))
    freq = torch.bincount(k, minlength=11)[1:].double() / len(k)
    assert (freq - 0.1).abs().max() < 0.02


def test_exact_patterns_weights():
    masks, w = all_patterns(4)
    assert masks.shape == (15, 4) and masks.any(-1).all()
    # E[(L/k) * k] = L: a model with log p = c everywhere has ELBO L * c
    assert math.isclose(float((w * masks.sum(-1)).sum()), 4.0)
    assert plan(4, mc_num=15, mc_batch=8, seed=0)[0].shape == (15, 4)  # 2^4 - 1 <= mc_num: exact
    assert plan(4, mc_num=14, mc_batch=8, seed=0)[0].shape == (14, 4)  # otherwise mc_num draws


def test_estimator_matches_exact_elbo_and_its_error_shrinks(tiny_loaded):
    """On a 3-token target: the mean of many estimates is the enumerated ELBO within 3 standard
    errors; the estimator's spread shrinks as mc_num grows; the exact path equals enumeration."""
    model, tok, spec = tiny_loaded
    ctx, tgt = tok("Q: 7*")["input_ids"], tok("3=1")["input_ids"]
    assert len(tgt) == 3
    exact = exact_elbo(model_forward(model, spec), ctx, tgt, spec.mask_id, spec.shifted)
    fwd = model_forward(model, spec)

    def estimates(mc_num: int, n: int) -> torch.Tensor:
        pairs = [(ctx, tgt, seed) for seed in range(n)]
        out = elbo_loglikelihoods(fwd, pairs, spec, mc_num, 8, 64, exact=False)
        return torch.tensor([ll for ll, _, _ in out], dtype=torch.float64)

    v2 = estimates(2, 400)
    se = float(v2.std() / math.sqrt(len(v2)))
    assert abs(float(v2.mean()) - exact) < 3 * se, (float(v2.mean()), exact, se)
    v16 = estimates(16, 100)
    assert float(v16.std()) < float(v2.std()) / 2  # 8x the draws: spread / sqrt(8) in theory
    (ll, greedy, forwards), = elbo_loglikelihoods(fwd, [(ctx, tgt, 0)], spec, 128, 8, 64)
    assert forwards == 7 and abs(ll - exact) < ll_tol(model, exact)  # 2^3 - 1 patterns <= 128 draws: exact


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_exact_path_per_family(family, llada_ckpt, dream_ckpt):
    """Dream's logits are shifted (the logit for position i sits at i - 1): read through the spec."""
    model, tok, spec = load(str(llada_ckpt if family == "llada" else dream_ckpt), dtype="float32", device="cpu")
    assert spec.shifted == (family == "dream")
    ctx, tgt = tok("Q: 7*")["input_ids"], tok("3=1")["input_ids"]
    (ll, _, forwards), = elbo_loglikelihoods(model_forward(model, spec), [(ctx, tgt, 0)], spec, 7, 8, 8)
    exact = exact_elbo(model_forward(model, spec), ctx, tgt, spec.mask_id, spec.shifted)
    assert forwards == 7 and abs(ll - exact) < ll_tol(model, exact)
    wrong = exact_elbo(model_forward(model, spec), ctx, tgt, spec.mask_id, not spec.shifted)
    assert abs(ll - wrong) > 1e-3  # reading the other alignment would be caught


def _requests(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, p, i, ("t", i, 1)) for i, p in enumerate(pairs)]


def test_results_do_not_depend_on_batch_size_or_order(tiny_ckpt):
    pairs = [("Q: 1+2", "=3"), ("Q: 9*9-1+4*2\nA: ", "9*9=1\n1-1=0\n#### 0"), ("", "abc"),
             ("Q: 5", " and so on"), ("Q: 1+2", "=4"), ("x" * 30, "yz"), ("Q: 3*3", "=9 #### 9")]
    runs = {}
    for bs in (1, 8):
        lm = DLLM(pretrained=str(tiny_ckpt), dtype="float32", batch_size=bs, mc_num=16, device="cpu")
        runs[bs] = lm.loglikelihood(_requests(pairs), disable_tqdm=True)
        rev = lm.loglikelihood(_requests(pairs[::-1]), disable_tqdm=True)[::-1]
        assert all(abs(a[0] - b[0]) < ll_tol(lm.model, a[0]) for a, b in zip(runs[bs], rev))
        assert [a[1] for a in runs[bs]] == [b[1] for b in rev]
    assert all(abs(a[0] - b[0]) < ll_tol(lm.model, a[0]) for a, b in zip(runs[1], runs[8]))
    assert [a[1] for a in runs[1]] == [b[1] for b in runs[8]]
    lm.loglikelihood(_requests(pairs[:2]), disable_tqdm=True)
    st = lm.stats["t"][-2:]
    assert st[0]["ll_forwards"] == 3  # "=3": 2 tokens, every one of the 3 mask patterns, exact
    assert st[1]["ll_forwards"] in (16, 17)  # 16 draws, + 1 all-masked row for is_greedy if not drawn


def test_a_long_context_keeps_its_last_tokens_with_one_warning(tiny_ckpt, caplog):
    """Loglikelihood fits prompts as generation does: the context's last tokens, one warning per run;
    truncation=error refuses in one line."""
    short = ("Q: 1+2*3-4", "=3")
    lm = DLLM(pretrained=str(tiny_ckpt), dtype="float32", max_length=8, mc_num=4, device="cpu")
    with caplog.at_level("WARNING"):
        cut = lm.loglikelihood(_requests([("x" * 20 + short[0], short[1]), ("y" * 30 + short[0], short[1])]),
                               disable_tqdm=True)
    assert caplog.text.count("+ continuation 2 exceeds the context of 8") == 1
    alone = lm.loglikelihood(_requests([(short[0][-6:], short[1])]), disable_tqdm=True)
    assert cut[0] == cut[1] == alone[0]  # both kept the same last 6 context tokens
    strict = DLLM(pretrained=str(tiny_ckpt), dtype="float32", max_length=8, truncation="error", device="cpu")
    with pytest.raises(DLLMError, match="prompt of 30 tokens \\+ continuation 2 exceeds the context limit of 8 tokens; "
                                        "valid: .*a smaller continuation, or truncation=left"):
        strict.loglikelihood(_requests([("x" * 20 + short[0], short[1])]), disable_tqdm=True)


def test_is_greedy_follows_the_all_masked_argmax(tiny_loaded):
    model, tok, spec = tiny_loaded
    ctx = tok("Q: 12")["input_ids"]
    seq = torch.tensor([ctx + [spec.mask_id] * 2])
    best = model(input_ids=seq).logits[0, len(ctx):].argmax(-1).tolist()
    other = [(best[0] + 1) % 90, best[1]]
    out = elbo_loglikelihoods(model_forward(model, spec), [(ctx, best, 0), (ctx, other, 0)], spec, 4, 4, 8)
    assert [g for _, g, _ in out] == [True, False]


def test_rolling_windows_cover_each_token_once():
    ids = list(range(100, 137))
    wins = rolling_windows(ids, max_length=10, prefix=1)
    assert [t for _, t in wins] and sum((t for _, t in wins), []) == ids
    assert wins[0] == ([1], ids[:9])
    for ctx, tgt in wins[1:]:
        assert len(ctx) + len(tgt) == 10 and (len(tgt) == 5 or tgt[-1] == ids[-1])
        start = ids.index(tgt[0])
        assert ctx == ids[start - len(ctx):start]  # the tokens right before the target
    assert rolling_windows([], 10, 1) == []


def test_loglikelihood_rolling_sums_its_windows(tiny_ckpt):
    """A 12-character document in windows of 8 (targets 7, 4, 1 tokens, each exact at
    mc_num=127) is the sum of three loglikelihood calls on the same windows."""
    doc = "hello world!"
    lm = DLLM(pretrained=str(tiny_ckpt), dtype="float32", max_length=8, mc_num=127, device="cpu")
    (rolled,) = lm.loglikelihood_rolling(_requests([(doc,)], "loglikelihood_rolling"), disable_tqdm=True)
    st = lm.stats["t"][-1]
    assert st["windows"] == 3 and st["target_tokens"] == 12 and st["ll_forwards"] == 127 + 15 + 1
    parts = lm.loglikelihood(_requests([("", doc[:7]), (doc[3:7], doc[7:11]), (doc[4:11], doc[11:])]),
                             disable_tqdm=True)
    assert abs(rolled - sum(ll for ll, _ in parts)) < ll_tol(lm.model, rolled)
    assert lm.loglikelihood_rolling(_requests([("",)], "loglikelihood_rolling"), disable_tqdm=True) == [0.0]


def test_split_pair_moves_whitespace_only_when_the_tokenizer_needs_it():
    chars = lambda s: [ord(c) for c in s]  # noqa: E731  (a character tokenizer)
    assert split_pair(chars, "A: ", "42") == (chars("A: "), chars("42"))
    words = lambda s: [hash(w) for w in s.replace(" ", " \0").split("\0")]  # noqa: E731
    ctx, cont = split_pair(words, "A: ", "42")  # "A: 42" -> "A:", " 42"
    assert len(ctx) == 1 and len(cont) == 1
    with pytest.raises(DLLMError, match="no tokens of its own"):
        split_pair(chars, "A", "")


@pytest.mark.parametrize("key, value, needle", [("mc_num", 0, "mc_num=0"), ("mc_batch", -1, "mc_batch=-1"),
                                                ("mc_num", "many", "mc_num='many'")])
def test_bad_mc_args_fail_before_loading(key, value, needle):
    with pytest.raises(DLLMError, match=needle):
        DLLMConfig.from_model_args({key: value})
    with pytest.raises(DLLMError, match=needle):  # the config fails before the (missing) model loads
        DLLM(pretrained="/nonexistent/never/loaded", **{key: value})


def test_modchain_mc_data_is_regenerated_and_well_formed():
    docs = [json.loads(line) for line in open(modchain_mc.data_path())]
    assert len(docs) == len(modchain.load_split(modchain_mc.SPLIT))
    for d in docs[:200]:
        assert modchain_mc.make_doc(d["question"]) == d  # deterministic: the file is what the code writes
        assert d["choices"][d["label"]] == modchain.solve(d["question"])
        assert len({modchain_mc.final(c) for c in d["choices"]}) == 4
    assert modchain_mc.slipped("3+8*4-2+9*3", 2, 5) == "3+8=1\n1*4=4\n4-2=5\n5+9=4\n4*3=2\n#### 2"
    assert modchain_mc.slipped("3+8*4", 1, 4) is None  # 1*4 is 4: no slip


def test_modchain_mc_prompt_is_the_generation_prompt(task_manager):
    task = task_manager.load(["modchain_mc"])["tasks"]["modchain_mc"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == modchain.prompt(doc["question"])
    assert task.config.target_delimiter == "" and task.OUTPUT_TYPE == "multiple_choice"


@pytest.mark.slow
def test_cli_modchain_mc_and_a_local_arc_style_task(early):
    """The unmodified CLI runs the bundled multiple-choice task and an ARC-style YAML on local data,
    offline, with accuracy and forwards per request in the results and the samples."""
    r = early.result(CLI_TEST)
    assert r.returncode == 0, r.stderr[-3000:]
    out = early.out(CLI_TEST) / "out"
    res = json.load(open(glob.glob(str(out / "*" / "results_*.json"))[0]))
    mc = res["results"]["modchain_mc"]
    assert mc["acc,none"] >= 0.5 and 8 <= mc["ll_forwards,none"] <= 9  # 8 draws (+1 greedy row)
    assert 0 <= res["results"]["arc_local"]["acc,none"] <= 1 and res["results"]["arc_local"]["ll_forwards,none"] > 0
    sample = json.loads(open(glob.glob(str(out / "*" / "samples_arc_local_*.jsonl"))[0]).readline())
    assert len(sample["dllm"]) == 4 and all(s["ll_forwards"] >= 1 for s in sample["dllm"])


@pytest.mark.slow
def test_the_loglikelihood_benchmark_prints_its_table(capsys):
    from benchmarks.loglikelihood import main

    with pytest.raises(SystemExit, match="--limit 0; valid: a positive number of questions"):
        main(["--limit", "0"])
    main(["--limit", "2", "--no-write", "--mc-num", "1"])
    out = capsys.readouterr().out
    assert "(2 questions" in out and out.count("\n| ") == 2  # header and one row
