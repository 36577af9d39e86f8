"""Native LLaDA / Dream against the official code, one revision per process.

    python -m tests.native_oracle llada-B /tmp/oracle            # or llada-A, dream; prints JSON
    python -m tests.native_oracle dream --decode /tmp/oracle     # also decode native vs remote
    python -m tests.native_oracle remote-errors /tmp/oracle      # unpatched code: the error line

Builds a tiny random checkpoint of the real architecture (`lm_eval_dllm.testing`), copies the
official model code from ../shared/reference into it with the transformers-5 patches of
../shared/reference/patches-transformers5 applied (in this test helper, never in the package),
then measures native vs official: logits on unpadded and left-padded batches, and the tokens the
`dllm` model decodes with impl=native and impl=remote. It runs in a process of its own because
transformers caches remote-code classes per process: a second LLaDA revision loaded in the same
process would silently run the first one's code.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.model import DLLM
from lm_eval_dllm.models import family_named
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PATCHES = REFERENCE / "patches-transformers5"
# revision -> (family, {file in the checkpoint: file under REFERENCE}); JSON templates included
CODE = {
    "llada-A": ("llada", {"configuration_llada.py": "llada/configuration_llada.py",
                          "modeling_llada.py": "llada/modeling_llada.py"}),
    "llada-B": ("llada", {"configuration_llada.py": "llada/configuration_llada.py",
                          "modeling_llada.py": "llada/revB/modeling_llada.py"}),
    "dream": ("dream", {"configuration_dream.py": "dream/configuration_dream.py",
                        "modeling_dream.py": "dream/modeling_dream.py",
                        "generation_utils.py": "dream/generation_utils.py",
                        "generation_config.json": "dream/generation_config.json"}),
}
# One more edit the shared patch set lacks: transformers 5 builds models on the meta device and
# leaves Dream's non-persistent RoPE buffer `inv_freq` uninitialised (garbage logits, no error);
# the model's own reset_rope_parameters() recomputes it after loading.
EXTRA_EDITS = {"dream/modeling_dream.py": [(
    "        # NOTE(Lin): we need to override the generation config",
    "        _model.reset_rope_parameters()  # PATCH(transformers>=5): inv_freq left uninitialised\n"
    "        # NOTE(Lin): we need to override the generation config")]}
LOGIT_SCALE = 3.0  # random logits are near-uniform: keep argmax / confidence order off ties
PROMPTS = ["Q: 1+2*3\nA: ", "hello", "Q: 9-8*7+6-5\nA: ", "x", "a longer prompt, with more text",
           "Q: 0\nA: ", "abc", "Q: 5+5+5+5\nA: "]


def hunks(patch: str):
    """(target path without its first folder, old text, new text) of each hunk of a unified diff."""
    target, old, new = None, None, None
    for line in patch.splitlines():
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0].split("/", 1)[1]
        elif line.startswith("--- "):
            continue
        elif line.startswith("@@"):
            if old is not None:
                yield target, "\n".join(old), "\n".join(new)
            old, new = [], []
        elif old is not None:
            tag, text = line[:1], line[1:]
            if tag in (" ", "-"):
                old.append(text)
            if tag in (" ", "+"):
                new.append(text)
    if old is not None:
        yield target, "\n".join(old), "\n".join(new)


def patched(ref: str) -> str:
    """The reference file `ref` (e.g. llada/revB/modeling_llada.py) with its patches applied."""
    family, rel = ref.split("/", 1)
    text = (REFERENCE / ref).read_text()
    for p in sorted(PATCHES.glob("*.patch")):
        body = p.read_text()
        if not body.startswith(f"--- {family}-"):
            continue
        for target, old, new in hunks(body):
            if target == rel:
                assert text.count(old) == 1, f"{p.name} does not apply to {ref}"
                text = text.replace(old, new)
    for old, new in EXTRA_EDITS.get(ref, []):
        assert text.count(old) == 1, f"extra edit does not apply to {ref}"
        text = text.replace(old, new)
    return text


def official_checkpoint(out: Path, revision: str, patch: bool = True, **kw) -> Path:
    """A tiny random checkpoint of `revision` carrying the official code (patched unless told);
    kw: build_tiny_checkpoint's sizes and settings."""
    family, files = CODE[revision]
    n_kv = family_named(family).tiny.n_kv_heads  # as the published model (Dream-7B: grouped)
    kw = {"d_model": 32, "n_heads": 4, "n_kv_heads": n_kv, "logit_scale": LOGIT_SCALE} | kw
    ck = build_tiny_checkpoint(out, family, **kw)
    for name, ref in files.items():
        if name.endswith(".py"):
            (ck / name).write_text(patched(ref) if patch else (REFERENCE / ref).read_text())
        else:
            shutil.copy(REFERENCE / ref, ck / name)
    return ck


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def bf16_report(ck: Path) -> dict:
    """Unpadded logits with both models loaded in bfloat16: the same casts in the same places."""
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    logits = {}
    for impl in ("native", "remote"):
        model, _, spec = load(str(ck), dtype="bfloat16", device="cpu", impl=impl)
        logits[impl] = model_forward(model, spec)(ids, torch.ones_like(ids)).float()
    return {"unpadded_bf16": max_diff(logits["native"], logits["remote"]),
            "max_abs_logit_bf16": float(logits["remote"].abs().max())}


