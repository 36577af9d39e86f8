"""The paper's own system (apple/ml-rl-dllm, in ../shared/reference) against ours: policy logits,
sampling log-likelihoods, checkpoints. The comparisons skip when the reference is absent."""

import collections
import importlib.util
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lm_eval_dllm.decode import StepRecord, diffuse, model_forward
from lm_eval_dllm.plackett_luce import pl_logprob, pl_sample
from lm_eval_dllm.policy import DiTPolicy, PolicyConfig, UnmaskPolicy, bernoulli_logprob, build_policy
from lm_eval_dllm.samplers.base import StepState
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.utils import DLLMError
from policies.import_paper import import_paper
from train.grpo import GRPOConfig, stack_steps, start_from, step_logprob
from train.grpo_loss import clipped_pg_loss

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
    import common.models.policy as policy

    yield {"policy": policy, "generation": generation, "sampling": sampling}
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
    ({"policy_type": "dit_hidden"}, "policy_type='dit_hidden'; valid: dit_confidence"),
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


def test_import_paper_refuses_a_weight_it_does_not_know(paper, tmp_path):
    weights, state = paper_checkpoint(paper, tmp_path / "run")
    save_file({**state, "base_policy.extra": torch.zeros(2)}, str(weights))
    with pytest.raises(DLLMError, match="--weights has 'base_policy.extra', which the YAML's architecture lacks"):
        import_paper(experiment_yaml(tmp_path / "exp.yaml"), weights, tmp_path / "pol")


@pytest.mark.slow
def test_imported_paper_policy_decodes_through_lm_eval(paper, tiny_ckpt, tmp_path):
    """The command line, then `lm_eval --model dllm ... sampler=learned,policy=DIR` on the bundled
    task, in block context with the paper's three-probability input; a bad YAML is one line."""
    weights, _ = paper_checkpoint(paper, tmp_path / "run", top_p=3)
    exp = experiment_yaml(tmp_path / "exp.yaml", confidences_top_p=3, policy_full_context="false")
    cmd = [sys.executable, "-m", "policies.import_paper", "--yaml", str(exp), "--weights", str(weights)]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "pol")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args",
                        f"pretrained={tiny_ckpt},sampler=learned,policy={tmp_path / 'pol'},block=8",
                        "--tasks", "modchain", "--limit", "2", "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())
    assert res["results"]["modchain"]["nfe,none"] >= 6  # one forward per block at least, 6 blocks
    bad = experiment_yaml(tmp_path / "bad.yaml", policy_heads=2)
    r = subprocess.run(cmd[:4] + [str(bad)] + cmd[5:] + ["--out", str(tmp_path / "bad")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("policies.import_paper: error: --yaml bad.yaml: unknown policy key")


@pytest.mark.slow
def test_grpo_trains_the_papers_arch_with_expert_steering(tmp_path, monkeypatch, task_manager):
    """train.grpo --arch dit_confidence in block context, with an expert: rollouts (the expert's
    too) record what the paper's policy reads, the update replays it and moves the weights, and
    OUT/last is a dit_confidence policy folder."""
    from train.grpo import GRPOConfig, train

    monkeypatch.setattr("lm_eval_dllm.reward.TaskManager", lambda *a, **k: task_manager)  # the session's index
    out = tmp_path / "run"
    cfg = GRPOConfig(task="modchain", block=8, steps=1, prompts_per_step=2, group=2, val_every=1, val_size=2,
                     arch="dit_confidence", top_p=2, full_context=False, expert_tau="0.9", lr=1e-3,
                     device="cpu", out=str(out))
    train(cfg, resume=False)
    pol = UnmaskPolicy.load(out / "last")
    assert isinstance(pol, DiTPolicy) and (pol.cfg.top_p, pol.cfg.full_context) == (2, False)
    torch.manual_seed(cfg.seed)
    fresh = build_policy(PolicyConfig(arch="dit_confidence", top_p=2, full_context=False))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), pol.state_dict().values()))
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert math.isfinite(rec["loss"]) and "0.9" in rec["expert"]


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


def rollouts(G: int, E: int, L: int, block: int, seed: int):
    """Hand-built rollouts of one prompt: G of the policy's, then E of experts; each step's mask,
    eligible set (masked, in the block), the top-2 probabilities and what was committed."""
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
                steps.append({"masked": masked.clone(), "eligible": eligible, "action": act, "top": top,
                              "block": b, "steps": len(steps)})
                masked = masked & ~act
        out.append(steps)
    return out


