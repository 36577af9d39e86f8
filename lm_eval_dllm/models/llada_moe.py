"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct): config.json and weight names.

    lm_eval --model dllm --model_args pretrained=inclusionAI/LLaDA-MoE-7B-A1B-Instruct ...

LLaDA's masked diffusion on an OLMoE body, read from the official remote code
(`modeling_lladamoe.py`): RMSNorm, per-head RMSNorm of q and k (`qk_layernorm`), RoPE on
`partial_rotary_factor` of each head with tables cast to the model dtype, bidirectional SDPA with
padded keys masked, and in each layer whose `moe_layer_freq` entry is not 0 a sparse MLP: the
top-`num_experts_per_tok` of softmax(router logits), not renormalised (its `norm_topk_prob` is
hard-wired off), plus a shared expert when `shared_expert_intermediate_size` is set. Logits are
aligned with positions, as LLaDA's.
"""

from __future__ import annotations

from .family import Family, TinyFacts, refuse, require
from .transformer import ArchConfig, MoE

MODEL_TYPE = "lladamoe"


def arch_config(cfg: dict) -> ArchConfig:
    """ArchConfig from a LLaDA-MoE config.json."""
    require("LLaDA-MoE", cfg, (("rope_scaling", None), ("clip_qkv", None), ("attention_bias", False)))
    if cfg.get("moe_router_score_function") not in (None, "softmax"):
        raise refuse("LLaDA-MoE", "moe_router_score_function", cfg["moe_router_score_function"], "softmax")
    d, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_layers = int(cfg["num_hidden_layers"])
    freq = list(cfg.get("moe_layer_freq") or [1] * n_layers)
    factor = float(cfg.get("partial_rotary_factor", 1.0))
    factor = 1.0 if factor <= 0 else factor  # the config class's -1 means unset
    moe = MoE(n_experts=int(cfg["num_experts"]), top_k=int(cfg["num_experts_per_tok"]),
              d_expert=int(cfg["expert_intermediate_size"]),
              d_shared=int(cfg.get("shared_expert_intermediate_size") or 0),
              expert_bias=bool(cfg.get("moe_router_enable_expert_bias")))
    return ArchConfig(
        vocab_size=int(cfg["vocab_size"]), d_model=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        d_ff=int(cfg.get("dense_intermediate_size") or 0),
        rope_theta=float(cfg["rope_theta"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False,
        act=cfg.get("hidden_act", "silu"), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_fp32=False, qk_norm=bool(cfg.get("qk_layernorm")),
        rotary_dim=int(d // n_heads * factor), moe=moe,
        dense_layers=tuple(i for i, f in enumerate(freq) if f == 0),
    )


def _mlp_names(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{a}.weight": f"{theirs}.{a}_proj.weight" for a in ("gate", "up", "down")}


def expert_names(c: ArchConfig, o: str, t: str, shared: str) -> dict[str, str]:
    """Layer o's (ours) / t's (theirs) dense MLP, experts and shared expert (at t.`shared`), named
    as the OLMoE-style files of LLaDA-MoE and LLaDA2 name them."""
    names = _mlp_names(o, f"{t}.mlp") | _mlp_names(f"{o}.moe.shared", f"{t}.{shared}")
    for e in range(c.moe.n_experts if c.moe else 0):
        names |= _mlp_names(f"{o}.moe.experts.{e}", f"{t}.mlp.experts.{e}")
    return names


def official_names(c: ArchConfig) -> dict[str, str]:
    """Our parameter name -> the name in LLaDA-MoE's safetensors files."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(c.n_layers):
        o, t = f"layers.{i}", f"model.layers.{i}"
        names |= {f"{o}.attn_norm.weight": f"{t}.input_layernorm.weight",
                  f"{o}.mlp_norm.weight": f"{t}.post_attention_layernorm.weight",
                  f"{o}.q_norm.weight": f"{t}.self_attn.q_norm.weight",
                  f"{o}.k_norm.weight": f"{t}.self_attn.k_norm.weight"}
        names |= {f"{o}.{a}.weight": f"{t}.self_attn.{a}_proj.weight" for a in "qkv"}
        names[f"{o}.o.weight"] = f"{t}.self_attn.o_proj.weight"
        names |= {f"{o}.moe.router.weight": f"{t}.mlp.gate.weight",
                  f"{o}.moe.expert_bias": f"{t}.mlp.expert_bias"}
        names |= expert_names(c, o, t, shared="shared_expert")
    return names


def tiny_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """A LLaDA-MoE config.json (the official config class's keys) at a tiny size: 4 experts, 2 per
    token, a shared expert, the first layer dense."""
    return {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada",  # as published (see FAMILY)
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "vocab_size": 157184, "hidden_size": d_model, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "dense_intermediate_size": 3 * d_model, "expert_intermediate_size": d_model,
        "shared_expert_intermediate_size": d_model, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_layer_freq": [0] + [1] * (n_layers - 1), "qk_layernorm": True,
        "partial_rotary_factor": 1.0, "rope_theta": 50000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "clip_qkv": None,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "use_cache": False,
        "moe_router_enable_expert_bias": None, "moe_router_score_function": None,
        "norm_topk_prob": None, "routed_scaling_factor": 1, "router_num_group": None,
        "router_topk_group": None, "mask_token_id": 156895, "eos_token_id": 156892,
        "pad_token_id": 156892, "output_router_logits": False,
    }


# The published config.json says model_type "llada" (the dllm library tells its users to change it
# to "lladamoe"): both are this family when the config has num_experts, which LLaDA's never has.
# Tiny-test ids: those LLaDA2's official generate() defaults to (eos 156892, mask 156895), the same
# inclusionAI tokenizer; a real checkpoint's ids come from its own config and tokenizer.
FAMILY = Family(
    name="llada_moe", model_type=MODEL_TYPE, also=("llada",), requires="num_experts", cache=True,
    arch_config=arch_config,
    official_names=official_names,
    tiny=TinyFacts(
        config=tiny_config, mask=("<|mask|>", 156895), eos=("<|endoftext|>", 156892),
        turn_end=("<|role_end|>", None),  # a stand-in: its id is not published here
        chat_template=("<role>SYSTEM</role>{% for m in messages %}<role>{{ m['role'] | upper }}</role>"
                       "{{ m['content'] }}<|role_end|>{% endfor %}"
                       "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"),
        n_kv_heads=4,
    ),
)
