"""Parity with Fast-dLLM (../shared/reference/fast-dllm, skipped where absent): with compat=fast-dllm
our loop gives the same tokens and NFE as its `generate`, `generate_with_prefix_cache` and
`generate_with_dual_cache` for the threshold rule (two tau) and top-k (LLaDA's low-confidence
remasking, `confidence` with k = 4 = block / steps per block), at B = 8 and 32, on 20 prompts of 8-40
tokens, our batch 1 and batch 8 against its batch 1 (it decodes one row at a time).

The model is a tiny random LLaDA (the official config and weight names) with a 1,024-token
vocabulary so that both loops run in seconds. Not compared: the factor rule (not in Fast-dLLM at
the reference commit 24cc59e), temperature > 0 (its Gumbel noise comes from torch's global
generator), and `window` / `refresh` (it has neither; refused with compat).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lm_eval_dllm.compat import check_compat
from lm_eval_dllm.config import DLLMConfig
from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint
from lm_eval_dllm.utils import DLLMError

from .fast_dllm_oracle import load_fast_dllm

L, V = 32, 1024
# our sampler and its parameters; Fast-dLLM's keywords for the same rule
RULES = {"threshold-0.9": ("threshold", {"tau": 0.9}, {"threshold": 0.9, "steps": L}),
         "threshold-0.5": ("threshold", {"tau": 0.5}, {"threshold": 0.5, "steps": L}),
         "top-4": ("confidence", {"k": 4}, {"steps": L // 4})}
LOGIT_SCALE = 5.0  # confident enough that both tau commit several tokens in some steps
FUNCTIONS = {"none": "generate", "prefix": "generate_with_prefix_cache", "dual": "generate_with_dual_cache"}


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_dllm")
    fd = load_fast_dllm(tmp)
    if fd is None:
        pytest.skip("no Fast-dLLM code at ../shared/reference/fast-dllm (only the developers' checkout has it)")
    # ids of the small vocabulary's specials: the real ones (126k) would not fit it
    ck = build_tiny_checkpoint(tmp / "llada", "llada", d_model=32, n_heads=4, logit_scale=LOGIT_SCALE,
                               vocab_size=V, embedding_size=V, mask_token_id=V - 2,
                               eos_token_id=V - 3, pad_token_id=V - 3)
    model, _, spec = load(str(ck), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V - 24, (8 + 32 * i // 19,), generator=g).tolist() for i in range(20)]
    ref = fd.LLaDAModelLM.from_pretrained(str(ck), torch_dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps are too small to share: one thread is faster
    yield SimpleNamespace(fd=fd, ref=ref, model=model, spec=spec, prompts=prompts)
    torch.set_num_threads(threads)


def reference_runs(fast, cache: str, block: int, rule: str) -> list[tuple[list[int], int]]:
    """(generated tokens, NFE) of Fast-dLLM's function for `cache`, one prompt at a time."""
    fn = getattr(fast.fd, FUNCTIONS[cache])
    out = []
    for p in fast.prompts:
        x, nfe = fn(fast.ref, torch.tensor([p]), gen_length=L, block_length=block,
                    mask_id=fast.spec.mask_id, **RULES[rule][2])
        out.append((x[0, len(p):].tolist(), int(nfe)))
    return out


def ours(fast, cache: str, block: int, rule: str, batch: int, compat: str = "fast-dllm"):
    name, params, _ = RULES[rule]
    out = []
    for i in range(0, len(fast.prompts), batch):
        d = diffuse(model_forward(fast.model, fast.spec, cache), fast.prompts[i:i + batch], fast.spec,
                    make_sampler(name, params), L, block, compat=compat)
        out += list(zip(d.tokens.tolist(), d.nfe.tolist()))
    return out


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("block", [8, 32])
@pytest.mark.parametrize("cache", FUNCTIONS)
def test_same_tokens_and_nfe_as_fast_dllm(fast, cache, block, rule):
    want = reference_runs(fast, cache, block, rule)
    for batch in (1, 8):
        got = ours(fast, cache, block, rule, batch)
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not bad, (batch, bad[:3], [(got[i][1], want[i][1]) for i in bad[:3]])


def test_without_compat_the_no_op_forward_is_saved(fast):
    """What compat changes shows: in a cached loop, blocks that their first forward fills cost
    Fast-dLLM one forward more; ours (compat=none) skips it, so the NFE is lower on some prompts."""
    want = reference_runs(fast, "dual", 8, "threshold-0.5")
    got = ours(fast, "dual", 8, "threshold-0.5", 8, compat="none")
    assert all(g[1] <= w[1] for g, w in zip(got, want))
    assert sum(g[1] < w[1] for g, w in zip(got, want)) >= 5


def test_compat_values_and_what_it_cannot_reproduce():
    assert check_compat("fast-dllm").early_exit is False
    with pytest.raises(DLLMError, match=r"^compat='fast_dllm'; valid: none, fast-dllm$"):
        DLLMConfig.from_model_args({"compat": "fast_dllm"})
    with pytest.raises(DLLMError, match=r"^window=8 has no counterpart in compat=fast-dllm; valid: window=0"):
        DLLMConfig.from_model_args({"compat": "fast-dllm", "cache": "dual", "window": 8})
    assert DLLMConfig.from_model_args({"compat": "fast-dllm", "cache": "dual"}).compat == "fast-dllm"
