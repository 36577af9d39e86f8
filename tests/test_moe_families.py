"""Native LLaDA-MoE and LLaDA2.x against the official inclusionAI code (../shared/reference,
skipped where it is absent), one subprocess per family (`tests/moe_oracle.py` says how), the
families' processes running at once (`tests/background.py`)."""

import json

import pytest
import torch

from lm_eval_dllm.blocks import block_layout
from lm_eval_dllm.config import DLLMConfig
from lm_eval_dllm.decode import model_forward
from lm_eval_dllm.likelihood import elbo_loglikelihoods
from lm_eval_dllm.loading import load
from lm_eval_dllm.testing import build_tiny_checkpoint, float_tol
from lm_eval_dllm.utils import DLLMError

from .background import OracleRuns, selected
from .moe_oracle import CODE
from .native_oracle import REFERENCE
from .test_likelihood import exact_elbo

EPS32 = torch.finfo(torch.float32).eps
LOGITS_TESTS = ("test_native_llada_moe_logits_equal_the_official_code",
                "test_native_llada2x_logits_equal_the_official_code_under_its_block_mask")
GENERATE_TEST = "test_llada2x_threshold_decode_gives_the_tokens_of_its_official_generate"


def _family(item) -> str:
    return item.callspec.params["family"] if hasattr(item, "callspec") else "llada_moe"


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    """One oracle process per family the selected tests compare (logits, and official generate
    when its test is selected: one process gives both), all started at once."""
    runs = OracleRuns("tests.moe_oracle", tmp_path_factory.mktemp("moe_oracle"), timeout=1800)
    generate = {_family(it) for it in selected(request, GENERATE_TEST)}
    families = {_family(it) for test in LOGITS_TESTS for it in selected(request, test)} | generate
    for family in sorted(families, key=list(CODE).index):
        folder, _, modeling, _ = CODE[family]
        if (REFERENCE / folder / f"{modeling}.py").exists():
            runs.start(family, *(["--generate"] if family in generate else []))
    yield runs
    runs.close()


def bound(rep: dict) -> float:
    """fp32 rounding of logits of this magnitude through a few layers, and never above 1e-4."""
    return min(1e-4, 16 * EPS32 * rep["max_abs_logit"])


@pytest.mark.skipif(not (REFERENCE / "llada-moe" / "modeling_lladamoe.py").exists(),
                    reason=f"no official LLaDA-MoE code at {REFERENCE}")
def test_native_llada_moe_logits_equal_the_official_code(oracle):
    rep = oracle.report("llada_moe")["logits"]
    assert (rep["native_class"], rep["official_class"]) == ("NativeDLLM", "LLaDAMoEModelLM")
    assert rep["distinct_argmax"] > 10  # scaled output layer: decisions are not near ties
    assert rep["unpadded"] <= bound(rep)
    assert rep["padded"] <= bound(rep)  # it honours a 2-D mask plus position ids
    assert rep["native_padded_vs_alone"] <= bound(rep)  # a left-padded row = the row alone


@pytest.mark.skipif(not (REFERENCE / "llada2.1" / "modeling_llada21_moe.py").exists(),
                    reason=f"no official LLaDA2 / 2.1 code at {REFERENCE}")
@pytest.mark.parametrize("family", ["llada2", "llada21"])
def test_native_llada2x_logits_equal_the_official_code_under_its_block_mask(family, oracle):
    rep = oracle.report(family)["logits"]
    assert (rep["native_class"], rep["official_class"]) == ("NativeDLLM", "LLaDA2MoeModelLM")
    assert rep["distinct_argmax"] > 10
    assert rep["block_mask_changes_logits"] > 1.0  # the comparison would see a missing block mask
    assert rep["unpadded"] <= bound(rep)
    assert rep["padded"] <= bound(rep)  # its 4-D mask with padded keys, and position ids
    assert rep["native_padded_vs_alone"] <= bound(rep)


@pytest.mark.skipif(not (REFERENCE / "llada2.1" / "modeling_llada21_moe.py").exists(),
                    reason=f"no official LLaDA2 / 2.1 code at {REFERENCE}")
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada2", "llada21"])
def test_llada2x_threshold_decode_gives_the_tokens_of_its_official_generate(family, oracle):
    """Blocks aligned to absolute positions (first blocks partly prompt), threshold with at least
    one commit per step = official generate(steps=block_length) at batch 1 (LLaDA2.1: with its
    token editing off, which is not supported). LLaDA2 also: a batch of 8 = each row alone."""
    rep = oracle.report(family)["generate"]
    settings = [k for k in rep if k.startswith("B")]
    assert {"B8_tau0.95", "B32_tau0.6"} <= set(settings)  # both block lengths, two thresholds
    for setting in settings:
        assert all(rep[setting]["equal_official"]), (setting, rep[setting])
    assert ("batch8_equals_batch1" in rep) == (family == "llada2")
    if "batch8_equals_batch1" in rep:  # checked once, on LLaDA2 (one decode path for both)
        assert all(rep["batch8_equals_batch1"])  # per-row block offsets under left padding
        assert rep["distinct_tokens"] > 20  # not a degenerate decode


