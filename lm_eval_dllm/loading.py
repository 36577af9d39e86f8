"""Load a dLLM (bundled tiny, LLaDA, Dream, generic) through transformers, with clear errors."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .spec import FamilySpec, spec_from
from .utils import DLLMError, check_safetensors

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise DLLMError(f"unsupported dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DLLMError(f"unsupported device {device!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DLLMError(f"device {device!r} requested but CUDA is not available here; valid: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DLLMError(f"device {device!r} does not exist; valid: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DLLMError(f"device {device!r} requested but MPS is not available here; valid: cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DLLMError(f"unsupported device {device!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return dev


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or os.sep in s and s.count("/") != 1


def resolve_pretrained(pretrained: str | os.PathLike) -> str:
    p = Path(os.path.expanduser(str(pretrained)))
    if p.exists():
        if not (p / "config.json").exists():
            raise DLLMError(f"pretrained {str(pretrained)!r} has no config.json; valid: a checkpoint "
                            f"directory (config.json, weights, tokenizer) or a hub id")
        return str(p)
    if _looks_like_path(str(pretrained)):
        raise DLLMError(f"pretrained path {str(pretrained)!r} does not exist; valid: an existing "
                        f"checkpoint directory or a hub id such as GSAI-ML/LLaDA-8B-Instruct")
    return str(pretrained)  # a hub id: transformers resolves it (or fails offline)


def load_tokenizer(pretrained: str, trust_remote_code: bool = True, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code, revision=revision)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint says about itself before any weights load (config, tokenizer, spec)."""
    path: str
    config: Any
    tokenizer: Any
    spec: FamilySpec


def read_checkpoint(pretrained: str, trust_remote_code: bool = True,
                    revision: str | None = None) -> Checkpoint:
    """Config, tokenizer and FamilySpec: seconds, no weights (so settings can be checked first)."""
    from transformers import AutoConfig

    from . import tiny  # noqa: F401  (registers the bundled model class with AutoModel)

    path = resolve_pretrained(pretrained)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        tokenizer = load_tokenizer(path, trust_remote_code, revision)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DLLMError(f"cannot load pretrained {path!r}: {first}") from None
    return Checkpoint(path, config, tokenizer, spec_from(config, tokenizer, name=path))


def load(pretrained: str, dtype: str = "auto", device: str | None = None,
         trust_remote_code: bool = True, revision: str | None = None,
         checkpoint: Checkpoint | None = None):
    """Returns (model in eval mode on device, tokenizer, FamilySpec); `checkpoint` if already read."""
    from transformers import AutoModel

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    ck = checkpoint or read_checkpoint(pretrained, trust_remote_code, revision)
    path, spec = ck.path, ck.spec
    if torch_dtype == "auto" and dev.type == "cpu":
        torch_dtype = torch.float32  # bf16 weights run slowly and inexactly on CPUs
    for f in sorted(Path(path).glob("*.safetensors")):  # a local checkpoint: whole files only
        check_safetensors(f)
    model = AutoModel.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                      revision=revision)
    model.to(dev).eval()
    log.info("loaded %s (%s family, mask id %d, %s) on %s", path, spec.family, spec.mask_id,
             next(model.parameters()).dtype, dev)
    return model, ck.tokenizer, spec
