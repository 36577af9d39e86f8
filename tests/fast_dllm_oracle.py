"""Fast-dLLM's LLaDA decode functions, loaded from ../shared/reference/fast-dllm (test oracle only).

    from tests.fast_dllm_oracle import load_fast_dllm
    fd = load_fast_dllm(tmp_dir)          # None when ../shared is absent
    model = fd.LLaDAModelLM.from_pretrained(checkpoint).eval()
    x, nfe = fd.generate_with_dual_cache(model, prompt, steps=L, gen_length=L, block_length=B,
                                         threshold=0.9, mask_id=spec.mask_id)

Their `llada/` folder (generate.py and model/) is copied to a temporary folder, the
transformers-5 edits of ../shared/reference/patches-transformers5 are applied there (the same
hunks as for the official LLaDA: post_init, tie_weights' keywords, use_cache), and generate.py
is imported from it under a private name. Nothing of it is copied into the repository.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

from transformers import AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .native_oracle import PATCHES, REFERENCE, hunks

FAST_DLLM = REFERENCE / "fast-dllm" / "llada"


# einops (not a dependency of ours) serves only a block type LLaDA does not use (cross_attn_flex)
EXTRA_EDITS = {"modeling_llada": [("from einops import rearrange",
                                   "rearrange = None  # PATCH(test): einops only in cross_attn_flex, unused")]}


def _patch(model_dir: Path) -> None:
    for name in ("modeling_llada", "configuration_llada"):
        path = model_dir / f"{name}.py"
        text = path.read_text()
        edits = [(old, new) for _, old, new in hunks((PATCHES / f"{name}.patch").read_text())]
        for old, new in edits + EXTRA_EDITS.get(name, []):
            assert text.count(old) == 1, f"an edit for transformers 5 does not apply to Fast-dLLM's {name}.py"
            text = text.replace(old, new)
        path.write_text(text)


def load_fast_dllm(tmp: Path) -> ModuleType | None:
    """Fast-dLLM's generate.py as a module (generate, generate_with_prefix_cache,
    generate_with_dual_cache, LLaDAModelLM), or None without ../shared/reference/fast-dllm."""
    if not (FAST_DLLM / "generate.py").exists():
        return None
    root = Path(tmp) / "fast_dllm_llada"
    shutil.copytree(FAST_DLLM, root, dirs_exist_ok=True)
    _patch(root / "model")
    # generate.py imports `model.modeling_llada` as a top-level package: visible only while loading
    saved = {k: v for k, v in sys.modules.items() if k == "model" or k.startswith("model.")}
    # its configuration registers "llada" with AutoConfig/AutoModel for the whole process: undone
    # below, or every later LLaDA checkpoint in the test session would load as Fast-dLLM's config
    registries = [CONFIG_MAPPING._extra_content, AutoModel._model_mapping._extra_content]
    before = [dict(r) for r in registries]
    sys.path.insert(0, str(root))
    try:
        for k in saved:
            del sys.modules[k]
        spec = importlib.util.spec_from_file_location("fast_dllm_generate", root / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "model" or k.startswith("model.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        for reg, was in zip(registries, before):
            reg.clear()
            reg.update(was)
    return mod
