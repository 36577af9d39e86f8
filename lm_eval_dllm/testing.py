"""Tiny randomly initialised checkpoints of each family, for tests and demos.

    python -m lm_eval_dllm.testing /tmp/tiny-llada --family llada    # or dream, tiny

They are written to disk (config + safetensors weights + tokenizer) and loaded back through
exactly the path real checkpoints take. The LLaDA and Dream ones are the real architectures at a
tiny width: the official config.json keys and weight names, the real vocabulary size and
special-token ids, so they load natively (`lm_eval_dllm.models`) as the published checkpoints do.
They carry no model code (`impl=remote` needs the official files copied in, as the tests do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import FAMILIES, NativeDLLM, official_state_dict
from .tiny import TinyDLLMConfig, TinyDLLMModel, build_char_tokenizer

# facts from the published config.json and tokenizer files (see the project's DESIGN notes)
FAMILY_FACTS = {
    "llada": {
        "model_type": "llada", "vocab_size": 126464, "mask": ("<|mdm_mask|>", 126336),
        "eos": ("<|endoftext|>", 126081), "bos": ("<|startoftext|>", 126080),
        "turn_end": ("<|eot_id|>", 126348),
        "chat_template": (
            "<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    "dream": {
        "model_type": "Dream", "vocab_size": 152064, "mask": ("<|mask|>", 151666),
        "eos": ("<|endoftext|>", 151643), "bos": None, "turn_end": ("<|im_end|>", 151645),
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
}


def float_tol(magnitude: float | torch.Tensor, terms: int, dtype: torch.dtype = torch.float32) -> float:
    """The largest |a - b| between two evaluations of one float computation that differ only in
    the order of their sums: batch size, row order, thread count, SIMD width (AVX2 against
    AVX-512 kernels), a span forward against the full one.

    magnitude: the size of what the result is summed from (the sum of the terms' absolute
    values); terms: the length of the longest reduction. Recursive summation of n terms is within
    (n - 1) * eps / 2 * sum |x| of the exact sum (Higham, Accuracy and Stability, eq. 4.4), so
    two orders are within n * eps * sum |x| of each other, on any CPU.
    """
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().item()
    return terms * torch.finfo(dtype).eps * float(magnitude)


def llada_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """LLaDA-8B-Instruct's config.json with the sizes replaced."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": 126464,
        "eos_token_id": 126081, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
        "mlp_hidden_size": 3 * d_model, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "n_layers": n_layers, "pad_token_id": 126081, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
        "weight_tying": False,
    }


def dream_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """Dream-v0-Instruct-7B's config.json with the sizes replaced."""
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": d_model, "initializer_range": 0.02, "intermediate_size": 3 * d_model,
        "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": n_layers,
        "model_type": "Dream", "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 152064,
    }


def save_sharded(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json as published."""
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def random_native(config: dict, seed: int, init_std: float, logit_scale: float) -> NativeDLLM:
    """A NativeDLLM of `config` with random weights: matrices N(0, init_std), norms and biases
    away from their neutral values (so a weight loaded under a wrong name shows), the output
    layer times logit_scale (random logits are near-uniform; scaling keeps argmax and confidence
    order far from ties that float rounding could flip)."""
    fam = FAMILIES[config["model_type"].lower()]
    g = torch.Generator().manual_seed(seed)
    model = NativeDLLM(fam.arch_config(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=g))
        out = model.embed.weight if model.head is None else model.head.weight
        out.mul_(logit_scale)
    return model.eval()


def build_tiny_checkpoint(out: str | Path, family: str = "tiny", d_model: int = 32,
                          n_layers: int = 2, n_heads: int = 2, seed: int = 0,
                          init_std: float = 0.5, mask: bool = True, n_kv_heads: int | None = None,
                          shards: int = 1, logit_scale: float = 1.0,
                          dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Write a random checkpoint of `family` (tiny, llada, dream) to `out` and return it.

    init_std is large so that random logits are well separated (no near-ties whose order could
    flip with float rounding). mask=False drops the mask token (a checkpoint that is no dLLM).
    LLaDA / Dream only: n_kv_heads < n_heads for grouped-query attention, shards > 1 writes an
    index and that many weight files, logit_scale scales the output layer, dtype is the stored
    one, config_kwargs override config.json keys.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "tiny":
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
    if family not in FAMILY_FACTS:
        raise ValueError(f"unknown family {family!r}; valid: tiny, {', '.join(FAMILY_FACTS)}")
    f = FAMILY_FACTS[family]
    specials = {"eos_token": f["eos"], "pad_token": f["eos"], "unk_token": ("<unk>", None),
                "turn_end": f["turn_end"]}
    if mask:
        specials["mask_token"] = f["mask"]
    if f["bos"]:
        specials["bos_token"] = f["bos"]
    extra = {"start_header": ("<|start_header_id|>", None), "end_header": ("<|end_header_id|>", None),
             "im_start": ("<|im_start|>", None)}
    tok = build_char_tokenizer(specials | extra, chat_template=f["chat_template"])
    make = llada_config if family == "llada" else dream_config
    config = make(d_model, n_layers, n_heads, n_kv_heads or n_heads) | config_kwargs
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if not mask:
        config.pop("mask_token_id", None)
    model = random_native(config, seed, init_std, logit_scale)
    save_sharded({k: v.to(dtype) for k, v in official_state_dict(model, config["model_type"]).items()},
                 out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random dLLM checkpoint.")
    p.add_argument("out")
    p.add_argument("--family", default="tiny", choices=["tiny", *FAMILY_FACTS])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="llada/dream: weight files (an index if > 1)")
    a = p.parse_args(argv)
    print(build_tiny_checkpoint(a.out, a.family, seed=a.seed, shards=a.shards))


if __name__ == "__main__":
    main()


def install_offline_gsm8k(data_dir: str | Path, datasets_cache: str | Path) -> Path:
    """Make `load_dataset("openai/gsm8k", "main")` work offline from local JSONL files.

    data_dir holds GSM8K's train.jsonl and test.jsonl (the published files: `question`, `answer`).
    They are prepared with datasets' json builder and placed where datasets looks for a cached
    copy of the hub dataset when HF_DATASETS_OFFLINE=1 (`<cache>/openai___gsm8k/main/0.0.0/<hash>`),
    so lm-eval's stock `gsm8k` task runs unchanged. Point HF_DATASETS_CACHE at datasets_cache (and,
    in-process, `datasets.config.HF_DATASETS_CACHE`). Returns the prepared folder.
    """
    import shutil

    from datasets.packaged_modules.json.json import Json

    data_dir, cache = Path(data_dir), Path(datasets_cache)
    files = {s: str(data_dir / f"{s}.jsonl") for s in ("train", "test")}
    builder = Json(dataset_name="gsm8k", config_name="main", cache_dir=str(cache / "_build"), data_files=files)
    builder.download_and_prepare()
    src = Path(builder.cache_dir)
    dst = cache / "openai___gsm8k" / "main" / "0.0.0" / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)
    return dst