@pytest.mark.parametrize("key", ["editing_threshold", "max_post_steps"])
def test_llada21_token_editing_is_refused_in_one_line(key):
    with pytest.raises(DLLMError, match=f"^model_args {key}: LLaDA2.1's token editing is not "
                                        f"supported .*; valid: leave {key} unset$"):
        DLLMConfig.from_model_args({key: "0.9"})


def test_block_causal_families_refuse_a_cache_before_decoding(tmp_path):
    ck = build_tiny_checkpoint(tmp_path / "l2", "llada2", d_model=16, n_heads=2, n_kv_heads=2)
    model, _, spec = load(str(ck), dtype="float32", device="cpu")
    assert spec.block_causal and spec.family == "llada2"
    with pytest.raises(DLLMError, match="cache=prefix is not supported by the llada2 family"):
        model_forward(model, spec, cache="prefix")


def test_llada_moe_loglikelihood_is_the_exact_elbo_and_block_diffusion_refuses_it(tmp_path):
    """LLaDA-MoE scores as LLaDA does (aligned logits); LLaDA2's ELBO is a per-block one: refused."""
    ck = build_tiny_checkpoint(tmp_path / "moe", "llada_moe", d_model=16, n_heads=2, n_kv_heads=2)
    model, tok, spec = load(str(ck), dtype="float32", device="cpu")
    fwd = model_forward(model, spec)
    ctx, tgt = tok("Q: 7*")["input_ids"], tok("3=1")["input_ids"]
    (ll, _, forwards), = elbo_loglikelihoods(fwd, [(ctx, tgt, 0)], spec, 7, 8, 8)
    # two evaluations of one sum of log-probabilities (|ll| in magnitude) through the forward, whose
    # longest reduction is the widest of the model, the experts' and the shared expert's widths
    c = model.config
    terms = max(c.d_model, c.d_ff, (c.moe.d_expert + c.moe.d_shared) if c.moe else 0)
    assert forwards == 7
    assert abs(ll - exact_elbo(fwd, ctx, tgt, spec.mask_id, False)) <= float_tol(abs(ll), terms)
    ck2 = build_tiny_checkpoint(tmp_path / "l2", "llada2", d_model=16, n_heads=2, n_kv_heads=2)
    model2, _, spec2 = load(str(ck2), dtype="float32", device="cpu")
    with pytest.raises(DLLMError, match="loglikelihood is not supported for the block-diffusion "
                                        "family llada2; valid: generation tasks"):
        elbo_loglikelihoods(model_forward(model2, spec2), [(ctx, tgt, 0)], spec2, 7, 8, 8)


@pytest.mark.parametrize("family", ["llada_moe", "llada2"])
def test_sharded_bf16_checkpoints_load_bf16_weights(family, tmp_path):
    ck = build_tiny_checkpoint(tmp_path / family, family, d_model=16, n_heads=2, n_kv_heads=2,
                               shards=3, dtype=torch.bfloat16)
    assert len(list(ck.glob("model-*-of-00003.safetensors"))) == 3
    model, _, _ = load(str(ck), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    f32, _, _ = load(str(ck), dtype="float32", device="cpu")
    a, b = model.state_dict(), f32.state_dict()
    assert all(torch.equal(a[k].float(), b[k]) for k in a)  # the stored bf16 values, exactly


def test_llada_moe_published_as_model_type_llada_is_told_apart_from_llada(tmp_path, llada_ckpt):
    ck = build_tiny_checkpoint(tmp_path / "moe", "llada_moe", d_model=16, n_heads=2, n_kv_heads=2)
    assert json.loads((ck / "config.json").read_text())["model_type"] == "llada"  # as published
    assert load(str(ck), dtype="float32", device="cpu")[2].family == "llada_moe"
    assert load(str(llada_ckpt), dtype="float32", device="cpu")[2].family == "llada"


def test_blocks_align_to_absolute_positions_per_row_for_block_diffusion():
    lay = block_layout([13, 5, 16], gen_length=16, block=8, aligned=True)
    assert lay.offsets.tolist() == [5, 5, 0] and lay.lengths.tolist() == [19, 19, 16]
    assert (lay.width, lay.count) == (19, 3)
    first = lay.in_block(0)  # row 0: positions 13..15 finish its second block (8..15)
    assert first[0].nonzero().flatten().tolist() == [0, 1, 2] and first[2].sum() == 8
    assert lay.in_block(2)[2].sum() == 0  # an aligned row has one block fewer
    assert sum(lay.in_block(b).sum(-1) for b in range(lay.count)).tolist() == [19, 19, 16]
    flat = block_layout([13, 5], gen_length=16, block=8, aligned=False)  # masked families
    assert flat.offsets.tolist() == [0, 0] and (flat.width, flat.count) == (16, 2)
    assert flat.in_block(1)[:, 8:].all() and not flat.in_block(1)[:, :8].any()
