"""The bundled tiny dLLM: model class, tokenizer builder and the path of the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel

from .modeling import TinyDLLMConfig, TinyDLLMModel
from .tokenizer import build_char_tokenizer

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-modchain"
BUNDLED_ID = "bundled:tiny-modchain"  # how policy cards and the results grid name the bundled model

# Registering the class in-process lets AutoModel load the bundled checkpoint with no remote
# code; other dLLMs take the same AutoModel call with their own remote code (LLaDA and Dream
# load natively, lm_eval_dllm.models).
AutoConfig.register(TinyDLLMConfig.model_type, TinyDLLMConfig, exist_ok=True)
AutoModel.register(TinyDLLMConfig, TinyDLLMModel, exist_ok=True)

__all__ = ["BUNDLED_DIR", "BUNDLED_ID", "TinyDLLMConfig", "TinyDLLMModel", "build_char_tokenizer"]
