"""The paper's own system (apple/ml-rl-dllm, in ../shared/reference) against ours: policy logits,
sampling log-likelihoods, checkpoints. The comparisons skip when the reference is absent."""

import collections
import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lm_eval_dllm.decode import StepRecord, diffuse, model_forward
from lm_eval_dllm.models.llada import arch_config as llada_arch_config
from lm_eval_dllm.models.llada import tiny_config as llada_tiny_config
from lm_eval_dllm.plackett_luce import pl_logprob, pl_sample
from lm_eval_dllm.policy import DiTPolicy, PolicyConfig, UnmaskPolicy, bernoulli_logprob, build_policy
from lm_eval_dllm.policy_dit import DLLM_ARCH_KEYS, dllm_arch_of, dllm_arch_of_config
from lm_eval_dllm.samplers.base import StepState
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.utils import DLLMError
from policies.import_paper import import_paper
from policies.import_paper import main as import_main  # its command line, run in-process
from train.grpo import GRPOConfig, stack_steps, start_from, step_logprob
from train.grpo_loss import clipped_pg_loss

from .background import Early, selected

PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ml-rl-dllm"
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def paper():
    """The paper's modules, imported from its code as it is; the tests that compare with it skip
    without ../shared (the others, of our own modes and training, run anywhere)."""
    if not PAPER.is_dir():
        pytest.skip("../shared/reference/ml-rl-dllm is absent")
    sys.path.insert(0, str(PAPER))
    import common.generation.generation as generation
    import common.generation.sampling as sampling
    import common.models.configuration_llada as configuration_llada
    import common.models.modeling_llada as modeling_llada
    import common.models.policy as policy

    yield {"policy": policy, "generation": generation, "sampling": sampling, "config": configuration_llada,
           "llada": modeling_llada}
    sys.path.remove(str(PAPER))


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter random (smart_init leaves the adaLN at zero, which would hide its wiring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def step(b: int, L: int, block: tuple[int, int], V: int = 50, seed: int = 0):
    """A random decode step: the dLLM's probabilities (b, L, V), what is masked, steps taken."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, L, V, generator=g) * 3, dim=-1)
    masked = torch.rand(b, L, generator=g) < 0.6
    masked[:, block[0]:] = True  # blocks after the current one are untouched
    in_block = torch.zeros(L, dtype=torch.bool)
    in_block[block[0]:block[1]] = True
    steps = torch.randint(0, L, (b,), generator=g, dtype=torch.int32)
    return probs, masked, masked & in_block, steps


@pytest.mark.parametrize("top_p", [1, 3])
@pytest.mark.parametrize("full_context", [False, True])
def test_dit_confidence_logits_equal_the_papers(paper, top_p, full_context):
    """Same state dict in both; the paper's inputs built by its own generation code from the dLLM's
    probabilities, ours from the decode loop's StepState: the logits agree to fp32 rounding."""
    ref = paper["policy"].DiTConfidencePolicy(hidden_dim=128, feedforward_dim=512, num_heads=2,
                                               confidences_top_p=top_p, smart_init=-2.0)
    randomise(ref, seed=top_p)
    wrapped = paper["policy"].PolicyHFWrapper(ref, "dit_confidence")
    ours = DiTPolicy(PolicyConfig(arch="dit_confidence", top_p=top_p, full_context=full_context))
    ours.load_state_dict(wrapped.state_dict())  # strict: every name and shape the paper's
    b, L, block = 3, 32, (8, 16)
    probs, masked, eligible, steps = step(b, L, block, seed=top_p)
    with torch.no_grad():
        ref_logits, _, sampling_mask, _ = paper["generation"]._compute_policy_logits(
            masked, eligible[:, block[0]:block[1]], probs, steps, slice(*block), L, wrapped, "dit_confidence",
            full_context, top_p, None, 0, 1.0)
    state = StepState(conf=probs.max(-1).values, margin=torch.zeros(b, L), entropy=torch.zeros(b, L),
                      masked=masked, eligible=eligible, generators=[], top=probs.topk(top_p, -1).values,
                      steps=steps, block_start=block[0], block_size=block[1] - block[0])
    with torch.no_grad():
        got = ours.step_logits(state)  # (b, L)
    got = got if full_context else got[:, block[0]:block[1]]
    assert got.shape == ref_logits.shape
    # a few hundred fp32 operations deep (128-wide sums, two LayerNorms, softmax attention)
    bound = 1e-5 * max(1.0, float(ref_logits.abs().max()))
    assert float((got - ref_logits).abs().max()) <= bound
    assert float(ref_logits.std()) > 100 * bound  # the inputs matter: not a constant the two agree on
    # the paper samples where we let the policy commit
    region = eligible if full_context else eligible[:, block[0]:block[1]]
    assert torch.equal(sampling_mask, region)


def paper_dllm(paper, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2, **changes):
    """A one-layer LLaDA of the official code (the paper's copy) with a small vocabulary: what the
    paper's DiTHiddenStatePolicy builds its extra block from (`dllm.model.config`); and its config.json."""
    cfg = llada_tiny_config(d_model, 1, n_heads, n_kv_heads)
    cfg.pop("auto_map")
    cfg |= {"vocab_size": 64, "embedding_size": 64, "mask_token_id": 63, "eos_token_id": 62, "pad_token_id": 62,
            **changes}
    config = paper["config"].LLaDAConfig(**cfg)
    config.use_cache = False  # PATCH(transformers>=5), as ../shared/reference/patches-transformers5
    return paper["llada"].LLaDAModelLM(config, init_params=True), cfg


@pytest.mark.parametrize("full_context,layers", [(False, 1), (True, 1), (True, 2)])
def test_dit_hidden_logits_equal_the_papers(paper, full_context, layers):
    """arch=dit_hidden against the paper's DiTHiddenStatePolicy built on a tiny official LLaDA (grouped
    keys/values, so the block's every setting is exercised): the same state dict in both, the paper's
    inputs built by its own generation code from the dLLM's output (hidden_states[-1] from the prompt
    on), ours from a StepState; the logits agree to fp32 rounding (in fact exactly: the same operations)."""
    dllm, cfg = paper_dllm(paper)
    ref = paper["policy"].DiTHiddenStatePolicy(dllm, time_embed_dim=16, smart_init=-2.0, num_blocks=layers)
    randomise(ref, seed=layers)
    wrapped = paper["policy"].PolicyHFWrapper(ref, "dit_hidden")
    arch = {k: getattr(llada_arch_config(cfg), k) for k in DLLM_ARCH_KEYS}
    assert dllm_arch_of_config(cfg) == arch
    ours = build_policy(PolicyConfig(arch="dit_hidden", dllm_arch=arch, layers=layers, time_embed_dim=16,
                                     full_context=full_context))
    assert (ours.cfg.hidden, ours.cfg.heads, ours.cfg.ff) == (32, 4, 96) and ours.reads_hidden and not ours.top_probs
    ours.load_state_dict(wrapped.state_dict())  # strict: every name and shape the paper's
    b, P, L, block = 3, 5, 32, (8, 16)
    probs, masked, eligible, steps = step(b, L, block, seed=layers)
    hidden = torch.randn(b, P + L, 32, generator=torch.Generator().manual_seed(layers))  # the dLLM's, prompt first
    with torch.no_grad():
        ref_logits, *_ = paper["generation"]._compute_policy_logits(
            masked, eligible[:, block[0]:block[1]], probs, steps, slice(*block), L, wrapped, "dit_hidden",
            full_context, 1, SimpleNamespace(hidden_states=(hidden,)), P, 1.0)
        state = StepState(conf=probs.max(-1).values, margin=torch.zeros(b, L), entropy=torch.zeros(b, L),
                          masked=masked, eligible=eligible, generators=[], steps=steps, hidden=hidden[:, P:],
                          block_start=block[0], block_size=block[1] - block[0])
        got = ours.step_logits(state)
    got = got if full_context else got[:, block[0]:block[1]]
    assert got.shape == ref_logits.shape
    bound = 1e-5 * max(1.0, float(ref_logits.abs().max()))
    assert float((got - ref_logits).abs().max()) <= bound
    assert float(ref_logits.std()) > 100 * bound


def test_dit_hidden_refuses_what_it_cannot_read_in_one_line(tiny_loaded):
    """No hidden states (a plain forward, as a remote model's), or a model of another width: one line each."""
    model, tok, spec = tiny_loaded
    arch = dllm_arch_of(model)
    pol = build_policy(PolicyConfig(arch="dit_hidden", dllm_arch=arch))
    sampler = LearnedSampler.from_policy(pol, mode="sample")
    with pytest.raises(DLLMError, match="reads the dLLM's last hidden states, which this model does not expose"):
        diffuse(lambda ids, attn: model(input_ids=ids, attention_mask=attn).logits, [tok("1+2")["input_ids"]],
                spec, sampler, gen_length=8, block=8)
    other = build_policy(PolicyConfig(arch="dit_hidden", dllm_arch={**arch, "d_model": 2 * arch["d_model"]}))
    with pytest.raises(DLLMError, match=f"made for a dLLM of hidden size {2 * arch['d_model']}, given hidden states "
                                        f"of size {arch['d_model']}"):
        diffuse(model_forward(model, spec), [tok("1+2")["input_ids"]], spec,
                LearnedSampler.from_policy(other, mode="sample"), gen_length=8, block=8)
    for bad, needle in (({**arch, "n_heads": 5}, "n_kv_heads dividing n_heads dividing d_model"),
                        ({**arch, "extra": 1}, "dllm_arch has 'extra'"), ({"d_model": 4}, "dllm_arch lacks 'n_heads'")):
        with pytest.raises(DLLMError, match=needle):
            PolicyConfig(arch="dit_hidden", dllm_arch=bad)
    with pytest.raises(DLLMError, match="policy dllm_arch given for arch 'dit_confidence'"):
        PolicyConfig(arch="dit_confidence", dllm_arch=arch)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_dit_hidden_reads_the_models_last_hidden_states(llada_ckpt, tiny_loaded, cache):
    """The decode loop's hidden-state channel, on the bundled model and a native LLaDA: each step's
    StepState.hidden is the model's final norm output at the columns (and from the forward) its
    statistics come from: the output layer applied to it gives back each position's confidence; and
    with cache=none, the logits of a plain forward over that step's canvas. (Under dual a block's
    later steps reuse stale keys/values, so there it is the span forward's, as the statistics are.)"""
    from lm_eval_dllm.loading import load

    for model, tok, spec in (tiny_loaded, load(str(llada_ckpt), dtype="float32", device="cpu")):
        pol = build_policy(PolicyConfig(arch="dit_hidden", dllm_arch=dllm_arch_of(model), full_context=False))
        randomise(pol, seed=0, scale=0.05)
        prompt = tok("1+2=")["input_ids"]
        L, block = 8, 4
        out = diffuse(model_forward(model, spec, cache), [prompt], spec, LearnedSampler.from_policy(pol, mode="sample"),
                      gen_length=L, block=block, early_exit=False, record=True)
        head = model.head if getattr(model, "head", None) is not None else (lambda h: F.linear(h, model.embed.weight))
        assert len(out.trajectory) > L // block  # some blocks took more than one step
        for r in out.trajectory:
            assert r.hidden is not None and r.hidden.shape == (1, L, pol.cfg.hidden)
            with torch.no_grad():
                got = head(r.hidden)  # (1, L, V)
            got[..., list(spec.suppress_ids)] = -float("inf")
            assert torch.allclose(got.softmax(-1).max(-1).values, r.conf, atol=1e-5, rtol=0)
            if cache == "none":
                canvas = torch.tensor([prompt + torch.where(r.masked[0], spec.mask_id, out.tokens[0]).tolist()])
                with torch.no_grad():
                    want = model_forward(model, spec)(canvas, torch.ones_like(canvas))[:, len(prompt):]  # (1, L, V)
                want[..., list(spec.suppress_ids)] = -float("inf")
                assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def ranks_to_samples(rank: torch.Tensor) -> torch.Tensor:
    """Our commit order (b, L; -1 = not committed) as the paper's DPLS samples (b, L): the committed
    indices in order, padded with -1."""
    key = torch.where(rank >= 0, rank, rank.shape[1] + 1)
    order = key.argsort(-1)
    return torch.where(rank.gather(-1, order) >= 0, order, -1)


def samples_to_ranks(samples: torch.Tensor) -> torch.Tensor:
    b, L = samples.shape
    rank = torch.full((b, L + 1), -1)  # padding lands in the extra column, dropped after
    pos = torch.arange(L).expand_as(samples)
    return rank.scatter(-1, torch.where(samples >= 0, samples, L), pos)[:, :L]


def test_bernoulli_loglik_equals_the_papers(paper):
    """One coin per eligible position: ours is exact in the logits; the paper's goes through a
    float32 sigmoid, so its log(1 - p) is off by up to eps * p / (1 - p) = eps * exp(logit)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 48, generator=g) * 3
    eligible = torch.rand(64, 48, generator=g) < 0.7
    action = (torch.rand(64, 48, generator=g) < torch.sigmoid(logits)) & eligible
    ref = paper["sampling"].bernoulli_batch_loglik(action, logits, eligible, dtype=torch.float32)
    got = bernoulli_logprob(logits, action, eligible)
    bound = (4 * FP32_EPS * (1 + logits.exp()) * eligible).sum(-1)  # per row: the sum of each term's error
    assert ((got - ref).abs() <= bound).all()
    assert float(ref.std()) > 1.0  # the actions matter


def test_dpls_loglik_equals_the_papers(paper):
    """Plackett-Luce with STOP: the paper's own draws (dpls_sample) scored by its dpls_batch_loglik
    and by our pl_logprob; and our draws (pl_sample) scored by both."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the paper's sampler draws from the global generator
    b, L, stop = 64, 24, 0.5
    logits = torch.randn(b, L, generator=g) * 2
    eligible = torch.rand(b, L, generator=g) < 0.6
    eligible[:, 0] = True  # every row has a first pick
    samples, chosen = paper["sampling"].dpls_sample(logits, stop, eligible)
    ours_rank = pl_sample(logits, eligible, stop, torch.rand(b, 2 * L + 1, generator=g))
    for s in (samples, ranks_to_samples(ours_rank)):
        ref = paper["sampling"].dpls_batch_loglik(s, logits, stop, eligible, dtype=torch.float32)
        got = pl_logprob(logits, samples_to_ranks(s), eligible, stop)
        # a logsumexp per pick over at most L + 1 terms of |utility| <= max |logit| + |stop|
        scale = float(logits.abs().max()) + abs(stop) + math.log(L + 1)
        bound = 4 * FP32_EPS * scale * (s >= 0).sum(-1).add(2)
        assert ((got - ref).abs() <= bound).all()
    assert torch.equal(samples_to_ranks(samples) >= 0, chosen)
    assert len(set((samples >= 0).sum(-1).tolist())) > 3  # steps of several sizes


class FixedPolicy(torch.nn.Module):
    """A stand-in policy with the given logits at every step."""

    def __init__(self, logits):
        super().__init__()
        self.fixed = torch.nn.Parameter(logits)
        self.cfg = PolicyConfig()

    def step_logits(self, s):
        return self.fixed.detach()[: s.masked.shape[0], : s.masked.shape[1]]


def test_bernoulli_argmax_forces_the_papers_argmax(paper):
    """Where no coin comes up, the paper's bernoulli-argmax commits the eligible argmax; so do we."""
    logits = torch.full((4, 16), -30.0)
    logits[:, 5], logits[:, 9] = -20.0, -10.0  # nothing is drawn; 9 wins where eligible
    eligible = torch.zeros(4, 16, dtype=torch.bool)
    eligible[:, 4:12] = True
    eligible[1, 9] = False  # then 5
    st = StepState(conf=torch.rand(4, 16), margin=torch.zeros(4, 16), entropy=torch.zeros(4, 16),
                   masked=eligible, eligible=eligible, generators=[torch.Generator().manual_seed(i) for i in range(4)])
    sampler = LearnedSampler(LearnedSampler.Config(mode="bernoulli-argmax", temperature=1.0), policy=FixedPolicy(logits))
    got = sampler.select(st).commit
    masked_logits = logits.masked_fill(~eligible, -torch.inf)
    want = torch.zeros_like(eligible).scatter(1, masked_logits.argmax(-1, keepdim=True), True)
    assert torch.equal(got, want)
    plain = LearnedSampler(LearnedSampler.Config(mode="bernoulli", temperature=1.0), policy=FixedPolicy(logits))
    assert not plain.select(st).commit.any()  # the paper's plain Bernoulli commits nothing


def test_plain_bernoulli_may_pass_and_a_block_gets_block_size_steps(tiny_loaded):
    """mode=bernoulli through the decode loop: steps that commit nothing are allowed, and a block
    gets at most block-size steps (the paper's inner loop), leaving what is still masked as masks."""
    model, tok, spec = tiny_loaded
    L, block = 16, 8
    logits = torch.full((2, L), -3.0)  # p = 0.047 a position: most steps commit nothing
    sampler = LearnedSampler(LearnedSampler.Config(mode="bernoulli", temperature=1.0), policy=FixedPolicy(logits))
    out = diffuse(model_forward(model, spec), [tok("1+2")["input_ids"], tok("3")["input_ids"]], spec, sampler,
                  gen_length=L, block=block, early_exit=False, record=True)
    assert (out.nfe == L).all()  # every block ran its block-size steps
    assert (out.tokens == spec.mask_id).any()  # left masked, as the paper leaves them
    assert (out.committed < L).all()
    empty = [int((~r.action.any(-1)).sum()) for r in out.trajectory]
    assert sum(empty) > 0 and max(r.step for r in out.trajectory) == block - 1


def paper_checkpoint(paper, folder: Path, top_p: int = 1, seed: int = 0) -> tuple[Path, dict]:
    """A policy built with the paper's code and saved as its trainer saves one: PolicyHFWrapper's
    state_dict in safetensors."""
    ref = paper["policy"].DiTConfidencePolicy(hidden_dim=128, feedforward_dim=512, num_heads=2,
                                               confidences_top_p=top_p, smart_init=-2.0, time_embed_dim=128)
    randomise(ref, seed)
    state = paper["policy"].PolicyHFWrapper(ref, "dit_confidence").state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors", state


def experiment_yaml(path: Path, **changes) -> Path:
    """The paper's BL32 experiment YAML, with `changes` (key: YAML text) appended or replaced."""
    lines = (PAPER / "configs" / "experiment_configs" / "llada_8b_instruct_dit_confidence_BL32_mixture.yaml"
             ).read_text().splitlines()
    lines = [ln for ln in lines if ln.split(":")[0] not in changes] + [f"{k}: {v}" for k, v in changes.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_paper_checkpoint_loads_by_name_and_trains_on(paper, tmp_path):
    weights, state = paper_checkpoint(paper, tmp_path / "run")
    out = import_paper(experiment_yaml(tmp_path / "exp.yaml"), weights, tmp_path / "pol")
    pol = UnmaskPolicy.load(out)  # any policy folder, whatever its arch
    assert isinstance(pol, DiTPolicy) and pol.card["origin"] == "apple/ml-rl-dllm"
    assert (pol.cfg.full_context, pol.cfg.block, pol.cfg.gen_length) == (True, 32, 256)
    assert pol.card["recommended"] == {"mode": "bernoulli", "temperature": 1.0}  # the paper's sampling
    assert all(torch.equal(pol.state_dict()[k], v) for k, v in state.items())
    run = build_policy(PolicyConfig(arch="dit_confidence"))  # train.grpo --arch dit_confidence --init-from
    start_from(run, str(out))
    assert all(torch.equal(run.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(DLLMError, match=r"--init-from .* has top_p=1; valid: a policy with this run's top_p=3"):
        start_from(build_policy(PolicyConfig(arch="dit_confidence", top_p=3)), str(out))


@pytest.mark.parametrize("changes,needle", [
    ({"policy_hiden_dim": 128}, "unknown policy key 'policy_hiden_dim'; valid: policy_type"),
    ({"policy_type": "dit_other"}, "policy_type='dit_other'; valid: dit_confidence, dit_hidden"),
    ({"policy_type": "dit_hidden"}, "policy_type dit_hidden is shaped by its dLLM's config, and the YAML's model_path "
                                    "'GSAI-ML/LLaDA-8B-Instruct' is not a local folder; valid: --dllm-config"),
    ({"sampling_mode": "topk"}, "sampling_mode='topk'; valid: bernoulli, bernoulli-argmax, dpls"),
    ({"policy_hidden_dim": 64}, "'base_policy.time_mlp.0.weight' has shape (128, 128), the YAML's architecture (64, 128)"),
    ({"confidences_top_p": 3}, "'base_policy.confidence_proj.weight' has shape (128, 1), the YAML's architecture (128, 3)"),
    ({"policy_num_blocks": 2}, "--weights lacks 'base_policy.transformer_blocks.1."),
])
def test_import_paper_refuses_what_does_not_match_in_one_line(paper, tmp_path, changes, needle):
    weights, _ = paper_checkpoint(paper, tmp_path / "run")
    with pytest.raises(DLLMError, match=re.escape(needle)) as e:
        import_paper(experiment_yaml(tmp_path / "exp.yaml", **changes), weights, tmp_path / "pol")
    assert "\n" not in str(e.value) and not (tmp_path / "pol").exists()


def paper_hidden_checkpoint(paper, folder: Path, dllm, seed: int = 0) -> tuple[Path, dict]:
    """A DiTHiddenStatePolicy built with the paper's code on `dllm`, saved as its trainer saves one."""
    ref = paper["policy"].DiTHiddenStatePolicy(dllm, time_embed_dim=128, smart_init=-2.0)
    randomise(ref, seed)
    state = paper["policy"].PolicyHFWrapper(ref, "dit_hidden").state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors", state


def write_config(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_import_paper_dit_hidden_with_its_dllm_config(paper, tmp_path):
    """policy_type dit_hidden: the extra block's shape comes from the dLLM's config.json (--dllm-config, or
    the YAML's model_path when local); the weights load by name, train on, and refuse another dLLM."""
    dllm, cfg = paper_dllm(paper)
    llada = write_config(tmp_path / "llada", cfg)
    weights, state = paper_hidden_checkpoint(paper, tmp_path / "run", dllm)
    out = import_paper(experiment_yaml(tmp_path / "exp.yaml", policy_type="dit_hidden"), weights, tmp_path / "pol", llada)
    pol = UnmaskPolicy.load(out)
    assert isinstance(pol, DiTPolicy) and pol.reads_hidden and pol.cfg.dllm_arch == dllm_arch_of_config(cfg)
    assert pol.card["dllm_config"] == str(llada) and pol.card["recommended"] == {"mode": "bernoulli", "temperature": 1.0}
    assert all(torch.equal(pol.state_dict()[k], v) for k, v in state.items())
    run = build_policy(PolicyConfig(arch="dit_hidden", dllm_arch=pol.cfg.dllm_arch))  # train.grpo --init-from
    start_from(run, str(out))
    assert all(torch.equal(run.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(DLLMError, match=r"--init-from .* has dllm_arch=.*'rope_theta': 500000.0.*; valid: a policy "
                                        r"with this run's dllm_arch=.*'rope_theta': 10000.0"):
        start_from(build_policy(PolicyConfig(arch="dit_hidden", dllm_arch={**pol.cfg.dllm_arch, "rope_theta": 1e4})),
                   str(out))
    local = experiment_yaml(tmp_path / "local.yaml", policy_type="dit_hidden", model_path=str(llada))
    again = UnmaskPolicy.load(import_paper(local, weights, tmp_path / "pol2"))
    assert again.cfg.dllm_arch == pol.cfg.dllm_arch and again.card["dllm_config"] == str(llada)
    wide = write_config(tmp_path / "wide", {**cfg, "d_model": 64, "mlp_hidden_size": 192})
    with pytest.raises(DLLMError, match=re.escape("--weights 'base_policy.time_mlp.0.weight' has shape (32, 128), the "
                                                  "YAML's architecture (64, 128)")):
        import_paper(experiment_yaml(tmp_path / "exp.yaml", policy_type="dit_hidden"), weights, tmp_path / "pol3", wide)
    with pytest.raises(DLLMError, match="--dllm-config .* is not a file"):
        import_paper(experiment_yaml(tmp_path / "exp.yaml", policy_type="dit_hidden"), weights, tmp_path / "pol4",
                     tmp_path / "nowhere")


def test_import_paper_refuses_a_weight_it_does_not_know(paper, tmp_path):
    weights, state = paper_checkpoint(paper, tmp_path / "run")
    save_file({**state, "base_policy.extra": torch.zeros(2)}, str(weights))
    with pytest.raises(DLLMError, match="--weights has 'base_policy.extra', which the YAML's architecture lacks"):
        import_paper(experiment_yaml(tmp_path / "exp.yaml"), weights, tmp_path / "pol")


DECODE_TEST = "test_imported_paper_policy_decodes_through_lm_eval"


@pytest.fixture(scope="module", autouse=True)
def imported(request, tiny_ckpt, tmp_path_factory):
    """For each selected arch of that slow test: the paper's checkpoint imported by the command line,
    then `lm_eval` decoding with it, started with the module (`tests/background.py`) -> arch ->
    (the paper's weights, the import's extra flags, where lm_eval writes)."""
    runs, made = Early(request, tmp_path_factory.mktemp("paper_early")), {}
    archs = [it.callspec.params["arch"] for it in selected(request, DECODE_TEST) if it.module is request.module]
    paper = request.getfixturevalue("paper") if archs and PAPER.is_dir() else None  # else that test skips
    for arch in archs if paper else []:
        tmp = runs.out(f"{DECODE_TEST}[{arch}]")
        if arch == "dit_confidence":
            weights, _ = paper_checkpoint(paper, tmp / "run", top_p=3)
            exp = experiment_yaml(tmp / "exp.yaml", confidences_top_p=3, policy_full_context="false")
            more = []
        else:  # the bundled architecture's block: its width, heads, feed-forward and RoPE base (policy_dit.tiny_arch)
            tiny = json.loads((tiny_ckpt / "config.json").read_text())
            dllm, _ = paper_dllm(paper, tiny["d_model"], tiny["n_heads"], tiny["n_heads"],
                                 mlp_hidden_size=tiny["d_ff"], rope_theta=tiny["rope_theta"])
            weights, _ = paper_hidden_checkpoint(paper, tmp / "run", dllm)
            exp = experiment_yaml(tmp / "exp.yaml", policy_type="dit_hidden", policy_full_context="false")
            more = ["--dllm-config", str(tiny_ckpt)]
        import_main(["--yaml", str(exp), "--weights", str(weights), *more, "--out", str(tmp / "pol")])
        runs.start(f"{DECODE_TEST}[{arch}]", [sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args",
                                              f"pretrained={tiny_ckpt},sampler=learned,policy={tmp / 'pol'},block=8,"
                                              "dtype=float32", "--tasks", "modchain", "--limit", "2",
                                              "--output_path", str(tmp / "res")], test=DECODE_TEST)
        made[arch] = (weights, more, tmp / "res")
    yield runs, made
    runs.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dit_confidence", "dit_hidden"])
def test_grpo_trains_the_papers_arch_with_expert_steering(tmp_path, monkeypatch, task_manager, arch):
    """train.grpo --arch dit_confidence / dit_hidden in block context, with an expert: rollouts (the
    expert's too) record what the paper's policy reads (top probabilities, or the bundled model's hidden
    states), the update replays it and moves the weights, and OUT/last is a policy folder of that arch."""
    from lm_eval_dllm.loading import load
    from lm_eval_dllm.tiny import BUNDLED_DIR
    from train.grpo import GRPOConfig, train

    monkeypatch.setattr("lm_eval_dllm.reward.TaskManager", lambda *a, **k: task_manager)  # the session's index
    out = tmp_path / "run"
    cfg = GRPOConfig(task="modchain", block=8, steps=1, prompts_per_step=2, group=2, val_every=1, val_size=2,
                     arch=arch, top_p=2, full_context=False, expert_tau="0.9", lr=1e-3,
                     device="cpu", dtype="float32", out=str(out))
    train(cfg, resume=False)
    pol = UnmaskPolicy.load(out / "last")
    assert isinstance(pol, DiTPolicy) and (pol.cfg.arch, pol.cfg.full_context) == (arch, False)
    want = PolicyConfig(arch=arch, top_p=2, full_context=False)
    if arch == "dit_hidden":
        want.dllm_arch = dllm_arch_of(load(str(BUNDLED_DIR), dtype="float32", device="cpu")[0])
        assert pol.cfg.dllm_arch == want.dllm_arch and pol.cfg.hidden == want.dllm_arch["d_model"]
    else:
        assert pol.cfg.top_p == 2
    torch.manual_seed(cfg.seed)
    fresh = build_policy(PolicyConfig(**{**want.__dict__}))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), pol.state_dict().values()))
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert math.isfinite(rec["loss"]) and "0.9" in rec["expert"]
    card = json.loads((out / "last" / "policy.json").read_text())["card"]
    assert card["arch"] == arch and "features" not in card  # --features does not apply to the paper's networks


@pytest.fixture(scope="module")
def paper_trainer(paper):
    """The paper's train/trainer.py as it is; the packages it imports only for its training run
    (trl, wandb, its S3 upload) stand in as empty modules, as nothing of them is used by the loss."""
    stubs = {name: types.ModuleType(name) for name in
             ("wandb", "trl", "trl.data_utils", "trl.models", "trl.trainer", "trl.trainer.grpo_config",
              "trl.trainer.grpo_trainer", "trl.trainer.utils", "common.s3")}
    stubs["trl.data_utils"].is_conversational = stubs["trl.data_utils"].maybe_apply_chat_template = None
    stubs["trl.models"].unwrap_model_for_generation = None
    stubs["trl.trainer.grpo_config"].GRPOConfig = object
    stubs["trl.trainer.grpo_trainer"].GRPOTrainer = type("GRPOTrainer", (), {})
    stubs["trl.trainer.utils"].print_prompt_completions_sample = None
    stubs["common.s3"].S3UploadCallback = type("S3UploadCallback", (), {})
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update({k: v for k, v in stubs.items() if saved[k] is None})
    spec = importlib.util.spec_from_file_location("paper_trainer", PAPER / "train" / "trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod.Trainer
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)


def rollouts(G: int, E: int, L: int, block: int, seed: int, D: int = 0):
    """Hand-built rollouts of one prompt: G of the policy's, then E of experts; each step's mask,
    eligible set (masked, in the block), the top-2 probabilities (or, D > 0, hidden states of width D)
    and what was committed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(G + E):
        masked, steps = torch.ones(L, dtype=torch.bool), []
        for b in range(L // block):
            while masked[b * block:(b + 1) * block].any():
                eligible = masked.clone()
                eligible[:b * block] = eligible[(b + 1) * block:] = False
                act = eligible & (torch.rand(L, generator=g) < 0.4)
                if not act.any():
                    act[eligible.nonzero()[0]] = True
                top = torch.rand(L, 2, generator=g).sort(-1, descending=True).values
                hidden = torch.randn(L, D, generator=g, dtype=torch.float64) if D else None
                steps.append({"masked": masked.clone(), "eligible": eligible, "action": act, "top": top,
                              "hidden": hidden, "block": b, "steps": len(steps)})
                masked = masked & ~act
        out.append(steps)
    return out


def paper_inputs(rolls, G, E, L, block, advantages, old_policy, trainer, fake, key="top"):
    """The paper's policy_outputs: per batch (policy's, then the experts') (B, T, ...) tensors,
    steps after a rollout's last inactive; the old log-likelihoods by its own functions. `key`: what
    each position brings (top: dit_confidence, hidden: dit_hidden)."""
    outputs = []
    for part, is_es in ((rolls[:G], False), (rolls[G:], True))[:2 if E else 1]:
        B, T = len(part), max(len(r) for r in part)
        m, samples, masks = (torch.zeros(B, T, L, dtype=torch.bool) for _ in range(3))
        c = torch.zeros(B, T, L, part[0][0][key].shape[-1], dtype=torch.float64)
        t = torch.zeros(B, T, 1, dtype=torch.float64)
        for i, r in enumerate(part):
            for j, s in enumerate(r):
                m[i, j], samples[i, j], c[i, j] = s["masked"], s["action"], s[key]
                masks[i, j] = s["masked"] if is_es else s["eligible"]  # full context: ES keeps policy_mask
                t[i, j] = s["steps"] * (1 / L)
        with torch.no_grad():
            old_logits = old_policy(m, c, t)
        old = trainer._compute_mask_loglikelihood(fake, samples, old_logits, masks)
        outputs.append({"samples": samples, "sampling_masks": masks, "old_per_timestep_logps": old,
                        "policy_inputs": (m, c, t)})
    return {"policy_outputs": outputs, "advantages": advantages}


@pytest.mark.parametrize("experts,arch", [(0, "dit_confidence"), (2, "dit_confidence"), (2, "dit_hidden")])
def test_grpo_loss_and_gradient_equal_the_papers_trainer(paper, paper_trainer, experts, arch):
    """The paper's compute_loss (train/trainer.py) and train.grpo's (step_logprob, clipped_pg_loss
    with --loss-norm rollout, the expert mixture) on the same rollouts, advantages, old and new
    policies (the paper's DiTConfidencePolicy or DiTHiddenStatePolicy, full context, Bernoulli): same
    loss and gradient.
    In float64, so that what is compared is the computation and not float32's reduction order (the
    two batch their steps differently: (B, T) padded there, the steps that ran here; in float32
    gradients differ by up to ~4e-5 of the largest); the paper sums each rollout's terms in float32."""
    G, L, block = 4, 16, 8
    hidden = arch == "dit_hidden"
    rolls = rollouts(G, experts, L, block, seed=experts, D=16 if hidden else 0)
    cfg = GRPOConfig(group=G, expert_tau=",".join(["0.9", "0.7"][:experts]), loss_norm="rollout")
    dllm, dllm_cfg = paper_dllm(paper, 16, 2, 2)
    nets = []
    for seed in (1, 2):  # the behaviour policy, then the one being trained
        if hidden:
            ref = paper["policy"].DiTHiddenStatePolicy(dllm, time_embed_dim=16)
        else:
            ref = paper["policy"].DiTConfidencePolicy(hidden_dim=32, feedforward_dim=64, num_heads=2,
                                                       confidences_top_p=2, time_embed_dim=16)
        randomise(ref, seed, scale=0.4)  # policies far enough apart that the ratio clip acts
        nets.append(paper["policy"].PolicyHFWrapper(ref, arch).double())
    old_ref, new_ref = nets
    adv = torch.randn(G + experts, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = SimpleNamespace(es_thresholds=[0.9, 0.7][:experts] or None, timestep_batch_size=None, epsilon=0.5,
                           sampling_mode="bernoulli", dpls_stop_logit=0.0, loglikelihood_dtype=torch.float64,
                           fp16=False)
    fake = SimpleNamespace(args=args, beta=0.0, _metrics={"train": collections.defaultdict(list)},
                           accelerator=SimpleNamespace(gather_for_metrics=lambda x: x))
    fake._get_per_timestep_logps_block = types.MethodType(paper_trainer._get_per_timestep_logps_block, fake)
    inputs = paper_inputs(rolls, G, experts, L, block, adv, old_ref, paper_trainer, fake, "hidden" if hidden else "top")
    ref_loss = paper_trainer.compute_loss(fake, new_ref, inputs)
    ref_loss.backward()

    pcfg = PolicyConfig(arch=arch, hidden=32, ff=64, heads=2, top_p=2, time_embed_dim=16, full_context=True,
                        dllm_arch=dllm_arch_of_config(dllm_cfg) if hidden else {})
    old, new = build_policy(pcfg).double(), build_policy(pcfg).double()
    old.load_state_dict(old_ref.state_dict())
    new.load_state_dict(new_ref.state_dict())
    traj = [StepRecord(rows=torch.tensor([i]), conf=s["top"][None, :, 0], margin=torch.zeros(1, L),
                       entropy=torch.zeros(1, L), masked=s["masked"][None], eligible=s["eligible"][None],
                       action=s["action"][None], block=s["block"], num_blocks=L // block, step=0,
                       top=s["top"][None].double(), steps=torch.tensor([s["steps"]]), block_size=block,
                       hidden=None if s["hidden"] is None else s["hidden"][None])
            for i, r in enumerate(rolls) for s in r]
    batch = stack_steps(traj, new)
    with torch.no_grad():
        old_logp = step_logprob(old, old, batch, cfg, n_policy=G)
    loss = clipped_pg_loss(step_logprob(new, new, batch, cfg, n_policy=G), old_logp, adv[batch["row"]],
                           cfg.clip_eps, batch["row"])
    loss.backward()
    rel = 1e-5
    assert abs(float(loss.detach() - ref_loss.detach())) <= rel * abs(float(ref_loss.detach()))
    ref_grads = dict(new_ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref_grads.values())
    for name, p in new.named_parameters():
        assert float((p.grad - ref_grads[name].grad).abs().max()) <= rel * scale, name
    ratio = torch.exp(step_logprob(new, new, batch, cfg, n_policy=G) - old_logp).detach()
    assert ((ratio < 0.5) | (ratio > 1.5)).any() and ((ratio > 0.5) & (ratio < 1.5)).any()  # both sides of the clip


def test_paper_mode_rolls_out_the_papers_plain_bernoulli(tmp_path):
    from train.grpo import check_config, policy_mode

    assert policy_mode(GRPOConfig(paper_mode=True)) == "bernoulli"
    assert policy_mode(GRPOConfig()) == "sample" and policy_mode(GRPOConfig(sampling="pl")) == "pl"
    with pytest.raises(DLLMError, match="--sampling 'pl'; valid: bernoulli with --paper-mode"):
        check_config(GRPOConfig(paper_mode=True, sampling="pl", out=str(tmp_path / "x")), resume=False, overwrite=False)
    # the threshold start is a skip path over our conf feature: a dit network has none, so it is refused
    with pytest.raises(DLLMError, match="--init 'threshold'; valid: slow with --arch dit_confidence"):
        check_config(GRPOConfig(arch="dit_confidence", init="threshold", out=str(tmp_path / "x")), resume=False,
                     overwrite=False)
    with pytest.raises(DLLMError, match="policy init 'threshold' with arch 'dit_hidden'; valid: init slow"):
        PolicyConfig(arch="dit_hidden", init="threshold")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dit_confidence", "dit_hidden"])
def test_imported_paper_policy_decodes_through_lm_eval(paper, imported, tmp_path, arch):
    """The command line, then `lm_eval --model dllm ... sampler=learned,policy=DIR` on the bundled
    task, in block context: DiTConfidencePolicy with the paper's three-probability input, or
    DiTHiddenStatePolicy with its block shaped as the bundled model (--dllm-config its folder); a bad
    YAML is one line. (Both run in `imported`, with the module; here, last in the file, their results
    are read.)"""
    runs, made = imported
    weights, more, out = made[arch]
    r = runs.result(f"{DECODE_TEST}[{arch}]")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    assert res["results"]["modchain"]["nfe,none"] >= 6  # one forward per block at least, 6 blocks
    bad = experiment_yaml(tmp_path / "bad.yaml", policy_heads=2)
    with pytest.raises(SystemExit) as e:
        import_main(["--yaml", str(bad), "--weights", str(weights), *more, "--out", str(tmp_path / "bad")])
    assert str(e.value).startswith("policies.import_paper: error: --yaml bad.yaml: unknown policy key")
    assert "\n" not in str(e.value)  # one line: Python prints a SystemExit's message alone, no traceback
