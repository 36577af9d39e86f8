"""The paper's rollout loop against ours: its `generate_unified` (common/generation/generation.py of
../shared/reference/ml-rl-dllm) with its DiTConfidencePolicy on a tiny LLaDA of its own code; its
actions are then fed through `decode.diffuse` with the same policy weights as `arch=dit_confidence`.
Likewise its DiTHiddenStatePolicy as `arch=dit_hidden`: there our loop runs our native LLaDA with the
official model's weights, whose hidden states reach the policy through the loop's own channel.
Step by step the canvas, the eligible set and the action's log-probability must agree, and at the
end the tokens and the NFE. Skipped when the reference is absent.

One difference of the two MDPs is set aside here on purpose (docs/paper_parity.md): the paper's loop
lets the mask token compete in the softmax; ours suppresses it (the family's suppress_ids). The spec
below suppresses nothing, so what is compared is everything else.
"""

import sys
from pathlib import Path

import pytest
import torch

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.models import NativeDLLM
from lm_eval_dllm.models.llada import arch_config, official_names
from lm_eval_dllm.plackett_luce import pl_logprob
from lm_eval_dllm.policy import PolicyConfig, bernoulli_logprob, build_policy
from lm_eval_dllm.samplers import Action
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.spec import FamilySpec
from lm_eval_dllm.models.llada import tiny_config as llada_config
from lm_eval_dllm.policy_dit import dllm_arch_of

PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ml-rl-dllm"
pytestmark = pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/reference/ml-rl-dllm is absent")
P, L, STOP = 6, 16, 0.0


@pytest.fixture(scope="module")
def paper():
    sys.path.insert(0, str(PAPER))
    import common.generation.generation as generation
    import common.generation.sampling as sampling
    import common.models.configuration_llada as configuration_llada
    import common.models.modeling_llada as modeling_llada
    import common.models.policy as policy

    yield {"generation": generation, "sampling": sampling, "policy": policy,
           "config": configuration_llada, "llada": modeling_llada}
    sys.path.remove(str(PAPER))


@pytest.fixture(scope="module")
def dllm(paper):
    """A tiny random LLaDA of the official code (the paper's copy), built directly (no remote-code
    loading); `use_cache` set as transformers 5 no longer keeps it. Its output layer is scaled so
    that its distributions are peaked, as a trained model's are, and confidences carry signal."""
    cfg = llada_config(32, 2, 4, 4)
    cfg.pop("auto_map")
    # a small vocabulary keeps each forward cheap: the mask and EOS move to its top ids (the loops
    # take them from this config), everything else is LLaDA-8B's
    vocab = 1024
    cfg |= {"vocab_size": vocab, "embedding_size": vocab, "mask_token_id": vocab - 1, "eos_token_id": vocab - 2,
            "pad_token_id": vocab - 2}
    config = paper["config"].LLaDAConfig(**cfg)
    config.use_cache = False  # PATCH(transformers>=5), as ../shared/reference/patches-transformers5
    torch.manual_seed(0)
    model = paper["llada"].LLaDAModelLM(config, init_params=True).eval()
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(10)
    native = NativeDLLM(arch_config(cfg))  # ours, with the official model's weights
    names, official = official_names(native.config), model.state_dict()
    native.load_state_dict({k: official[names[k]] for k in native.state_dict()})
    return model, config, native.eval()


class Recorder(torch.nn.Module):
    """The dLLM as the paper's loop calls it, keeping each step's canvas."""

    def __init__(self, model):
        super().__init__()
        self.model, self.canvases = model, []

    def forward(self, x, **kw):
        self.canvases.append(x.clone())
        return self.model(x, **kw)


class Replay(LearnedSampler):
    """The learned sampler with our policy, committing what the paper's loop committed at the same
    step (its active rows, in order); it keeps each step's state and our policy's logits."""

    def __init__(self, policy, mode, actions, ranks, active):
        super().__init__(LearnedSampler.Config(mode=mode, temperature=1.0), policy=policy)
        self.actions, self.ranks, self.active, self.seen = actions, ranks, active, []

    def select(self, state):
        k = len(self.seen)
        rows = self.active[k]
        assert state.eligible.shape[0] == len(rows)
        self.seen.append((state, self.logits(state)))
        return Action(self.actions[k][rows], None if self.ranks is None else self.ranks[k][rows])


