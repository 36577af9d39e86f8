"""Native LLaDA and Dream: equal to the official code, padding-safe, sharded, dtype-true.

The comparisons with the official code (../shared/reference, skipped where it is absent) run in
one subprocess per revision (`tests/native_oracle.py` says why), all at once (`tests/background.py`)."""

import json

import pytest
import torch

from lm_eval_dllm.decode import diffuse, model_forward, positions_from
from lm_eval_dllm.loading import load
from lm_eval_dllm.models import NativeDLLM
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint, float_tol
from lm_eval_dllm.utils import DLLMError

from .background import OracleRuns, selected
from .native_oracle import REFERENCE

needs_reference = pytest.mark.skipif(not (REFERENCE / "llada" / "modeling_llada.py").exists(),
                                     reason=f"no official model code at {REFERENCE}")


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    """One oracle process per revision the selected tests compare (logits, and decode when its test
    is selected: one process gives both), and one for the unpatched code, all started at once."""
    runs = OracleRuns("tests.native_oracle", tmp_path_factory.mktemp("native_oracle"), timeout=600)
    if (REFERENCE / "llada" / "modeling_llada.py").exists():
        decode, logits = ({it.callspec.params["revision"] for it in selected(request, test)} for test in (
            "test_native_decodes_the_tokens_of_the_official_code", "test_native_logits_equal_the_official_code"))
        for revision in ("llada-A", "llada-B", "dream"):
            if revision in logits | decode:
                runs.start(revision, *(["--decode"] if revision in decode else []))
        if selected(request, "test_remote_code_failures_name_impl_native"):
            runs.start("remote-errors")
    yield runs
    runs.close()


@needs_reference
@pytest.mark.parametrize("revision", ["llada-A", "llada-B", "dream"])
def test_native_logits_equal_the_official_code(revision, oracle):
    rep = oracle.report(revision)["logits"]
    assert rep["native_class"] == "NativeDLLM"
    assert rep["official_class"] == {"dream": "DreamModel"}.get(revision, "LLaDAModelLM")
    tol = float_tol(rep["max_abs_logit"], rep["terms"])  # two implementations: sums in other orders
    assert rep["unpadded"] <= tol
    # loaded in bf16 both cast in the same places: equal up to bf16 rounding (exact on CPU)
    assert rep["unpadded_bf16"] <= 0.01 * rep["max_abs_logit_bf16"]
    assert rep["native_padded_vs_alone"] <= tol  # a left-padded row = the row alone
    if revision == "llada-A":  # the original LLaDA file ignores attention_mask: padding leaks in
        assert rep["padded"] > 1e-2 and rep["official_padded_vs_alone"] > 1e-2
    else:
        assert rep["padded"] <= tol  # rev B's 2-D mask, Dream's 4-D mask + position ids
    if revision == "dream":  # why the remote Dream path builds a 4-D mask
        assert rep["official_with_2d_mask"] == "RuntimeError"


@needs_reference
@pytest.mark.slow
@pytest.mark.parametrize("revision", ["llada-B", "dream"])
def test_native_decodes_the_tokens_of_the_official_code(revision, oracle):
    rep = oracle.report(revision)["decode"]
    for sampler in ("threshold", "learned"):
        r = rep[sampler]
        assert r["native_equals_remote"] and r["nfe_equal"], (sampler, r)
        assert r["distinct_tokens"] > 10 and r["mean_nfe"] > 2, r  # not a degenerate decode
    assert rep["threshold"]["batch8_equals_batch1"]  # native: a batch of 8 = each row alone


