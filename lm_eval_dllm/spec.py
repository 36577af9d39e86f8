"""Per-family facts the decode loop needs, read from a checkpoint's config and tokenizer.

No literal token ids and no guessing from path names: the family comes from `model_type` (its
module in lm_eval_dllm.models holds its facts), the ids from the config (falling back to the
tokenizer). A checkpoint with no mask token is not a
masked diffusion LM and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import Family, family_of
from .utils import DLLMError

# turn-end tokens, looked up by string in the tokenizer (LLaDA's <|eot_id|>, Dream's <|im_end|>)
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class FamilySpec:
    family: str
    mask_id: int
    stop_ids: tuple[int, ...]  # EOS / end-of-turn: generation ends at the first one
    pad_id: int
    shifted: bool
    suppress_ids: tuple[int, ...]  # never proposed as a token (the mask itself)
    max_length: int | None  # the model's context, if it declares one
    default_gen_length: int  # completion length when neither model_args nor the task sets one
    default_block: int  # block size when model_args set none (LLaDA's usual semi-AR block: 32)
    # the family's own (remote) code takes a 4-D bool mask (B, 1, T, T) and position ids, as its
    # generation code builds them, instead of a 2-D attention mask (Dream)
    mask_4d: bool = False
    cache: bool = False  # the loaded implementation supports cache=prefix / dual
    # block diffusion (LLaDA2): block-diagonal-causal attention, blocks aligned to absolute positions
    block_causal: bool = False


def _ids(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def spec_from(config, tokenizer, name: str = "", remote: bool = False) -> FamilySpec:
    """remote: the checkpoint runs its own code (a native family's cache support is ours)."""
    model_type = str(getattr(config, "model_type", "") or "").lower()
    fam = family_of(config) or Family(name=model_type or "generic", model_type=model_type,
                                          shifted=bool(getattr(config, "logits_shifted", False)))
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise DLLMError(
            f"pretrained {name!r} has no mask token (config.mask_token_id and the tokenizer's "
            f"mask_token are both unset): not a masked diffusion LM; valid: a dLLM checkpoint "
            f"such as GSAI-ML/LLaDA-8B-Instruct or Dream-org/Dream-v0-Instruct-7B"
        )
    stops = _ids(getattr(config, "eos_token_id", None))
    if tokenizer is not None:
        stops += _ids(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        stops += [vocab[t] for t in TURN_END_TOKENS if t in vocab]
    stops = tuple(dict.fromkeys(s for s in stops if s != mask_id))
    pad = getattr(config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = stops[0] if stops else 0
    max_len = None
    for attr in ("max_sequence_length", "max_position_embeddings", "max_position", "n_positions"):
        if getattr(config, attr, None):
            max_len = int(getattr(config, attr))
            break
    return FamilySpec(
        family=fam.name,
        mask_id=int(mask_id),
        stop_ids=stops,
        pad_id=int(pad),
        shifted=fam.shifted,
        mask_4d=fam.mask_4d,
        block_causal=fam.block_causal,
        cache=fam.cache and not (remote and fam.native),
        suppress_ids=(int(mask_id),),
        max_length=max_len,
        default_gen_length=int(getattr(config, "dllm_gen_length", None) or 256),
        default_block=int(getattr(config, "dllm_block", None) or 32),
    )
