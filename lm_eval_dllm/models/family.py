"""What a model family is: the facts the decode loop needs and how its checkpoints map onto us.

    python -m lm_eval_dllm.testing /tmp/tiny-llada --family llada   # a family's tiny test checkpoint

One module per masked family (`bundled.py`, `llada.py`, `dream.py`, `llada_moe.py`, `llada2.py`,
`llada21.py`) defines a `FAMILY`; the registry in `lm_eval_dllm.models` lists them, one line each.
Nothing else in the package branches on a masked family: the loader, the decode loop, the caches
and the test-checkpoint writer read these fields. See docs/models.md ("Adding a family").
DiffusionGemma (uniform noise, transformers' own class and generate(): `diffusion_gemma.py`) is not
a masked family and has its own, marked dispatch in the loader, the lm-eval adapter and train.grpo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..utils import DLLMError
from .transformer import ArchConfig

Token = tuple[str, int | None]  # (string, id); id None: the next free id of the tiny tokenizer


@dataclass(frozen=True)
class TinyFacts:
    """A native family's published config.json and tokenizer facts, for tiny test checkpoints of
    the real architecture (real vocabulary size and special-token ids, tiny widths)."""
    config: Callable[[int, int, int, int], dict]  # (d_model, n_layers, n_heads, n_kv_heads) -> config.json
    mask: Token
    eos: Token
    turn_end: Token
    chat_template: str
    bos: Token | None = None
    n_kv_heads: int = 0  # heads of keys/values the oracle tests use (0: as many as query heads)


@dataclass(frozen=True)
class Family:
    name: str  # what users and `testing --family` call it
    model_type: str  # config.json's model_type, lower case
    also: tuple[str, ...] = ()  # other model_types its checkpoints are published under
    requires: str = ""  # a config key only this family has (tells it apart from another `also`)
    shifted: bool = False  # logits at i predict token i + 1 (Dream)
    # its own (remote) code takes a 4-D bool mask (B, 1, T, T) and position ids, as its generation
    # code builds them, instead of a 2-D attention mask (Dream)
    mask_4d: bool = False
    cache: bool = False  # its implementation here runs a span with reused keys/values (prefix, dual)
    # block diffusion (LLaDA2): attention is block-diagonal-causal over blocks of the decode's block
    # size aligned to absolute positions; the decode loop aligns its blocks the same way
    block_causal: bool = False
    # model_args of its official generation that the decode loop does not do: key -> why (refused)
    refused_args: dict[str, str] = field(default_factory=dict)
    # native families: config.json -> ArchConfig, and our parameter name -> the official one
    arch_config: Callable[[dict], ArchConfig] | None = None
    official_names: Callable[[ArchConfig], dict[str, str]] | None = None
    tiny: TinyFacts | None = None  # native families: facts for tiny test checkpoints
    # families with a class of their own (bundled): writes a tiny random checkpoint to `out`
    write_tiny: Callable[..., Path] | None = None

    @property
    def native(self) -> bool:
        """Loaded by lm_eval_dllm.models (no remote code) rather than through AutoModel."""
        return self.arch_config is not None


def refuse(family: str, key: str, value, valid: str) -> DLLMError:
    """The one-line error for a config.json value a native implementation does not run."""
    return DLLMError(f"{family} config {key}={value!r} is not supported by the native implementation; "
                     f"valid: {valid} (or impl=remote to run the checkpoint's own code)")


def require(family: str, cfg: dict, wanted: tuple[tuple[str, object], ...]) -> None:
    """Refuse a config whose value of a key in `wanted` differs from the one given (absent: as wanted)."""
    for key, want in wanted:
        if cfg.get(key, want) != want:
            raise refuse(family, key, cfg[key], repr(want))
