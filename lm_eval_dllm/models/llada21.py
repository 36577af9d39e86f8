"""LLaDA2.1 (inclusionAI/LLaDA2.1-mini / -flash): LLaDA2.0's architecture under model_type
`llada21_moe` (its config class also reads num_key_value_heads=0 as "as many as the query heads").

    lm_eval --model dllm --model_args pretrained=inclusionAI/LLaDA2.1-mini,block=32,sampler=threshold,tau=0.95 ...

Its official generate() adds token editing on top of LLaDA2.0's: after a step's threshold commits,
already decoded (non-prompt) positions of the block whose new proposal differs and has confidence
above `editing_threshold` are overwritten, and up to `max_post_steps` extra forwards per block do
only that. The decode loop here never changes a committed token, so editing is not supported: this
family decodes as the official generate() with editing_threshold=1.0 (no position can exceed it),
and the model_args editing_threshold / max_post_steps are refused in one line (docs/models.md).
"""

from __future__ import annotations

from . import llada2
from .family import Family, TinyFacts

MODEL_TYPE = "llada21_moe"
EDITING = ("LLaDA2.1's token editing is not supported (the decode loop never changes a committed "
           "token; it decodes as the official generate with editing_threshold=1.0)")


def tiny_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """LLaDA2.0's tiny config.json under LLaDA2.1's model_type and class names."""
    return llada2.tiny_config(d_model, n_layers, n_heads, n_kv_heads) | {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_llada21_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada21_moe.LLaDA2MoeModelLM",
                     "AutoModelForCausalLM": "modeling_llada21_moe.LLaDA2MoeModelLM"}}


FAMILY = Family(name="llada21", model_type=MODEL_TYPE, block_causal=True,
                arch_config=llada2.arch_config, official_names=llada2.official_names,
                tiny=TinyFacts(**{**llada2.TINY.__dict__, "config": tiny_config}),
                refused_args={"editing_threshold": EDITING, "max_post_steps": EDITING})
