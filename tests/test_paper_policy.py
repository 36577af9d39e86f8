"""The paper's own system (apple/ml-rl-dllm, in ../shared/reference) against ours: policy logits,
sampling log-likelihoods, checkpoints. Skipped when the reference is absent."""

import sys
from pathlib import Path

import pytest
import torch

from lm_eval_dllm.policy import DiTPolicy, PolicyConfig
from lm_eval_dllm.samplers.base import StepState

PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ml-rl-dllm"
pytestmark = pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/reference/ml-rl-dllm is absent")
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def paper():
    """The paper's modules, imported from its code as it is."""
    sys.path.insert(0, str(PAPER))
    import common.generation.generation as generation
    import common.generation.sampling as sampling
    import common.models.policy as policy

    yield {"policy": policy, "generation": generation, "sampling": sampling}
    sys.path.remove(str(PAPER))


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (smart_init leaves the adaLN at zero, which would hide its wiring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


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
