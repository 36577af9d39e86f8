"""DiffusionGemma (transformers' own class) through the `dllm` model: by default exactly its `generate()`."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from lm_eval_dllm.config import DLLMConfig
from lm_eval_dllm.generate_dgemma import decode
from lm_eval_dllm.loading import read_checkpoint
from lm_eval_dllm.model import DLLM, sample_seed
from lm_eval_dllm.models.diffusion_gemma import build_tiny_checkpoint
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy, action_logprob
from lm_eval_dllm.samplers import Sampler, make_sampler, top_k
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.text import completion_text, stop_strings
from lm_eval_dllm.utils import DLLMError
from results.grid import SWEEPS

from .background import Early

# tokens per forward is a ratio of two counts, rounded once to float32 by generate(): within half a
# float32 ulp of the exact ratio, so a relative bound of one float32 epsilon holds on any CPU
FP32_QUOTIENT = torch.finfo(torch.float32).eps

ROOT = Path(__file__).resolve().parents[1]
L = 32  # two canvases of 16
PROMPTS = [f"Q{i}: what is {i} + {3 * i}?\nA:" for i in range(10)]


@pytest.fixture(scope="module")
def dg_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("dgemma"), max_denoising_steps=4)


@pytest.fixture(scope="module")
def official(dg_ckpt):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(dg_ckpt)).eval()


CLI_TEST, DRY_RUN_TEST = "test_cli_default_is_generate_for_10_prompts", "test_results_dry_run_plans_the_family_grid"


@pytest.fixture(scope="module", autouse=True)
def early(request, dg_ckpt, tmp_path_factory):
    """The command-line runs of the slow tests below, started with the module (`tests/background.py`)."""
    runs = Early(request, tmp_path_factory.mktemp("dg_early"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs.start(CLI_TEST, ["lm_eval", "--model", "dllm", "--model_args", f"pretrained={dg_ckpt},gen_length={L},dtype=float32",
                          "--tasks", "modchain", "--limit", "10", "--batch_size", "1", "--device", "cpu",
                          "--log_samples", "--output_path", str(runs.out(CLI_TEST))], env=env, cwd=ROOT)
    runs.start(DRY_RUN_TEST, [sys.executable, "-m", "results", "--pretrained", str(dg_ckpt), "--tasks", "modchain",
                              "--limit", "2", "--batch-size", "2", "--dry-run", "--out", str(runs.out(DRY_RUN_TEST))],
               env=env, cwd=ROOT)
    yield runs
    runs.close()


def _requests(prompts, max_gen_toks=L):
    kw = {"until": ["\n\n"], "max_gen_toks": max_gen_toks}
    return [Instance(request_type="generate_until", doc={}, arguments=(p, kw), idx=0, metadata=("dg", i, 1))
            for i, p in enumerate(prompts)]


def _generate(official, ids, seed):
    torch.manual_seed(seed)
    return official.generate(torch.tensor([ids]), max_new_tokens=L)


def test_default_decode_is_generate_for_10_prompts(dg_ckpt, official):
    """The lm-eval model (batch 1, per-sample seeds) gives generate()'s texts and tokens_per_forward, and
    its NFE is that ratio's denominator (decoder passes)."""
    lm = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32", batch_size=1)
    texts = lm.generate_until(_requests(PROMPTS), disable_tqdm=True)
    stats = sorted(lm.stats["dg"], key=lambda s: s["doc_id"])
    tok = AutoTokenizer.from_pretrained(str(dg_ckpt))
    for i, p in enumerate(PROMPTS):
        ids = tok(p)["input_ids"]
        ref = _generate(official, ids, sample_seed(lm.cfg.seed, p, 0))
        assert texts[i] == completion_text(ref.sequences[0, len(ids):].tolist(), tok, lm.spec, ["\n\n"])
        assert stats[i]["tpf"] == pytest.approx(float(ref.tokens_per_forward[0]), rel=FP32_QUOTIENT)
        assert stats[i]["tokens"] / stats[i]["nfe"] == pytest.approx(stats[i]["tpf"], rel=FP32_QUOTIENT)
    # early stops and EOS make rows differ: the comparison has teeth
    assert len({s["tpf"] for s in stats}) > 2 and len({s["nfe"] for s in stats}) > 2


