"""Model families (one module each, registered below) and the native loader: LLaDA, Dream,
LLaDA-MoE and LLaDA2.x checkpoints loaded with no remote code.

    lm_eval --model dllm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct ...   # impl=auto: native

A checkpoint is its config.json plus safetensors weights (one file, or shards listed by
model.safetensors.index.json), read by the official parameter names. The model is built on the
meta device and the weights are assigned as they are read, cast tensor by tensor to the requested
dtype: a bf16 checkpoint loaded in bf16 never exists in float32, and nothing is initialised twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..utils import DLLMError
from . import bundled, dream, llada, llada2, llada21, llada_moe
from .family import Family, TinyFacts
from .transformer import ArchConfig, NativeDLLM

# the registry: one line per family module (name -> Family)
FAMILIES: dict[str, Family] = {}
INDEX = "model.safetensors.index.json"


def register_family(family: Family) -> Family:
    """Add a family (a plug-in, or a test's) to the registry; returns it."""
    FAMILIES[family.name] = family
    return family


register_family(bundled.FAMILY)
register_family(llada.FAMILY)
register_family(dream.FAMILY)
register_family(llada_moe.FAMILY)
register_family(llada2.FAMILY)
register_family(llada21.FAMILY)


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def family_of(config) -> Family | None:
    """The registered family of a config (config.json as a dict, or a config object), or None.
    A family published under another's model_type (LLaDA-MoE's config.json says "llada") is told
    apart by a config key it needs (`requires`)."""
    mt = str(_get(config, "model_type") or "").lower()
    found = [f for f in FAMILIES.values() if mt in (f.model_type, *f.also)]
    return next((f for f in found if f.requires and _get(config, f.requires) is not None),
                next((f for f in found if not f.requires), None))


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise DLLMError(f"unknown family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def native_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.native]


def native_family(config: dict) -> Family | None:
    """A checkpoint's family if there is a native implementation, else None."""
    fam = family_of(config)
    return fam if fam is not None and fam.native else None


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise DLLMError(f"pretrained {str(path)!r} has no model.safetensors or {INDEX}; valid: a "
                    f"safetensors checkpoint for impl=native, or impl=remote for other formats")


def checkpoint_dtype(files: list[Path], config: dict) -> torch.dtype:
    """load_native's dtype="auto": the config's torch_dtype, else that of the stored weights
    (`loading.load` resolves auto by hardware first: `loading.auto_dtype`)."""
    name = config.get("torch_dtype") or config.get("dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    with safe_open(str(files[0]), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k).get_dtype()
            return {"BF16": torch.bfloat16, "F16": torch.float16}.get(t, torch.float32)
    return torch.float32


def load_native(path: str | Path, config: dict, dtype: torch.dtype | str = "auto",
                device: torch.device | str = "cpu") -> NativeDLLM:
    """The checkpoint at `path` (config.json already read into `config`) as a NativeDLLM."""
    path = Path(path)
    fam = native_family(config)
    if fam is None:
        raise DLLMError(f"no native implementation for model_type {config.get('model_type')!r}; "
                        f"valid: {', '.join(f.model_type for f in native_families())} (or impl=remote)")
    arch: ArchConfig = fam.arch_config(config)
    files = weight_files(path)
    if dtype == "auto":
        dtype = checkpoint_dtype(files, config)
    with torch.device("meta"):
        model = NativeDLLM(arch)
    names = fam.official_names(arch)
    want = {names[k]: k for k in model.state_dict()}  # official name -> ours
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt", device=str(torch.device(device))) as f:
            for key in f.keys():
                if key in want:
                    state[want.pop(key)] = f.get_tensor(key).to(dtype)
    if want:
        missing = sorted(want)
        raise DLLMError(f"pretrained {str(path)!r} lacks {len(missing)} weights of its "
                        f"{fam.model_type} config, e.g. {missing[0]!r}; valid: a complete checkpoint")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def official_state_dict(model: NativeDLLM, family: Family) -> dict[str, torch.Tensor]:
    """The model's weights under the family's official names (to write test checkpoints)."""
    names = family.official_names(model.config)
    return {names[k]: v for k, v in model.state_dict().items()}


__all__ = ["ArchConfig", "FAMILIES", "Family", "NativeDLLM", "TinyFacts", "family_named",
           "family_of", "load_native", "native_families", "native_family", "official_state_dict",
           "register_family"]
