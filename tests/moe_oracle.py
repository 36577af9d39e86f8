"""Native LLaDA-MoE / LLaDA2.x against the official inclusionAI code, one family per process.

    python -m tests.moe_oracle llada_moe /tmp/oracle      # prints a JSON report

Builds a tiny random checkpoint (`lm_eval_dllm.testing`), imports the official modeling file from
../shared/reference as a package, builds its model from the same config.json and loads the same
safetensors into it by name (every official weight must be present), then compares logits. The
official files were written for transformers 4; under transformers 5 three things they import are
gone, which this helper supplies in-process (test code only, never in the package):
`transformers.modeling_attn_mask_utils` (a non-causal 2-D -> 4-D additive mask, as its
AttentionMaskConverter(is_causal=False).to_4d made), `ROPE_INIT_FUNCTIONS["default"]` (plain RoPE
over int(head_dim * partial_rotary_factor) dims) and `is_torch_fx_available`.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
import transformers.modeling_rope_utils as rope_utils
import transformers.utils.import_utils as import_utils
from safetensors.torch import load_file

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint

from .native_oracle import REFERENCE, max_diff

# family -> (reference folder, config module, modeling module, class)
CODE = {
    "llada_moe": ("llada-moe", "configuration_lladamoe", "modeling_lladamoe", "LLaDAMoEModelLM"),
    "llada2": ("llada2", "configuration_llada2_moe", "modeling_llada2_moe", "LLaDA2MoeModelLM"),
    "llada21": ("llada2.1", "configuration_llada21_moe", "modeling_llada21_moe", "LLaDA2MoeModelLM"),
}
# generate() builds its block mask (0 / -inf) in bfloat16, which SDPA refuses next to float32
# queries: the same values in the model's dtype
BF16_MASK = [(".log()\n            .to(torch.bfloat16)", ".log()\n            .to(self.dtype)")]
EDITS = {"modeling_llada2_moe": BF16_MASK, "modeling_llada21_moe": BF16_MASK}
# official generate() settings beyond the shared ones: LLaDA2.1 with its token editing off (no
# confidence exceeds 1.0), what the native decode reproduces
GENERATE = {"llada2": {}, "llada21": {"editing_threshold": 1.0}}
BLOCK = 4  # attention block of the block-causal families in the logits comparison
LOGIT_SCALE = 3.0  # random logits are near-uniform: keep argmax / confidence order off ties


def _to_4d(mask_2d: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) 1/0 -> (B, 1, Q, K) additive: 0 on real keys, the dtype's minimum on padding."""
    m = mask_2d[:, None, None, :].expand(-1, 1, query_length, -1).bool()
    return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)


def _default_rope(config, device=None, **_):
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    dim = int(head_dim * (factor if factor > 0 else 1.0))
    inv = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return inv, 1.0


def install_shims() -> None:
    mod = types.ModuleType("transformers.modeling_attn_mask_utils")

    class AttentionMaskConverter:
        def __init__(self, is_causal: bool):
            assert not is_causal

        def to_4d(self, attention_mask_2d, query_length, dtype, **_):
            return _to_4d(attention_mask_2d, query_length, dtype)

    def _unused(*a, **k):
        raise NotImplementedError("the oracle always passes a 4-D mask")

    mod.AttentionMaskConverter = AttentionMaskConverter
    mod._prepare_4d_causal_attention_mask = mod._prepare_4d_causal_attention_mask_for_sdpa = _unused
    sys.modules[mod.__name__] = mod
    rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", _default_rope)
    if not hasattr(import_utils, "is_torch_fx_available"):
        import_utils.is_torch_fx_available = lambda: False