def logits_report(lms: dict[str, DLLM]) -> dict:
    fn, fo = lms["native"].gen.forward, lms["remote"].gen.forward
    spec, official = lms["native"].spec, lms["remote"].model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.mask_id + 1, (3, 12), generator=g)  # (B, T) mask token included
    ones = torch.ones_like(ids)
    attn = ones.clone()
    attn[1, :3], attn[2, :6] = 0, 0  # left padding
    ids_p = ids.masked_fill(attn == 0, spec.pad_id)
    real = attn.bool()
    try:  # what model_forward passed before spec.mask_4d: a 2-D mask
        official(input_ids=ids_p, attention_mask=attn)
        mask_2d = "accepted"
    except Exception as e:
        mask_2d = type(e).__name__
    return {
        "official_class": type(official).__name__, "native_class": type(lms["native"].model).__name__,
        "unpadded": max_diff(fn(ids, ones), fo(ids, ones)),
        "padded": max_diff(fn(ids_p, attn)[real], fo(ids_p, attn)[real]),
        "native_padded_vs_alone": max_diff(fn(ids_p, attn)[2, 6:], fn(ids_p[2:, 6:], ones[2:, 6:])[0]),
        "official_padded_vs_alone": max_diff(fo(ids_p, attn)[2, 6:], fo(ids_p[2:, 6:], ones[2:, 6:])[0]),
        "official_with_2d_mask": mask_2d,
        # what a float bound is derived from: the logits' size and the forward's longest reduction
        "max_abs_logit": float(fn(ids, ones).abs().max()),
        "terms": max(lms["native"].model.config.d_ff, ids.shape[1]),
    }


def decode_report(lms: dict[str, DLLM]) -> dict:
    """Tokens per sampler through each `dllm` model's forward strategy: native vs remote; and the
    native batch of 8 vs each prompt alone (threshold; batch invariance needs one sampler)."""
    settings = {"threshold": {"tau": 0.5}, "learned": {"policy": "modchain-B8-alphas"}}
    out = {}
    for name, args in settings.items():
        res = {}
        for impl, lm in lms.items():
            sampler = make_sampler(name, args)
            lm.gen.attach_policy(sampler, 8, 16)  # the shipped policy, as evaluation loads it
            prompts = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
            res[impl] = diffuse(lm.gen.forward, prompts, lm.spec, sampler, 16, 8, seeds=list(range(8)))
        nat, rem = res["native"], res["remote"]
        out[name] = {
            "native_equals_remote": bool(torch.equal(nat.tokens, rem.tokens)),
            "nfe_equal": bool(torch.equal(nat.nfe, rem.nfe)),
            "mean_nfe": float(nat.nfe.float().mean()),
            "distinct_tokens": int(nat.tokens.unique().numel()),
        }
        if name == "threshold":
            lm = lms["native"]
            out[name]["batch8_equals_batch1"] = all(
                torch.equal(diffuse(lm.gen.forward, [p], lm.spec, sampler, 16, 8, seeds=[i]).tokens[0],
                            nat.tokens[i]) for i, p in enumerate(prompts))
    return out


def remote_errors(out: Path) -> dict:
    """What impl=remote says for the unpatched official code (LLaDA rev A, Dream)."""
    rep = {}
    for revision, family in (("llada-A", "llada"), ("dream", "dream")):
        ck = official_checkpoint(out / f"{revision}-unpatched", revision, patch=False)
        try:
            load(str(ck), dtype="float32", device="cpu", impl="remote")
            rep[family] = "loaded"
        except Exception as e:
            rep[family] = f"{type(e).__name__}: {e}"
    return rep


def main(argv=None) -> None:
    args = argv or sys.argv[1:]
    revision, out, decode = args[0], Path(args[-1]), "--decode" in args
    torch.set_num_threads(1)
    if revision == "remote-errors":
        print(json.dumps(remote_errors(out)))
        return
    ck = official_checkpoint(out / revision, revision)
    lms = {impl: DLLM(pretrained=str(ck), impl=impl, dtype="float32", device="cpu", gen_length=16,
                      block=8) for impl in ("native", "remote")}
    report = {"logits": logits_report(lms) | bf16_report(ck)}
    if decode:
        report["decode"] = decode_report(lms)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
