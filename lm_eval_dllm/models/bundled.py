"""The bundled tiny dLLM (lm_eval_dllm.tiny) as a family: its facts and its tiny test checkpoint.

    python -m lm_eval_dllm.testing /tmp/tiny --family tiny

It is a transformers class of its own (registered with AutoModel in-process), not the shared
native transformer, so it has no weight mapping; its forward runs a span with reused keys/values,
so it supports the caches. Logits are aligned with positions, as LLaDA's.
"""

from __future__ import annotations

from pathlib import Path

from ..tiny import TinyDLLMConfig, TinyDLLMModel, build_char_tokenizer
from .family import Family


def write_tiny(out: Path, d_model: int = 32, n_layers: int = 2, n_heads: int = 2,
               init_std: float = 0.5, mask: bool = True, **config_kwargs) -> Path:
    """A random bundled-architecture checkpoint with a character tokenizer, written to `out`."""
    specials = {"eos_token": ("<|eos|>", None), "pad_token": ("<|eos|>", None),
                "unk_token": ("<|unk|>", None)}
    if mask:
        specials["mask_token"] = ("<|mask|>", None)
    tok = build_char_tokenizer(specials)
    vocab = max(tok.get_vocab().values()) + 1
    cfg = TinyDLLMConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads, d_ff=4 * d_model, max_position=256,
                         mask_token_id=tok.mask_token_id if mask else None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         init_std=init_std, **config_kwargs)
    TinyDLLMModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


FAMILY = Family(name="tiny", model_type=TinyDLLMConfig.model_type, cache=True, write_tiny=write_tiny)