def to_canvas(t: torch.Tensor, start: int, fill) -> torch.Tensor:
    """(B, n) of the policy's context -> (B, L): placed at `start` (n = L: as it is)."""
    if t.shape[-1] == L:
        return t
    out = torch.full((t.shape[0], L), fill, dtype=t.dtype)
    out[:, start:start + t.shape[-1]] = t
    return out


def dpls_ranks(samples: torch.Tensor, start: int) -> torch.Tensor:
    """The paper's dpls index sequences (B, n; -1 padded) as our commit order (B, L; -1 = none)."""
    B, n = samples.shape
    rank = torch.full((B, L + 1), -1)
    idx = torch.where(samples >= 0, samples + (start if n < L else 0), L)
    return rank.scatter(-1, idx, torch.arange(n).expand(B, n))[:, :L]


@pytest.mark.slow
@pytest.mark.parametrize("arch,mode,block,full_context", [
    ("dit_confidence", "bernoulli", 8, True), ("dit_confidence", "dpls", 8, True),  # semi-autoregressive
    ("dit_confidence", "bernoulli-argmax", 8, False),
    ("dit_confidence", "bernoulli", L, True), ("dit_confidence", "bernoulli-argmax", L, True),  # full diffusion
    ("dit_confidence", "dpls", L, True),
    ("dit_hidden", "bernoulli", 8, False), ("dit_hidden", "dpls", 8, True), ("dit_hidden", "bernoulli-argmax", L, True),
])
def test_our_loop_replays_the_papers_rollout(paper, dllm, arch, mode, block, full_context):
    """Semi-AR and full diffusion, each of the paper's sampling modes, block and full context, both networks."""
    model, config, native = dllm
    torch.manual_seed(1)  # the module's own init draws from the global generator
    if arch == "dit_hidden":
        ref = paper["policy"].DiTHiddenStatePolicy(model, smart_init=-3.0, time_embed_dim=16)
    else:
        ref = paper["policy"].DiTConfidencePolicy(hidden_dim=32, feedforward_dim=64, num_heads=2,
                                                   confidences_top_p=2, smart_init=-3.0, time_embed_dim=16)
    g = torch.Generator().manual_seed(1)
    # 32 unit-scale hidden features (not 2 probabilities) through 32-wide adaLN: smaller weights keep
    # its logits spread as the other's, so that plain Bernoulli steps are sometimes empty
    scale = 0.05 if arch == "dit_hidden" else 0.3
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    wrapped = paper["policy"].PolicyHFWrapper(ref, arch)
    prompts = torch.randint(0, config.eos_token_id, (2, P), generator=g)
    rec = Recorder(model)
    torch.manual_seed(2)  # the paper's loop samples from the global generator
    with torch.no_grad():
        res = paper["generation"].generate_unified(
            rec, prompts, "policy", policy=wrapped, gen_length=L, block_length=block, mask_id=config.mask_token_id,
            sampling_mode=mode, dpls_stop_logit=STOP, full_context=full_context, confidences_top_p=2)
    T, mask_id = res.samples.shape[1], config.mask_token_id
    assert len(rec.canvases) == T  # one forward a step
    starts = block_starts(rec.canvases, block, mask_id)
    masks = [to_canvas(res.sampling_masks[:, k], starts[k], False) for k in range(T)]  # (B, L) each
    active = [m.any(-1).nonzero().squeeze(-1) for m in masks]
    if mode == "dpls":
        ranks = [dpls_ranks(res.samples[:, k], starts[k]) for k in range(T)]
        actions = [r >= 0 for r in ranks]
    else:
        ranks, actions = None, [to_canvas(res.samples[:, k], starts[k], False) for k in range(T)]
    paper_lp = replayed_logliks(paper, res, mode)  # (B, T) by the paper's own functions

    ours = build_policy(PolicyConfig(arch=arch, hidden=32, ff=64, heads=2, top_p=2, time_embed_dim=16,
                                     full_context=full_context, stop_logit=STOP,
                                     sampling="pl" if mode == "dpls" else "bernoulli",
                                     dllm_arch=dllm_arch_of(native) if arch == "dit_hidden" else {}))
    ours.load_state_dict(wrapped.state_dict())
    sampler = Replay(ours, mode, actions, ranks, active)
    spec = FamilySpec(family="llada", mask_id=mask_id, stop_ids=(config.eos_token_id,), pad_id=config.eos_token_id,
                      shifted=False, suppress_ids=(), max_length=None, default_gen_length=L, default_block=block)
    canvases = []

    def forward(ids, attn):
        canvases.append(ids.clone())
        return model(ids).logits

    if arch == "dit_hidden":  # our native model: the loop's hidden-state channel needs a forward of ours
        forward = model_forward(native, spec)
        hook = native.register_forward_pre_hook(lambda _m, args: canvases.append(args[0].clone()))
    out = diffuse(forward, prompts.tolist(), spec, sampler, gen_length=L, block=block, early_exit=False)
    if arch == "dit_hidden":
        hook.remove()
    assert len(sampler.seen) == T
    # the one place the canvases may part: the paper's bernoulli-argmax forces a pick on rows with
    # nothing eligible too (see the test below), rewriting a committed token; ours never does
    rewritten = torch.zeros(len(prompts), P + L, dtype=torch.bool)
    for k, (state, logits) in enumerate(sampler.seen):
        rows = active[k]
        differ = canvases[k] != rec.canvases[k][rows]
        assert not (differ & ~rewritten[rows]).any(), f"step {k}: canvas"
        rewritten[:, P:] |= actions[k] & ~masks[k].any(-1, keepdim=True)
        assert torch.equal(state.eligible, masks[k][rows]), f"step {k}: eligible set"
        if mode == "dpls":
            lp = pl_logprob(logits, ranks[k][rows], state.eligible, STOP)
        else:
            lp = bernoulli_logprob(logits, actions[k][rows], state.eligible)
        assert torch.allclose(lp, paper_lp[rows, k], rtol=0, atol=1e-5), f"step {k}: log-probability"
    assert not ((out.tokens != res.sequences[:, P:]) & ~rewritten[:, P:]).any()
    assert mode == "bernoulli-argmax" or not rewritten.any()
    assert torch.equal(out.nfe, res.steps_taken.long())
    if mode == "bernoulli":  # the paper's plain Bernoulli passes: some steps commit nothing
        assert any(not (a[r].any(-1)).all() for a, r in zip(actions, active))


