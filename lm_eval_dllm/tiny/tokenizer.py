"""A character-level tokenizer saved as a standard `tokenizer.json` (loads with AutoTokenizer)."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEFAULT_CHARS = string.printable[:95] + "\n"  # printable ASCII (space included) and newline


def build_char_tokenizer(
    specials: dict[str, tuple[str, int | None]],
    chars: str = DEFAULT_CHARS,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """One token per character, plus special tokens.

    `specials` maps a transformers role ("eos_token", "mask_token", "pad_token", "unk_token",
    "bos_token", or any other name for an extra special token) to (token string, id); id None
    means "next free id". Ids may be sparse, which lets tests mimic LLaDA's and Dream's real ids.
    """
    vocab: dict[str, int] = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    for tok, idx in specials.values():
        if tok not in vocab:
            vocab[tok] = idx if idx is not None else max(vocab.values()) + 1
    unk = specials.get("unk_token", ("<unk>", None))[0]
    if unk not in vocab:
        vocab[unk] = max(vocab.values()) + 1
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every char
    core.decoder = decoders.Fuse()  # join characters back with no separator
    roles = {k: v[0] for k, v in specials.items() if k.endswith("_token")}
    roles["unk_token"] = unk
    extra = [v[0] for k, v in specials.items() if not k.endswith("_token")]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        additional_special_tokens=extra or None,
        clean_up_tokenization_spaces=False,
        **roles,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
