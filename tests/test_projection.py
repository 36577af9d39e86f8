"""The output layer runs only on the columns the loop reads (the generated region; a likelihood
batch's targets), and results are identical to projecting the whole canvas and cutting."""

from __future__ import annotations

import pytest
import torch

from lm_eval_dllm.cache import FullForward
from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.likelihood import elbo_loglikelihoods
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler


@pytest.mark.parametrize("family", ["tiny", "dream"])
def test_projected_logits_give_the_same_decode_and_likelihood(family, tiny_ckpt, dream_ckpt):
    model, tok, spec = load(str(tiny_ckpt if family == "tiny" else dream_ckpt), dtype="float32", device="cpu")
    full = model_forward(model, spec)
    shapes = []

    def whole(ids, attn):  # the canvas projected whole, as before: the loop cuts what it reads
        logits = full(ids, attn)
        shapes.append(logits.shape[1])
        return logits

    prompts = [tok("Q: 1+2*3")["input_ids"], tok("a longer prompt here")["input_ids"]]
    P, L = max(map(len, prompts)), 16
    sampler = make_sampler("threshold", {"tau": 0.5})
    projected = []
    full.project = (lambda f: lambda ids, attn, out_from: projected.append(out_from) or f(ids, attn, out_from))(
        full.project)
    a = diffuse(full, prompts, spec, sampler, L, 8)
    assert set(projected) == {P - spec.shifted}  # the prompt's columns are not projected
    b = diffuse(FullForward(whole), prompts, spec, sampler, L, 8)
    assert set(shapes) == {P + L} and torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)
    pairs = [(prompts[0], tok("=7")["input_ids"], 0), (prompts[1], tok(" world!")["input_ids"], 1)]
    assert elbo_loglikelihoods(full, pairs, spec, 8, 8, 8) == elbo_loglikelihoods(whole, pairs, spec, 8, 8, 8)
