"""LLaDA (GSAI-ML/LLaDA-8B-Instruct, LLaDA-1.5): its config.json and weight names.

    lm_eval --model dllm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,impl=native ...

Architecture facts read from the official remote code (OLMo-derived "llama" blocks): RMSNorm,
RoPE applied in float32 (`rope_full_precision`), SwiGLU feed-forward (ff_proj is the gate,
up_proj the up projection, ff_out the down projection), no causal mask. The original release
ignores `attention_mask`; here padded keys are always masked, as its later revision does.
"""

from __future__ import annotations

import math

from .family import Family, TinyFacts, refuse, require
from .transformer import ArchConfig

MODEL_TYPE = "llada"


def arch_config(cfg: dict) -> ArchConfig:
    """ArchConfig from a LLaDA config.json (its defaults are OLMo's ModelConfig's)."""
    require("LLaDA", cfg, (("block_type", "llama"), ("layer_norm_type", "rms"), ("rope", True),
                           ("alibi", False), ("attention_layer_norm", False), ("block_group_size", 1)))
    act = cfg.get("activation_type", "silu")
    if act not in ("silu", "gelu", "relu"):
        raise refuse("LLaDA", "activation_type", act, "silu, gelu, relu")
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


def tiny_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """LLaDA-8B-Instruct's config.json with the sizes replaced."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": 126464,
        "eos_token_id": 126081, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": 3 * d_model, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "n_layers": n_layers, "pad_token_id": 126081, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
        "weight_tying": False,
    }


# facts from the published config.json and tokenizer files (see the project's DESIGN notes)
FAMILY = Family(
    name="llada", model_type=MODEL_TYPE, cache=True, arch_config=arch_config,
    official_names=official_names,
    tiny=TinyFacts(
        config=tiny_config, mask=("<|mdm_mask|>", 126336), eos=("<|endoftext|>", 126081),
        bos=("<|startoftext|>", 126080), turn_end=("<|eot_id|>", 126348),
        chat_template=(
            "<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
        n_kv_heads=4,  # LLaDA-8B has no grouped-query attention
    ),
)