def official_model(family: str, ck: Path, work: Path, dtype: torch.dtype = torch.float32):
    """The official class built from ck's config.json with ck's weights (strict: all present), in
    `dtype`."""
    folder, conf_mod, model_mod, cls = CODE[family]
    pkg = work / f"official_{family}"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in (conf_mod, model_mod):
        text = (REFERENCE / folder / f"{name}.py").read_text()
        for old, new in EDITS.get(name, []):
            assert text.count(old) == 1, f"edit does not apply to {name}"
            text = text.replace(old, new)
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(work))
    install_shims()
    conf = importlib.import_module(f"{pkg.name}.{conf_mod}")
    modeling = importlib.import_module(f"{pkg.name}.{model_mod}")
    config_cls = next(v for v in vars(conf).values() if isinstance(v, type) and v.__module__ == conf.__name__)
    config = config_cls(**json.loads((ck / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    model = getattr(modeling, cls)(config).to(dtype).eval()
    state = {}
    for f in sorted(ck.glob("*.safetensors")):
        state |= load_file(str(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "inv_freq" not in k], missing  # every weight has our name
    return model


def logits_report(family: str, out: Path) -> dict:
    ck = build_tiny_checkpoint(out / family, family, d_model=32, n_heads=4, n_kv_heads=4,
                               n_layers=2, logit_scale=LOGIT_SCALE)
    native, _, spec = load(str(ck), dtype="float32", device="cpu")
    official = official_model(family, ck, out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.mask_id + 1, (3, 12), generator=g)  # (B, T), the mask id included
    ones = torch.ones_like(ids)
    attn = ones.clone()
    attn[1, :3], attn[2, :6] = 0, 0  # left padding
    ids_p = ids.masked_fill(attn == 0, spec.pad_id)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    real = attn.bool()
    blk = BLOCK if spec.block_causal else 0
    # what the official code is given: a 2-D mask, or (block diffusion) the 4-D bool mask its
    # generate() builds, padded keys masked too
    if blk:
        causal = (pos // blk)[:, None, None, :] <= (pos // blk)[:, None, :, None]  # (B, 1, T, T)
        mask_p, mask = causal & real[:, None, None, :], causal[:1].expand(len(ids), -1, -1, -1)
    else:
        mask_p, mask = attn, None
    with torch.no_grad():
        alone = native(ids_p[2:, 6:], block=blk)[0][0]
        nat, _ = native(ids, ones, block=blk)
        off = official(input_ids=ids, attention_mask=mask).logits.float()
        full = native(ids, ones)[0]  # no block mask: what block-causal attention changes
        nat_p, _ = native(ids_p, attn, block=blk)
        off_p = official(input_ids=ids_p, attention_mask=mask_p, position_ids=pos).logits.float()
    return {"official_class": type(official).__name__, "native_class": type(native).__name__,
            "unpadded": max_diff(nat, off), "max_abs_logit": float(off.abs().max()),
            "padded": max_diff(nat_p[real], off_p[real]),
            "native_padded_vs_alone": max_diff(nat_p[2, 6:], alone),
            "distinct_argmax": int(off.argmax(-1).unique().numel()),
            "block_mask_changes_logits": max_diff(full, off) if blk else None}


PROMPTS = ["Q: 1+2*3\nA: ", "hello", "Q: 9-8*7+6-5\nA: ", "x", "a longer prompt, with more text",
           "Q: 0\nA: ", "abc", "Q: 5+5+5+5\nA: "]  # lengths differ mod every block length


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


# (block length, threshold) pairs, and whether to check batch 8 = batch 1 (the decode path is the
# same for both families); kept small: the 157k-vocabulary statistics dominate each step
SETTINGS = {"llada2": [(8, 0.95), (8, 0.6), (32, 0.6)],
            "llada21": [(8, 0.95), (32, 0.6)]}  # both block lengths and both thresholds
BATCH_CHECK = {"llada2": True, "llada21": False}


def generate_report(family: str, out: Path, gen_length: int = 32) -> dict:
    """Official generate() at batch 1 vs our threshold sampler at batch 1, for block lengths 8 and
    32 and two thresholds (steps = block length, its default pairing), on 2 prompts (lengths 13
    and 5: first blocks partly prompt); and for one setting our batch of 8 vs each row alone."""
    ck = out / family
    native, tok, spec = load(str(ck), dtype="float32", device="cpu")
    official = official_model(family, ck, out)
    fwd = model_forward(native, spec)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    eos = spec.stop_ids[0]
    rep, alone = {}, {}  # alone: (block, tau, row) -> our tokens for that prompt alone
    for block, tau in SETTINGS[family]:
        sampler = make_sampler("threshold", {"tau": tau})
        same, nfe = [], []
        for i, p in enumerate(prompts[:2]):
            want = official.generate(torch.tensor([p]), block_length=block, steps=block,
                                     gen_length=gen_length, threshold=tau, eos_id=eos,
                                     mask_id=spec.mask_id, **GENERATE[family])[0].tolist()
            one = diffuse(fwd, [p], spec, sampler, gen_length, block, seeds=[i])
            alone[block, tau, i] = one.tokens[0]
            same.append(until_eos(one.tokens[0].tolist(), eos) == want)
            nfe.append(int(one.nfe[0]))
        rep[f"B{block}_tau{tau}"] = {"equal_official": same, "mean_nfe": sum(nfe) / len(nfe)}
    if not BATCH_CHECK[family]:
        return rep
    sampler = make_sampler("threshold", {"tau": 0.95})
    batch = diffuse(fwd, prompts, spec, sampler, gen_length, 8, seeds=list(range(8)))
    for i, p in enumerate(prompts):  # the rows decoded alone above are not decoded again
        if (8, 0.95, i) not in alone:
            alone[8, 0.95, i] = diffuse(fwd, [p], spec, sampler, gen_length, 8, seeds=[i]).tokens[0]
    rep["batch8_equals_batch1"] = [torch.equal(alone[8, 0.95, i], batch.tokens[i]) for i in range(len(prompts))]
    rep["distinct_tokens"] = int(batch.tokens.unique().numel())
    return rep


def main(argv=None) -> None:
    args = argv or sys.argv[1:]
    family, out = args[0], Path(args[-1])
    torch.set_num_threads(1)
    report = {"logits": logits_report(family, out)}
    if "--generate" in args:
        report["generate"] = generate_report(family, out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