def paper_inputs(rolls, G, E, L, block, advantages, old_policy, trainer, fake):
    """The paper's policy_outputs: per batch (policy's, then the experts') (B, T, ...) tensors,
    steps after a rollout's last inactive; the old log-likelihoods by its own functions."""
    outputs = []
    for part, is_es in ((rolls[:G], False), (rolls[G:], True))[:2 if E else 1]:
        B, T = len(part), max(len(r) for r in part)
        m, samples, masks = (torch.zeros(B, T, L, dtype=torch.bool) for _ in range(3))
        c, t = torch.zeros(B, T, L, 2, dtype=torch.float64), torch.zeros(B, T, 1, dtype=torch.float64)
        for i, r in enumerate(part):
            for j, s in enumerate(r):
                m[i, j], samples[i, j], c[i, j] = s["masked"], s["action"], s["top"]
                masks[i, j] = s["masked"] if is_es else s["eligible"]  # full context: ES keeps policy_mask
                t[i, j] = s["steps"] * (1 / L)
        with torch.no_grad():
            old_logits = old_policy(m, c, t)
        old = trainer._compute_mask_loglikelihood(fake, samples, old_logits, masks)
        outputs.append({"samples": samples, "sampling_masks": masks, "old_per_timestep_logps": old,
                        "policy_inputs": (m, c, t)})
    return {"policy_outputs": outputs, "advantages": advantages}


@pytest.mark.parametrize("experts", [0, 2])
def test_grpo_loss_and_gradient_equal_the_papers_trainer(paper, paper_trainer, experts):
    """The paper's compute_loss (train/trainer.py) and train.grpo's (step_logprob, clipped_pg_loss
    with --loss-norm rollout, the expert mixture) on the same rollouts, advantages, old and new
    policies (the paper's DiTConfidencePolicy, full context, Bernoulli): same loss and gradient.
    In float64, so that what is compared is the computation and not float32's reduction order (the
    two batch their steps differently: (B, T) padded there, the steps that ran here; in float32
    gradients differ by up to ~4e-5 of the largest); the paper sums each rollout's terms in float32."""
    G, L, block = 4, 16, 8
    rolls = rollouts(G, experts, L, block, seed=experts)
    cfg = GRPOConfig(group=G, expert_tau=",".join(["0.9", "0.7"][:experts]), loss_norm="rollout")
    nets = []
    for seed in (1, 2):  # the behaviour policy, then the one being trained
        ref = paper["policy"].DiTConfidencePolicy(hidden_dim=32, feedforward_dim=64, num_heads=2,
                                                   confidences_top_p=2, time_embed_dim=16)
        randomise(ref, seed, scale=0.4)  # policies far enough apart that the ratio clip acts
        nets.append(paper["policy"].PolicyHFWrapper(ref, "dit_confidence").double())
    old_ref, new_ref = nets
    adv = torch.randn(G + experts, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = SimpleNamespace(es_thresholds=[0.9, 0.7][:experts] or None, timestep_batch_size=None, epsilon=0.5,
                           sampling_mode="bernoulli", dpls_stop_logit=0.0, loglikelihood_dtype=torch.float64,
                           fp16=False)
    fake = SimpleNamespace(args=args, beta=0.0, _metrics={"train": collections.defaultdict(list)},
                           accelerator=SimpleNamespace(gather_for_metrics=lambda x: x))
    fake._get_per_timestep_logps_block = types.MethodType(paper_trainer._get_per_timestep_logps_block, fake)
    inputs = paper_inputs(rolls, G, experts, L, block, adv, old_ref, paper_trainer, fake)
    ref_loss = paper_trainer.compute_loss(fake, new_ref, inputs)
    ref_loss.backward()

    pcfg = PolicyConfig(arch="dit_confidence", hidden=32, ff=64, heads=2, top_p=2, time_embed_dim=16,
                        full_context=True)
    old, new = build_policy(pcfg).double(), build_policy(pcfg).double()
    old.load_state_dict(old_ref.state_dict())
    new.load_state_dict(new_ref.state_dict())
    traj = [StepRecord(rows=torch.tensor([i]), conf=s["top"][None, :, 0], margin=torch.zeros(1, L),
                       entropy=torch.zeros(1, L), masked=s["masked"][None], eligible=s["eligible"][None],
                       action=s["action"][None], block=s["block"], num_blocks=L // block, step=0,
                       top=s["top"][None].double(), steps=torch.tensor([s["steps"]]), block_size=block)
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