def block_starts(canvases, block: int, mask_id: int) -> list[int]:
    """The block each of the paper's steps worked on, replayed from its canvases: a block runs while
    it has masks, at most `block` steps (its inner loop)."""
    starts, k = [], 0
    for b in range(0, L, block):
        n = 0
        while n < block and k < len(canvases) and (canvases[k][:, P + b:P + b + block] == mask_id).any():
            starts.append(b)
            k, n = k + 1, n + 1
    return starts


def replayed_logliks(paper, res, mode: str) -> torch.Tensor:
    """(B, T) the paper's log-likelihood of each step's action under the logits it sampled them from."""
    s = paper["sampling"]
    if mode == "dpls":
        return s.dpls_batch_loglik(res.samples, res.sampling_inputs, STOP, res.sampling_masks, dtype=torch.float32)
    return s.bernoulli_batch_loglik(res.samples, res.sampling_inputs, res.sampling_masks, dtype=torch.float32)


def test_papers_bernoulli_argmax_rewrites_a_committed_token(paper):
    """A fact of the paper's loop that ours does not share: with bernoulli-argmax, a row whose
    block is already full still gets a forced pick, the argmax over all -inf logits (index 0), so
    the first position of its context is overwritten with the step's proposal."""
    B, BL = 2, 4
    mask_index = torch.zeros(B, BL, dtype=torch.bool)
    mask_index[0] = True  # row 0 still has its block masked, row 1 has none left

    def never(m, c, t):
        return torch.full(m.shape, -50.0)  # no coin comes up

    unmask, _ = paper["generation"]._policy_unmask_decisions(
        mask_index, mask_index, torch.softmax(torch.randn(B, BL, 10), -1), torch.zeros(B, BL, dtype=torch.long),
        torch.zeros(B, dtype=torch.int32), slice(0, BL), BL, never, "dit_confidence", "bernoulli-argmax",
        False, 1, None, 0)
    assert unmask[0].sum() == 1  # the forced pick where something is masked, as ours
    assert unmask[1, 0] and not mask_index[1, 0]  # and one on a committed position, unlike ours
