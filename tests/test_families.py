"""A model family is one module plus one registry line: a fourth family defined here decodes.

The toy family below is what a new family's file holds (facts, config and weight-name mapping to
the shared transformer, tiny test config); registering it is the only other change."""

import json

import pytest
import torch
from safetensors import safe_open

from lm_eval_dllm import models
from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.models import ArchConfig, Family, NativeDLLM, TinyFacts
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint
from lm_eval_dllm.utils import DLLMError

# ---- what a new family's module would hold --------------------------------------------------


def toy_arch(cfg: dict) -> ArchConfig:
    return ArchConfig(vocab_size=cfg["vocab"], d_model=cfg["width"], n_layers=cfg["depth"],
                      n_heads=cfg["heads"], n_kv_heads=cfg["kv_heads"], d_ff=2 * cfg["width"],
                      rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, out_bias=False,
                      mlp_bias=False, norm_bias=False)


def toy_names(c: ArchConfig) -> dict[str, str]:
    names = {"embed.weight": "tok_emb", "norm.weight": "final_norm", "head.weight": "unembed"}
    for i in range(c.n_layers):
        for ours in ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down"):
            names[f"layers.{i}.{ours}.weight"] = f"h{i}.{ours}"
    return names


def toy_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    return {"model_type": "toy_dllm", "vocab": 400, "width": d_model, "depth": n_layers,
            "heads": n_heads, "kv_heads": n_kv_heads, "mask_token_id": 300, "eos_token_id": 301,
            "pad_token_id": 301, "max_position_embeddings": 256}


TOY = Family(name="toy", model_type="toy_dllm", shifted=True, cache=True, arch_config=toy_arch,
             official_names=toy_names,
             tiny=TinyFacts(config=toy_config, mask=("<M>", 300), eos=("<E>", 301),
                            turn_end=("<T>", 302), chat_template="{{ messages[0]['content'] }}"))

# ----------------------------------------------------------------------------------------------


@pytest.fixture
def toy_ckpt(tmp_path, monkeypatch):
    monkeypatch.setitem(models.FAMILIES, TOY.name, TOY)  # the registry line, at test time
    return build_tiny_checkpoint(tmp_path / "toy", "toy", d_model=16, n_heads=2, logit_scale=3.0)


def test_a_fourth_family_in_its_own_module_loads_and_decodes(toy_ckpt):
    with safe_open(str(toy_ckpt / "model.safetensors"), "pt") as f:  # written under its own names
        assert {"tok_emb", "unembed", "h0.q", "h1.down"} <= set(f.keys())
    assert json.loads((toy_ckpt / "config.json").read_text())["model_type"] == "toy_dllm"
    model, tok, spec = load(str(toy_ckpt), dtype="float32", device="cpu")
    assert isinstance(model, NativeDLLM) and model.config.vocab_size == 400
    assert (spec.family, spec.mask_id, spec.shifted, spec.cache) == ("toy", 300, True, True)
    assert spec.stop_ids[0] == 301
    prompts = [tok(t)["input_ids"] for t in ["abc", "a longer prompt", "x"]]
    sampler = make_sampler("threshold", {"tau": 0.5})
    out = {c: diffuse(model_forward(model, spec, cache=c), prompts, spec, sampler, 16, 8,
                      seeds=[0, 1, 2], early_exit=False) for c in ("none", "prefix")}
    for c, res in out.items():
        assert not (res.tokens == spec.mask_id).any(), c  # every position filled
        assert bool((res.nfe >= 2).all()) and bool((res.nfe <= 16).all()), c
    assert out["none"].tokens.unique().numel() > 5  # not a degenerate decode
    alone = diffuse(model_forward(model, spec), prompts[1:2], spec, sampler, 16, 8, seeds=[1],
                    early_exit=False)
    assert torch.equal(alone.tokens[0], out["none"].tokens[1])  # batch = the row alone


def test_a_family_not_registered_is_refused_in_one_line(tmp_path):
    with pytest.raises(DLLMError, match="unknown family 'toy'; valid: tiny, llada, dream"):
        build_tiny_checkpoint(tmp_path / "toy", "toy")
