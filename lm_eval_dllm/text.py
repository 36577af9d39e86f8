"""Generated tokens -> the text a task scores, shared by evaluation and RL rewards (so they agree)."""

from __future__ import annotations

import logging

from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

from .spec import FamilySpec
from .utils import DLLMError

log = logging.getLogger(__name__)


def fit_prompt(ids: list[int], reserve: int, limit: int | None, truncation: str = "left",
               what: str = "gen_length") -> tuple[list[int], bool]:
    """The prompt ids that fit `limit` with `reserve` positions after them; (ids, truncated).

    The reserved positions are the generated ones (`what`="gen_length") or a scored continuation's
    tokens ("continuation"). truncation="left" keeps the prompt's last tokens (the question, after
    any few-shot examples); "error", or a reserve that leaves no room at all, is a one-line error.
    """
    if limit is None or len(ids) + reserve <= limit:
        return ids, False
    keep = limit - reserve
    if truncation == "error" or keep <= 0:
        raise DLLMError(f"prompt of {len(ids)} tokens + {what} {reserve} exceeds the context limit of "
                        f"{limit} tokens; valid: a shorter prompt (fewer few-shot examples), a smaller "
                        f"{what}, or truncation=left")
    return ids[-keep:], True


class PromptFitter:
    """`fit_prompt` for one run (an evaluation, a training run): truncation is logged once, not per prompt."""

    def __init__(self, limit: int | None, truncation: str = "left", what: str = "gen_length"):
        self.limit, self.truncation, self.what, self._warned = limit, truncation, what, False

    def __call__(self, ids: list[int], reserve: int) -> list[int]:
        fitted, cut = fit_prompt(ids, reserve, self.limit, self.truncation, self.what)
        if cut and not self._warned:
            self._warned = True
            log.warning("prompt of %d tokens + %s %d exceeds the context of %d: keeping the last "
                        "%d prompt tokens (truncation=left; this warning is shown once)",
                        len(ids), self.what, reserve, self.limit, len(fitted))
        return fitted


def stop_strings(gen_kwargs: dict, tokenizer, spec: FamilySpec) -> list[str]:
    """The task's `until` plus the model's EOS string, as lm-eval's own models use them."""
    eos = tokenizer.decode(list(spec.stop_ids[:1])) if spec.stop_ids else None
    return handle_stop_sequences(gen_kwargs.get("until"), eos)


def completion_text(tokens: list[int], tokenizer, spec: FamilySpec, until: list[str] | None = None) -> str:
    """Cut at the first stop token, decode, then cut at the first stop string."""
    cut = next((j for j, t in enumerate(tokens) if t in spec.stop_ids), len(tokens))
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    return postprocess_generated_text(text, until, None) if until else text