def test_batch_counts_passes_per_row_as_generate_does(dg_ckpt, official):
    """Batched (left padding): rows that stop denoising early or finish at an EOS stop counting."""
    tok = AutoTokenizer.from_pretrained(str(dg_ckpt))
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:6]]
    ours = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32").model
    out = decode(ours, prompts, None, gen_length=L, seeds=[7] * 6, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(7)
    ref = official.generate(ids, attention_mask=attn, max_new_tokens=L)
    assert torch.equal(out.tokens, ref.sequences[:, P:])
    assert torch.equal(out.tpf, ref.tokens_per_forward)
    assert torch.allclose(out.valid / out.nfe, ref.tokens_per_forward.float(), rtol=FP32_QUOTIENT)
    assert len(set(out.nfe.tolist())) > 1


def test_a_sampler_is_the_acceptance_rule(dg_ckpt):
    """threshold keeps what it says (more with a lower tau), at least one position per row, and each
    recorded step holds only rows still denoising."""
    lm = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32")
    tok = lm.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    kept = {}
    for tau in (0.9, 0.3):
        out = decode(lm.model, prompts, make_sampler("threshold", {"tau": tau}), gen_length=L, seeds=[1, 2, 3, 4],
                     pad_id=lm.spec.pad_id, device=torch.device("cpu"), record=True)
        assert out.steps and all(r.action.any(-1).all() for r in out.steps)
        for r in out.steps:
            above = r.conf >= tau
            assert torch.equal(r.action & ~above, r.action & (r.action.sum(-1, keepdim=True) == 1) & ~above)
        assert sum(len(r.rows) for r in out.steps) == int(out.nfe.sum())
        kept[tau] = sum(int(r.action.sum()) for r in out.steps[:4])
    assert kept[0.3] > kept[0.9]


@pytest.mark.parametrize("args, needle", [
    ({"sampler": "confidence"}, "valid: eb, threshold, factor, learned"),
    ({"block": 8}, "valid: block=16"),
    ({"steps": 4}, "max_denoising_steps"),
    ({"temperature": 0.5}, "t_max..t_min"),
    ({"cache": "prefix"}, "cache=prefix does not apply"),
    ({"early_exit": "false"}, "early_exit=False does not apply"),
])
def test_bad_settings_are_one_line(dg_ckpt, args, needle):
    with pytest.raises(DLLMError) as e:
        DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32", **args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_loglikelihood_is_refused_in_one_line(dg_ckpt):
    lm = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32")
    req = Instance(request_type="loglikelihood", doc={}, arguments=("Q: 1+1\nA:", " 2"), idx=0, metadata=("t", 0, 1))
    with pytest.raises(DLLMError, match="loglikelihood is not supported for DiffusionGemma"):
        lm.loglikelihood([req], disable_tqdm=True)


def test_recorded_steps_replay_the_learned_policy(dg_ckpt):
    """What GRPO replays is what the learned sampler decided on: the policy over a recorded step's
    features gives that step's action (greedy) and a finite log-probability of it."""
    lm = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32")
    torch.manual_seed(0)
    policy = UnmaskPolicy(PolicyConfig(hidden=16, ff=32, init="threshold", init_tau=0.5, block=16, gen_length=L))
    policy.eval()
    sampler = LearnedSampler(LearnedSampler.Config(mode="greedy", cutoff=0.5, temperature=1.0), policy=policy)
    prompts = [lm.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    out = decode(lm.model, prompts, sampler, gen_length=L, seeds=[5, 6, 7], pad_id=lm.spec.pad_id,
                 device=torch.device("cpu"), record=True)
    assert {r.block for r in out.steps} == {0, 1}  # both canvases
    assert all(r.masked.all() for r in out.steps if r.step == 0)  # a canvas starts as noise
    sizes = set()
    with torch.no_grad():
        for r in out.steps:
            logits = policy.logits_for(r.conf, r.margin, r.entropy, r.masked, r.eligible)
            act = torch.sigmoid(logits) > 0.5
            act |= top_k(logits, r.eligible, 1) & ~act.any(-1, keepdim=True)
            assert torch.equal(act, r.action)
            assert torch.isfinite(action_logprob(policy.cfg, logits, r.action, None, r.eligible)).all()
            sizes |= set(r.action.sum(-1).tolist())
    assert len(sizes) > 2  # the policy keeps varying numbers of positions


@pytest.mark.slow
def test_grpo_trains_a_policy_that_runs_through_the_cli(tmp_path):
    """GRPO steps on the tiny DiffusionGemma (its command line, in this process), then `lm_eval --model
    dllm` with that policy."""
    from train.grpo import main as grpo_main

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dg_ckpt = build_tiny_checkpoint(tmp_path / "dg", max_denoising_steps=4)  # a short run
    out = tmp_path / "grpo"
    grpo_main(["--pretrained", str(dg_ckpt), "--steps", "6", "--group", "2", "--prompts-per-step", "1",
               "--inner-steps", "1", "--val-size", "1", "--val-every", "3", "--gen-length", "16", "--batch-size", "2",
               "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and (out / "best").is_dir()
    assert [r["step"] for r in log if "val_reward" in r] == [3, 6]
    res = subprocess.run(["lm_eval", "--model", "dllm", "--model_args",
                          f"pretrained={dg_ckpt},sampler=learned,policy={out / 'best'},gen_length=16,dtype=float32",
                          "--tasks", "modchain", "--limit", "2", "--device", "cpu",
                          "--output_path", str(tmp_path / "ev")],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    [path] = (tmp_path / "ev").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["config"]["dllm"]["sampler"] == "learned"
    assert results["results"]["modchain"]["nfe,none"] >= 1


@pytest.mark.slow
def test_cli_default_is_generate_for_10_prompts(dg_ckpt, official, early):
    """`lm_eval --model dllm` (no sampler=, batch size 1): each logged sample's text and tokens_per_forward
    are those of `generate()` on its prompt under its seed."""
    res = early.result(CLI_TEST)
    assert res.returncode == 0, res.stderr[-2000:]
    logged = [json.loads(x) for x in next(early.out(CLI_TEST).rglob("samples_modchain_*.jsonl")).read_text().splitlines()]
    samples = list({s["doc_id"]: s for s in logged}.values())  # one line per doc and filter
    ck = read_checkpoint(str(dg_ckpt))
    assert len(samples) == 10
    for s in samples:
        context, gen_kwargs = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        ids = ck.tokenizer(context)["input_ids"]
        ref = _generate(official, ids, sample_seed(DLLMConfig.seed, context, 0))
        until = stop_strings(gen_kwargs, ck.tokenizer, ck.spec)
        assert s["resps"][0][0] == completion_text(ref.sequences[0, len(ids):].tolist(), ck.tokenizer, ck.spec, until)
        assert s["dllm"]["tpf"] == pytest.approx(float(ref.tokens_per_forward[0]), rel=FP32_QUOTIENT)


def test_sharded_bf16_checkpoint_and_chat_template(tmp_path):
    """Shards with an index load as one model in bfloat16 (the dtype asked for); the chat template is
    the checkpoint's, applied once (no second BOS) before decoding."""
    ck = build_tiny_checkpoint(tmp_path / "sharded", shards=3, dtype=torch.bfloat16)
    assert (ck / "model.safetensors.index.json").exists() and len(list(ck.glob("*.safetensors"))) > 1
    lm = DLLM(pretrained=str(ck), device="cpu", dtype="bfloat16", gen_length=16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    prompt = lm.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert prompt == "<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    ids = lm.gen.encode(prompt, 16)
    assert ids.count(lm.tokenizer.bos_token_id) == 1 and ids[0] == lm.tokenizer.bos_token_id
    [text] = lm.generate_until(_requests([prompt], 16), disable_tqdm=True)
    assert isinstance(text, str) and lm.stats["dg"][0]["nfe"] >= 1


@pytest.mark.slow
def test_results_dry_run_plans_the_family_grid(early):
    """`python -m results --dry-run` on a DiffusionGemma: its canvas as the one block, only its samplers."""
    res = early.result(DRY_RUN_TEST)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "blocks 16," in res.stdout and "| modchain" in res.stdout
    n_settings = int(res.stdout.split(" sampler settings per block")[0].rsplit(" ", 1)[-1])
    sweeps = [p for s, ps in SWEEPS.items() if s in ("eb", "threshold", "factor") for p in ps or [{}]]
    assert n_settings == len(sweeps)  # no policy here: learned is left out, the top-k samplers too


class KeepAll(Sampler):
    """A user's own sampler (module:Class): keeps every position."""

    @dataclass(frozen=True)
    class Config:
        pass

    seen = []  # each step's proposal (StepState.x0)

    def select(self, state):
        KeepAll.seen.append(state.x0.clone())
        return state.eligible.clone()


def test_a_users_own_sampler_is_taken_as_the_rule(dg_ckpt):
    KeepAll.seen.clear()
    lm = DLLM(pretrained=str(dg_ckpt), device="cpu", dtype="float32", sampler="tests.test_diffusion_gemma:KeepAll")
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    out = decode(lm.model, [ids], lm.sampler, gen_length=16, seeds=[3], pad_id=lm.spec.pad_id,
                 device=torch.device("cpu"), record=True)
    assert all(r.action.all() for r in out.steps)
    assert all(not r.masked.any() for r in out.steps if r.step > 0)  # nothing re-noised after a keep-all step
    # the sampler saw each step's proposal (what a commit writes), one token id per position
    assert len(KeepAll.seen) == len(out.steps)
    assert all(x.dtype == torch.long and x.shape == r.conf.shape for x, r in zip(KeepAll.seen, out.steps))
