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

from .models import FAMILIES, NativeDLLM, family_named, family_of, official_state_dict
from .tiny import build_char_tokenizer


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
    fam = family_of(config)
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
    """Write a random checkpoint of `family` (a name in lm_eval_dllm.models.FAMILIES) to `out`.

    init_std is large so that random logits are well separated (no near-ties whose order could
    flip with float rounding). mask=False drops the mask token (a checkpoint that is no dLLM).
    Native families only: n_kv_heads < n_heads for grouped-query attention, shards > 1 writes an
    index and that many weight files, logit_scale scales the output layer, dtype is the stored
    one, config_kwargs override config.json keys.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fam = family_named(family)
    if fam.write_tiny is not None:  # a family with a class of its own (bundled)
        return fam.write_tiny(out, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                              init_std=init_std, mask=mask, **config_kwargs)
    f = fam.tiny
    specials = {"eos_token": f.eos, "pad_token": f.eos, "unk_token": ("<unk>", None),
                "turn_end": f.turn_end}
    if mask:
        specials["mask_token"] = f.mask
    if f.bos:
        specials["bos_token"] = f.bos
    extra = {"start_header": ("<|start_header_id|>", None), "end_header": ("<|end_header_id|>", None),
             "im_start": ("<|im_start|>", None)}
    tok = build_char_tokenizer(specials | extra, chat_template=f.chat_template)
    config = f.config(d_model, n_layers, n_heads, n_kv_heads or n_heads) | config_kwargs
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if not mask:
        config.pop("mask_token_id", None)
    model = random_native(config, seed, init_std, logit_scale)
    save_sharded({k: v.to(dtype) for k, v in official_state_dict(model, fam).items()},
                 out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random dLLM checkpoint.")
    p.add_argument("out")
    p.add_argument("--family", default="tiny", choices=list(FAMILIES))
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
