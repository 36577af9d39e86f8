"""LLaDA (GSAI-ML/LLaDA-8B-Instruct, LLaDA-1.5): its config.json and weight names.

    lm_eval --model dllm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,impl=native ...

Architecture facts read from the official remote code (OLMo-derived "llama" blocks): RMSNorm,
RoPE applied in float32 (`rope_full_precision`), SwiGLU feed-forward (ff_proj is the gate,
up_proj the up projection, ff_out the down projection), no causal mask. The original release
ignores `attention_mask`; here padded keys are always masked, as its later revision does.
"""

from __future__ import annotations

import math

from ..utils import DLLMError
from .transformer import ArchConfig

MODEL_TYPE = "llada"


def _refuse(key: str, value, valid: str) -> DLLMError:
    return DLLMError(f"LLaDA config {key}={value!r} is not supported by the native implementation; "
                     f"valid: {valid} (or impl=remote to run the checkpoint's own code)")


def arch_config(cfg: dict) -> ArchConfig:
    """ArchConfig from a LLaDA config.json (its defaults are OLMo's ModelConfig's)."""
    for key, want in (("block_type", "llama"), ("layer_norm_type", "rms"), ("rope", True),
                      ("alibi", False), ("attention_layer_norm", False), ("block_group_size", 1)):
        if cfg.get(key, want) != want:
            raise _refuse(key, cfg[key], repr(want))
    act = cfg.get("activation_type", "silu")
    if act not in ("silu", "gelu", "relu"):
        raise _refuse("activation_type", act, "silu, gelu, relu")
    d, n_heads = int(cfg["d_model"]), int(cfg["n_heads"])
    n_kv = cfg.get("n_kv_heads")
    if cfg.get("multi_query_attention"):
        n_kv = 1
    include_bias = bool(cfg.get("include_bias", False))
    norm_bias = cfg.get("bias_for_layer_norm")
    return ArchConfig(
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        d_model=d, n_layers=int(cfg["n_layers"]), n_heads=n_heads,
        n_kv_heads=int(n_kv or n_heads),
        d_ff=int(cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=include_bias or bool(cfg.get("include_qkv_bias", False)),
        out_bias=include_bias, mlp_bias=include_bias,
        norm_bias=include_bias if norm_bias is None else bool(norm_bias),
        act=act, tie_embeddings=bool(cfg.get("weight_tying", False)),
        rope_fp32=bool(cfg.get("rope_full_precision", True)),
        emb_scale=math.sqrt(d) if cfg.get("input_emb_norm") else 1.0,
        logit_scale=1 / math.sqrt(d) if cfg.get("scale_logits") else 1.0,
    )


def official_names(c: ArchConfig) -> dict[str, str]:
    """Our parameter name -> the name in LLaDA's safetensors files."""
    t = "model.transformer"
    names = {"embed.weight": f"{t}.wte.weight", "norm.weight": f"{t}.ln_f.weight",
             "norm.bias": f"{t}.ln_f.bias", "head.weight": f"{t}.ff_out.weight"}
    ours = {"attn_norm": "attn_norm", "mlp_norm": "ff_norm", "q": "q_proj", "k": "k_proj",
            "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
    for i in range(c.n_layers):
        for a, b in ours.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{a}.{p}"] = f"{t}.blocks.{i}.{b}.{p}"
    return names
