"""LLaDA2.0 (inclusionAI/LLaDA2.0-mini / -flash): block diffusion on a sparse MoE body.

    lm_eval --model dllm --model_args pretrained=inclusionAI/LLaDA2.0-mini,block=32,sampler=threshold,tau=0.95 ...

Read from the official remote code (`modeling_llada2_moe.py`, model_type `llada2_moe`): a fused
q/k/v projection (`query_key_value`), per-head RMSNorm of q and k, RoPE on
`partial_rotary_factor` (0.5) of each head, an output projection with bias (`use_bias`), and from
layer `first_k_dense_replace` on a sparse MLP routed by grouped sigmoid scores (`MoE` router
"sigmoid") plus shared experts. Attention is block-diagonal-causal: a position sees its own block
and the earlier ones, blocks of the decode's block length aligned to absolute positions (so the
prompt fills the first blocks and the first generated block may be partly prompt). A finished
block never changes, which the family's facts say (`block_causal`); the decode loop aligns its
blocks so. Logits are aligned with positions.
"""

from __future__ import annotations

from .family import Family, TinyFacts, refuse, require
from .llada_moe import expert_names
from .transformer import ArchConfig, MoE

MODEL_TYPE = "llada2_moe"


def arch_config(cfg: dict) -> ArchConfig:
    """ArchConfig from a LLaDA2 config.json (defaults: its LLaDA2MoeConfig's)."""
    require("LLaDA2", cfg, (("rope_scaling", None), ("norm_head", False), ("use_qk_norm", True)))
    d, n_heads = int(cfg.get("hidden_size", 1024)), int(cfg.get("num_attention_heads", 16))
    if cfg.get("head_dim") not in (None, d // n_heads):
        raise refuse("LLaDA2", "head_dim", cfg["head_dim"], f"hidden_size // num_attention_heads = {d // n_heads}")
    n_experts = cfg.get("num_experts", 16)
    moe_size = int(cfg.get("moe_intermediate_size") or 0)
    moe = None if n_experts is None else MoE(
        n_experts=int(n_experts), top_k=int(cfg.get("num_experts_per_tok", 2)), d_expert=moe_size,
        d_shared=moe_size * int(cfg.get("num_shared_experts") or 0), router="sigmoid",
        n_group=int(cfg.get("n_group", 8)), topk_group=int(cfg.get("topk_group", 4)),
        scale=float(cfg.get("routed_scaling_factor", 2.5)), expert_bias=True)
    n_layers = int(cfg.get("num_hidden_layers", 24))
    use_bias = bool(cfg.get("use_bias", True))
    return ArchConfig(
        vocab_size=int(cfg.get("vocab_size", 30592)), d_model=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        d_ff=int(cfg.get("intermediate_size") or 0), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), qkv_bias=bool(cfg.get("use_qkv_bias", False)),
        out_bias=use_bias, mlp_bias=False, norm_bias=False, act=cfg.get("hidden_act", "silu"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_fp32=False, qk_norm=True,
        rotary_dim=int(d // n_heads * float(cfg.get("partial_rotary_factor", 0.5))), fused_qkv=True,
        moe=moe, dense_layers=tuple(range(int(cfg.get("first_k_dense_replace", 0)))),
    )


def official_names(c: ArchConfig) -> dict[str, str]:
    """Our parameter name -> the name in LLaDA2's safetensors files."""
    names = {"embed.weight": "model.word_embeddings.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(c.n_layers):
        o, t = f"layers.{i}", f"model.layers.{i}"
        names |= {f"{o}.attn_norm.weight": f"{t}.input_layernorm.weight",
                  f"{o}.mlp_norm.weight": f"{t}.post_attention_layernorm.weight",
                  f"{o}.q_norm.weight": f"{t}.attention.query_layernorm.weight",
                  f"{o}.k_norm.weight": f"{t}.attention.key_layernorm.weight",
                  f"{o}.moe.router.weight": f"{t}.mlp.gate.weight",
                  f"{o}.moe.expert_bias": f"{t}.mlp.gate.expert_bias"}
        for p in ("weight", "bias"):
            names[f"{o}.qkv.{p}"] = f"{t}.attention.query_key_value.{p}"
            names[f"{o}.o.{p}"] = f"{t}.attention.dense.{p}"
        names |= expert_names(c, o, t, shared="mlp.shared_experts")
    return names


def tiny_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """A LLaDA2 config.json (LLaDA2MoeConfig's keys) at a tiny size: 8 experts in 4 groups, 2 per
    token from the best 2 groups, one shared expert, the first layer dense."""
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "vocab_size": 157184, "hidden_size": d_model, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "intermediate_size": 3 * d_model, "moe_intermediate_size": d_model, "num_experts": 8,
        "num_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "use_qkv_bias": False,
        "use_bias": True, "use_qk_norm": True, "norm_head": False, "partial_rotary_factor": 0.5,
        "rope_theta": 600000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "head_dim": d_model // n_heads,
        "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0,
        "mask_token_id": 156895, "eos_token_id": 156892, "pad_token_id": 156892,
    }


# tiny-test ids: the eos / mask ids its official generate() defaults to
TINY = TinyFacts(
    config=tiny_config, mask=("<|mask|>", 156895), eos=("<|endoftext|>", 156892),
    turn_end=("<|role_end|>", None),  # a stand-in: its id is not published here
    chat_template=("{% for m in messages %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}"
                   "<|role_end|>{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"),
    n_kv_heads=4,
)
FAMILY = Family(name="llada2", model_type=MODEL_TYPE, block_causal=True, arch_config=arch_config,
                official_names=official_names, tiny=TINY)
