"""Dream (Dream-org/Dream-v0-Instruct-7B, Dream-v0-Base-7B): its config.json and weight names.

    lm_eval --model dllm --model_args pretrained=Dream-org/Dream-v0-Instruct-7B,impl=native ...

Architecture facts read from the official remote code (a Qwen2 body made bidirectional): RMSNorm,
biases on q/k/v only, grouped-query attention, RoPE tables computed in float32 and applied in the
model dtype, SwiGLU MLP. Its logits are shifted one position (the logit at i predicts token i+1);
the FamilySpec says so and the decode loop reads them accordingly.
"""

from __future__ import annotations

from .family import Family, TinyFacts, refuse
from .transformer import ArchConfig

MODEL_TYPE = "dream"


def arch_config(cfg: dict) -> ArchConfig:
    """ArchConfig from a Dream config.json (defaults: its DreamConfig's)."""
    if cfg.get("rope_scaling"):
        raise refuse("Dream", "rope_scaling", cfg["rope_scaling"], "null")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "relu"):
        raise refuse("Dream", "hidden_act", act, "silu, gelu, relu")
    n_heads = int(cfg.get("num_attention_heads", 32))
    return ArchConfig(
        vocab_size=int(cfg.get("vocab_size", 151936)), d_model=int(cfg.get("hidden_size", 4096)),
        n_layers=int(cfg.get("num_hidden_layers", 32)), n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        d_ff=int(cfg.get("intermediate_size", 22016)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=True, out_bias=False, mlp_bias=False, norm_bias=False, act=act,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_fp32=False,
    )


def official_names(c: ArchConfig) -> dict[str, str]:
    """Our parameter name -> the name in Dream's safetensors files."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    ours = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
    for i in range(c.n_layers):
        for a, b in ours.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{a}.{p}"] = f"model.layers.{i}.{b}.{p}"
    return names


def tiny_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """Dream-v0-Instruct-7B's config.json with the sizes replaced."""
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": d_model, "initializer_range": 0.02, "intermediate_size": 3 * d_model,
        "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": n_layers,
        "model_type": "Dream", "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 152064,
    }


# logits at i predict token i + 1; its own code takes a 4-D mask plus position ids
FAMILY = Family(
    name="dream", model_type=MODEL_TYPE, shifted=True, mask_4d=True, cache=True,
    arch_config=arch_config, official_names=official_names,
    tiny=TinyFacts(
        config=tiny_config, mask=("<|mask|>", 151666), eos=("<|endoftext|>", 151643),
        turn_end=("<|im_end|>", 151645),
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        n_kv_heads=2,  # Dream-7B uses grouped-query attention
    ),
)