@needs_reference
def test_remote_code_failures_name_impl_native(oracle):
    """Unpatched official code under transformers 5: one line that says what to use instead."""
    rep = oracle.report("remote-errors")
    for family in ("llada", "dream"):
        msg = rep[family]
        if msg == "loaded":  # a transformers the official code still works with
            continue
        assert msg.startswith("DLLMError: the remote code of") and "\n" not in msg
        assert msg.endswith(f"valid: impl=native (the default for {'llada' if family == 'llada' else 'Dream'})")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_checkpoint_loads_the_same_weights(family, tmp_path):
    one = build_tiny_checkpoint(tmp_path / "one", family, d_model=16, seed=3)
    three = build_tiny_checkpoint(tmp_path / "three", family, d_model=16, seed=3, shards=3)
    assert (three / "model.safetensors.index.json").exists()
    assert len(list(three.glob("model-*-of-00003.safetensors"))) == 3
    a, _, _ = load(str(one), dtype="float32", device="cpu")
    b, _, _ = load(str(three), dtype="float32", device="cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_load_keeps_bf16_weights(tmp_path):
    ck = build_tiny_checkpoint(tmp_path / "bf16", "dream", d_model=16, dtype=torch.bfloat16)
    model, _, _ = load(str(ck), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    f32, _, _ = load(str(ck), dtype="float32", device="cpu")  # bf16 values, exactly, in float32
    assert torch.equal(model.embed.weight.float(), f32.embed.weight)


def test_native_is_the_default_and_impl_is_checked(llada_ckpt, tiny_ckpt):
    model, _, spec = load(str(llada_ckpt), dtype="float32", device="cpu")
    assert isinstance(model, NativeDLLM) and spec.family == "llada"
    with pytest.raises(DLLMError, match="impl='fast'; valid: auto, native, remote"):
        load(str(llada_ckpt), impl="fast")
    with pytest.raises(DLLMError, match="impl=native: .* has no native implementation; "
                                        "valid: impl=auto or impl=remote, or .*llada, dream"):
        load(str(tiny_ckpt), impl="native")


def test_unsupported_config_is_one_line_naming_impl_remote(tmp_path):
    ck = build_tiny_checkpoint(tmp_path / "seq", "llada", d_model=16)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(config | {"block_type": "sequential"}))
    with pytest.raises(DLLMError, match="block_type='sequential' is not supported .* valid: "
                                        "'llama' \\(or impl=remote"):
        load(str(ck))


def test_a_span_with_the_other_positions_keys_and_values_reproduces_the_full_forward(dream_ckpt):
    """The interface a cache plugs into: keys/values returned for one span and handed back
    in for another give the full forward's logits (what a prefix / dual cache relies on)."""
    model, _, _ = load(str(dream_ckpt), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 14), generator=g)  # (B, T)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # a left-padded row
    pos = positions_from(attn)
    full, kv = model(ids, attn, pos, return_kv=True)
    span = torch.arange(6, 10)
    rest = torch.tensor([i for i in range(14) if i not in span.tolist()])
    past = [(k[:, :, rest], v[:, :, rest]) for k, v in kv]
    part, _ = model(ids[:, span], torch.cat([attn[:, rest], attn[:, span]], 1), pos[:, span],
                    past_kv=past)
    tol = float_tol(full.abs().max(), max(model.config.d_ff, ids.shape[1]))  # the longest reduction
    torch.testing.assert_close(part, full[:, span], rtol=0, atol=tol)


def test_native_batch_equals_single_rows(llada_ckpt):
    model, tok, spec = load(str(llada_ckpt), dtype="float32", device="cpu")
    fwd = model_forward(model, spec)
    prompts = [tok(t)["input_ids"] for t in ["Q: 1+2*3\nA: ", "hi", "a longer prompt here", "x"]]
    s = make_sampler("threshold", {"tau": 0.3})
    batch = diffuse(fwd, prompts, spec, s, 8, 4, seeds=list(range(4)))
    for i, p in enumerate(prompts):
        assert torch.equal(diffuse(fwd, [p], spec, s, 8, 4, seeds=[i]).tokens[0], batch.tokens[i])


@pytest.mark.parametrize("family,key", [("llada", "weight_tying"), ("dream", "tie_word_embeddings")])
def test_tied_output_layer_checkpoints_load_without_one(family, key, tmp_path):
    ck = build_tiny_checkpoint(tmp_path / family, family, d_model=16, **{key: True})
    assert json.loads((ck / "config.json").read_text())[key] is True
    model, _, _ = load(str(ck), dtype="float32", device="cpu")
    assert model.head is None  # the embedding matrix is the output layer
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids)[0].shape == (1, 3, model.embed.weight.shape[0])
