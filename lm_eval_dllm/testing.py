"""Tiny randomly initialised checkpoints with each family's interface, for tests and demos.

    python -m lm_eval_dllm.testing /tmp/tiny-llada --family llada

They are written to disk (config + safetensors weights + tokenizer) and loaded back through
exactly the path real checkpoints take (`AutoModel.from_pretrained(..., trust_remote_code=True)`).
The LLaDA and Dream ones use remote code written into the checkpoint folder, with the real
models' model_type, special-token ids and vocabulary size; Dream's logits are shifted by one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .tiny import TinyDLLMConfig, TinyDLLMModel, build_char_tokenizer

# facts from the published config.json files (see the project's DESIGN notes)
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
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    },
    "dream": {
        "model_type": "Dream", "vocab_size": 152064, "mask": ("<|mask|>", 151666),
        "eos": ("<|endoftext|>", 151643), "bos": None, "turn_end": ("<|im_end|>", 151645),
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
    },
}

_CONFIG_SRC = '''from lm_eval_dllm.tiny.modeling import TinyDLLMConfig


class {cls}(TinyDLLMConfig):
    model_type = "{model_type}"
'''

_MODEL_SRC = '''import torch
from transformers.modeling_outputs import MaskedLMOutput

from lm_eval_dllm.tiny.modeling import TinyDLLMModel

from .{config_module} import {config_cls}


class {cls}(TinyDLLMModel):
    config_class = {config_cls}
    SHIFTED = {shifted}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = super().forward(input_ids, attention_mask=attention_mask).logits
        if self.SHIFTED:  # Dream's convention: the logit at i predicts token i + 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return MaskedLMOutput(logits=logits)
'''


def build_tiny_checkpoint(out: str | Path, family: str = "tiny", d_model: int = 32,
                          n_layers: int = 2, n_heads: int = 2, seed: int = 0,
                          init_std: float = 0.5, mask: bool = True, **config_kwargs) -> Path:
    """Write a random checkpoint of `family` (tiny, llada, dream) to `out` and return it.

    init_std is large so that random logits are well separated (no near-ties whose order could
    flip with float rounding). mask=False drops the mask token (a checkpoint that is no dLLM).
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
    name = "llada" if family == "llada" else "dream"
    cfg_cls = "LLaDAConfig" if family == "llada" else "DreamConfig"
    model_cls = "LLaDAModelLM" if family == "llada" else "DreamModel"
    (out / f"configuration_{name}.py").write_text(
        _CONFIG_SRC.format(cls=cfg_cls, model_type=f["model_type"]))
    (out / f"modeling_{name}.py").write_text(_MODEL_SRC.format(
        cls=model_cls, config_module=f"configuration_{name}", config_cls=cfg_cls,
        shifted=family == "dream"))
    cfg = TinyDLLMConfig(vocab_size=f["vocab_size"], d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads, d_ff=4 * d_model, max_position=512,
                         mask_token_id=f["mask"][1] if mask else None,
                         eos_token_id=f["eos"][1], pad_token_id=f["eos"][1], init_std=init_std,
                         **config_kwargs)
    model = TinyDLLMModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    conf.update(model_type=f["model_type"], auto_map=f["auto_map"],
                architectures=[model_cls])
    if not mask:
        conf.pop("mask_token_id", None)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random dLLM checkpoint.")
    p.add_argument("out")
    p.add_argument("--family", default="tiny", choices=["tiny", *FAMILY_FACTS])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_checkpoint(a.out, a.family, seed=a.seed))


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
