"""The key/value cache strategies of the decode loop (lm_eval_dllm.cache).

    python -m pytest -q tests/test_cache.py
"""

from __future__ import annotations

import pytest
import torch

from lm_eval_dllm.cache import CachedForward, span_forward
from lm_eval_dllm.config import DLLMConfig
from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.spec import spec_from
from lm_eval_dllm.testing import float_tol
from lm_eval_dllm.utils import DLLMError

TEXTS = ["Q: 1+2*3\nA: ", "Q: 9-8*7+6-5\nA: ", "hi", "Q: 4*4*4*4+1-2\nA: ", "x" * 30,
         "Q: 0\nA: ", "abc", "Q: 5+5+5+5\nA: "]


@pytest.fixture(scope="module", params=["tiny", "llada", "dream"])
def loaded(request):
    ck = request.getfixturevalue(f"{request.param}_ckpt")
    return load(str(ck), dtype="float32", device="cpu")


def canvas(tok, spec, L: int, filled: int, seed: int = 0):
    """Left-padded prompts + L positions, the first `filled` committed (random), the rest masked."""
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P + L), spec.pad_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    g = torch.Generator().manual_seed(seed)
    ids[:, P:] = spec.mask_id
    ids[:, P:P + filled] = torch.randint(3, 60, (len(prompts), filled), generator=g)
    return ids, attn, P


@pytest.mark.parametrize("mode,window", [("prefix", 0), ("dual", 0), ("dual", 3)])
def test_span_forward_with_current_keys_values_equals_the_full_forward(loaded, mode, window):
    """Mechanics exact: once the block's full forward has kept keys/values of the current canvas,
    a cached step on that canvas gives the full forward's logits on its span (padded rows
    included, and for a subset of rows as when some leave the block); so a cached decode differs
    from an uncached one only by the staleness of what it reuses."""
    model, tok, spec = loaded
    L, Bk = 16, 4
    shift = 1 if spec.shifted else 0
    ids, attn, P = canvas(tok, spec, L, filled=Bk)
    full = model_forward(model, spec)(ids, attn)  # (B, T, V)
    for b in (1, 3):  # a middle block, and the last (the suffix is empty)
        lo, hi = P + b * Bk - shift, P + (b + 1) * Bk  # Dream: the column before the block too
        cached = model_forward(model, spec, cache=mode, window=window)
        rows = torch.arange(ids.shape[0])
        cached.start_block(lo, hi)
        first, start, _ = cached.step(ids, attn, rows)
        assert start == 0 and torch.equal(first, full)
        end = ids.shape[1] if mode == "prefix" else min(hi + window, ids.shape[1])
        for sub in (rows, rows[1:], rows[[1, 3]]):
            part, start, _ = cached.step(ids[sub], attn[sub], sub)
            assert start == lo and part.shape[1] == end - lo
            tol = float_tol(full.abs().max(), max(model.config.d_ff, ids.shape[1]))  # longest reduction
            torch.testing.assert_close(part, full[sub, lo:end], rtol=0, atol=tol)


@pytest.mark.parametrize("mode,window", [("none", 0), ("prefix", 0), ("dual", 0), ("dual", 8)])
def test_batch_of_eight_equals_each_row_alone(tiny_loaded, mode, window):
    model, tok, spec = tiny_loaded
    fwd = model_forward(model, spec, cache=mode, window=window)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    s = make_sampler("threshold", {"tau": 0.3})
    batch = diffuse(fwd, prompts, spec, s, 24, 8, seeds=list(range(8)))
    for i, p in enumerate(prompts):
        one = diffuse(fwd, [p], spec, s, 24, 8, seeds=[i])
        assert torch.equal(one.tokens[0], batch.tokens[i]), (mode, i)
        assert one.nfe.item() == batch.nfe[i].item() and one.positions.item() == batch.positions[i].item()


@pytest.mark.parametrize("family", ["tiny", "dream"])
def test_refresh_every_step_is_the_uncached_decode(family, request):
    """refresh=1 makes every step a full forward: the cached loop's bookkeeping (spans, the kept
    statistics, Dream's shifted columns) then gives exactly the uncached result."""
    model, tok, spec = load(str(request.getfixturevalue(f"{family}_ckpt")), dtype="float32", device="cpu")
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    s = make_sampler("threshold", {"tau": 0.3})
    ref = diffuse(model_forward(model, spec), prompts, spec, s, 16, 4, seeds=list(range(4)))
    for mode in ("prefix", "dual"):
        out = diffuse(model_forward(model, spec, mode, refresh=1), prompts, spec, s, 16, 4,
                      seeds=list(range(4)))
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.nfe, ref.nfe)
        assert torch.equal(out.positions, ref.positions)


