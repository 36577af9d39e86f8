"""Load a dLLM (bundled tiny, LLaDA, Dream, generic), with clear errors.

LLaDA and Dream load natively by default (`lm_eval_dllm.models`: no remote code, any
transformers); `impl=remote` runs the checkpoint's own code through
`AutoModel.from_pretrained(..., trust_remote_code=True)`, as every other dLLM does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

from . import tiny  # noqa: F401  (registers the bundled model class with AutoModel)
from .models import diffusion_gemma, load_native, native_families, native_family
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


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of x86 CPUs that compute bf16 natively


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in text.splitlines()
                 if line.startswith("flags")), set())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (what dtype=auto asks).

    CUDA: bf16 in hardware (Ampere and later; not the emulation older GPUs offer). CPU: AMX-BF16 or
    AVX512-BF16, and torch dispatching to AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2 caps that, as it
    caps torch itself). Elsewhere (an AVX2-only CPU, MPS) bf16 matmuls take slow paths and float32
    is the faster choice (results/bundled/dtype_cpu.md).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def auto_dtype(device: torch.device) -> torch.dtype:
    """dtype=auto: bfloat16 where `device` computes it natively, else float32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


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


IMPLS = ("auto", "native", "remote")
# what a hub id needs for impl=native: config, weights, tokenizer (with its code), templates
NATIVE_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def _hub_error(path: str, e: Exception) -> DLLMError:
    # offline, unknown repo, no access: one line, not a traceback
    return DLLMError(f"cannot load pretrained {path!r}: {_first_line(e)}")


def read_config(path: str, revision: str | None) -> dict:
    """config.json as a dict, with no code run (a hub id fetches that one file)."""
    if Path(path).is_dir():
        return _config_file(Path(path) / "config.json")
    from huggingface_hub import hf_hub_download  # only hub ids need it

    try:
        file = Path(hf_hub_download(path, "config.json", revision=revision))
    except Exception as e:
        raise _hub_error(path, e) from None
    return _config_file(file)


def _config_file(file: Path) -> dict:
    """A config.json's object, or a one-line error naming the file (missing, damaged, not an object)."""
    try:
        config = json.loads(file.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise DLLMError(f"{file} is not a model config ({type(e).__name__}: {_first_line(e)[:100]}); "
                        f"valid: a checkpoint folder with a whole config.json (re-download or re-save "
                        f"it)") from None
    return config


def local_checkpoint(path: str, revision: str | None) -> Path:
    """A local folder for `path` (a folder already, or a hub id fetched to the HF cache)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=NATIVE_FILES))
    except Exception as e:
        raise _hub_error(path, e) from None


def load_tokenizer(pretrained: str, trust_remote_code: bool = True, revision: str | None = None):
    return AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code, revision=revision)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint says about itself before any weights load (seconds, not minutes)."""
    path: str
    native: bool  # loaded by lm_eval_dllm.models (LLaDA, Dream) rather than its remote code
    config: Any  # config.json as a dict (native), or the transformers config
    tokenizer: Any
    spec: FamilySpec


def read_checkpoint(pretrained: str, trust_remote_code: bool = True, revision: str | None = None,
                    impl: str = "auto") -> Checkpoint:
    """Config, tokenizer and FamilySpec, no weights, so every setting can be checked first.

    impl: auto (native for LLaDA and Dream, remote code for the rest), native, or remote."""
    if impl not in IMPLS:
        raise DLLMError(f"impl={impl!r}; valid: {', '.join(IMPLS)}")
    path = resolve_pretrained(pretrained)
    native = False
    if impl != "remote":
        config = read_config(path, revision)
        native = native_family(config) is not None
        if impl == "native" and not native:
            types = ", ".join(f.model_type for f in native_families())
            raise DLLMError(f"impl=native: {path!r} (model_type {config.get('model_type')!r}) has no "
                            f"native implementation; valid: impl=auto or impl=remote, or a checkpoint "
                            f"of model_type {types}")
    if native:
        tokenizer = _tokenizer(path, trust_remote_code, revision)
        return Checkpoint(path, True, config, tokenizer,
                          spec_from(SimpleNamespace(**config), tokenizer, name=path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise DLLMError(f"cannot load pretrained {path!r}: {_first_line(e)}") from None
    except Exception as e:
        raise _remote_failure(path, None, e) from None
    tokenizer = _tokenizer(path, trust_remote_code, revision)
    if diffusion_gemma.is_diffusion_gemma(config):  # issue 31: uniform noise, no mask token
        gc = diffusion_gemma.generation_config(path, revision)
        return Checkpoint(path, False, config, tokenizer, diffusion_gemma.family_spec(config, tokenizer, gc))
    return Checkpoint(path, False, config, tokenizer, spec_from(config, tokenizer, name=path, remote=True))


def load(pretrained: str, dtype: str = "auto", device: str | None = None,
         trust_remote_code: bool = True, revision: str | None = None, impl: str = "auto",
         checkpoint: Checkpoint | None = None):
    """Returns (model in eval mode on device, tokenizer, FamilySpec); `checkpoint` if already read."""
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if torch_dtype == "auto":
        torch_dtype = auto_dtype(dev)
    elif torch_dtype == torch.bfloat16 and dev.type == "cpu" and not native_bf16(dev):
        log.warning("dtype=bfloat16 on a CPU without AMX-BF16 or AVX512-BF16 runs slower than float32; "
                    "dtype=auto picks float32 here")
    ck = checkpoint or read_checkpoint(pretrained, trust_remote_code, revision, impl)
    if ck.native:
        local = local_checkpoint(ck.path, revision)
        _check_weights(local)
        model = load_native(local, ck.config, torch_dtype, dev)
    elif diffusion_gemma.is_diffusion_gemma(ck.config):  # issue 31: transformers' own class, with our hooks
        model = diffusion_gemma.load(ck.path, torch_dtype, dev, revision)
    else:
        if Path(ck.path).is_dir():
            _check_weights(Path(ck.path))
        try:
            model = AutoModel.from_pretrained(ck.path, dtype=torch_dtype,
                                              trust_remote_code=trust_remote_code, revision=revision)
        except OSError as e:  # missing weights, offline
            raise DLLMError(f"cannot load pretrained {ck.path!r}: {_first_line(e)}") from None
        except Exception as e:
            raise _remote_failure(ck.path, ck.config, e) from None
        model = model.to(dev).eval()
    log.info("loaded %s (%s family, %s, mask id %d, %s) on %s", ck.path, ck.spec.family,
             "native" if ck.native else "remote code", ck.spec.mask_id,
             next(model.parameters()).dtype, dev)
    return model, ck.tokenizer, ck.spec


def _check_weights(folder: Path) -> None:
    for f in sorted(folder.glob("*.safetensors")):  # whole files only: a truncated one names itself
        check_safetensors(f)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _remote_failure(path: str, config, e: Exception) -> Exception:
    """The official LLaDA / Dream code fails under transformers 5 in known ways: say what to do."""
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        try:
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            pass
    if native_family({"model_type": model_type}) is None:
        return e  # not a family we can help with: the original error
    return DLLMError(f"the remote code of {path!r} ({model_type}) does not load under transformers "
                     f"{transformers.__version__}: {type(e).__name__}: {_first_line(e)}; valid: "
                     f"impl=native (the default for {model_type})")


def _tokenizer(path: str, trust_remote_code: bool, revision: str | None):
    try:
        return load_tokenizer(path, trust_remote_code, revision)
    except OSError as e:
        raise DLLMError(f"cannot load pretrained {path!r}: {_first_line(e)}") from None