def test_cached_steps_compute_fewer_positions(tiny_loaded):
    model, tok, spec = tiny_loaded
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    s = make_sampler("confidence", {"k": 1})  # 8 steps per block: 1 full forward, 7 cached
    per = {}
    for mode, window in (("none", 0), ("prefix", 0), ("dual", 0), ("dual", 3), ("dual", 9)):
        out = diffuse(model_forward(model, spec, mode, window=window), prompts, spec, s, 16, 8,
                      seeds=[0, 1], early_exit=False)
        assert out.nfe.tolist() == [16, 16]
        per[mode, window] = out.positions
    T = torch.tensor([len(p) + 16 for p in prompts])
    assert torch.equal(per["none", 0], 16 * T)
    assert torch.equal(per["dual", 0], 2 * T + 14 * 8)  # per block: one full forward, then the block
    assert torch.equal(per["prefix", 0], 2 * T + 7 * 16 + 7 * 8)  # the block and what follows it
    assert torch.equal(per["dual", 3], 2 * T + 7 * 11 + 7 * 8)  # the block and 3 after it (none after the last)
    assert torch.equal(per["dual", 9], per["prefix", 0])  # a window past the canvas is prefix


def test_unsupported_models_and_bad_values_are_one_line():
    with pytest.raises(DLLMError, match="cache=dual is not supported by Linear; valid: cache=none, or "
                                        "a model that supports it: tiny, llada \\(impl=auto or native\\)"):
        model_forward(torch.nn.Linear(2, 2), None, cache="dual")
    assert span_forward(torch.nn.Linear(2, 2)) is None
    with pytest.raises(DLLMError, match="cache='both'; valid: none, prefix, dual"):
        DLLMConfig.from_model_args({"cache": "both"})
    with pytest.raises(DLLMError, match="refresh=-1 must be >= 0"):
        DLLMConfig.from_model_args({"cache": "dual", "refresh": -1})
    with pytest.raises(DLLMError, match="valid: prefix, dual"):
        CachedForward(lambda *a: None, "none")
    with pytest.raises(DLLMError, match="window=-1 must be >= 0"):
        DLLMConfig.from_model_args({"cache": "dual", "window": -1})
    with pytest.raises(DLLMError, match="window=8 applies to cache=dual only, not cache=prefix; valid: window=0, or cache=dual"):
        DLLMConfig.from_model_args({"cache": "prefix", "window": 8})


@pytest.mark.slow
def test_cache_through_lm_eval_reports_positions_per_forward(tiny_ckpt, task_manager):
    import lm_eval  # slow to import: only this test needs it

    res = lm_eval.simple_evaluate(
        model="dllm",
        model_args=f"pretrained={tiny_ckpt},sampler=confidence,block=8,cache=dual,window=8,batch_size=4,dtype=float32",
        tasks=["modchain"], limit=4, task_manager=task_manager, device="cpu", log_samples=True)
    row = res["results"]["modchain"]
    samples = [s["dllm"] for s in res["samples"]["modchain"] if s["filter"] == "strict-match"]
    assert res["config"]["dllm"]["cache"] == "dual" and res["config"]["dllm"]["window"] == 8
    assert row["positions_per_forward,none"] == pytest.approx(
        sum(s["positions"] for s in samples) / sum(s["nfe"] for s in samples))
    # a full forward computes the prompt and all 48 generated positions; per block, 1 full + 7 of
    # 16 (the block and the 8 after it)
    assert all(s["positions_per_forward"] < 48 for s in samples)


def test_unsupported_model_is_refused_before_its_weights_load(monkeypatch, tiny_ckpt):
    import lm_eval_dllm.model as model_mod
    from lm_eval_dllm.loading import read_checkpoint

    ck = read_checkpoint(str(tiny_ckpt))
    other_spec = spec_from(type("Cfg", (), {"model_type": "other_dllm", "mask_token_id": ck.spec.mask_id})(),
                           ck.tokenizer, remote=True)
    other = type(ck)(ck.path, False, other_spec, ck.tokenizer, other_spec)
    monkeypatch.setattr(model_mod, "read_checkpoint", lambda *a, **k: other)
    monkeypatch.setattr(model_mod, "load", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(DLLMError, match="cache=prefix is not supported by .*; valid: cache=none, or a "
                                        "model that supports it: tiny, llada"):
        model_mod.DLLM(pretrained=str(tiny_ckpt), cache="prefix", device="cpu")
