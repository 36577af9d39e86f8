"""Shipped learned unmasking policies and the catalog that picks one for a model and block size.

Each sub-folder is a policy exactly as `python -m train.grpo` wrote it (`OUT/best`, copied here):
`policy.safetensors` + `policy.json`, whose config names the base model, task, block size and
generation length it was trained for and whose card holds the training command and its metrics.
The catalog is read from those files, so there is no hand-written list to drift out of date.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


class CatalogError(ValueError):
    """A one-line user error about policies (this package imports nothing from lm_eval_dllm, which
    imports it: `lm_eval_dllm.policy` re-raises it as DLLMError)."""


def catalog() -> list[dict]:
    """One entry per shipped policy: path (relative to this package), base_model, task, block,
    gen_length, alpha (the NFE-discount exponent it was trained with) and val_reward (its card's
    validation reward; -inf if none)."""
    out = []
    for meta_path in sorted(HERE.glob("*/policy.json")):
        try:
            meta = json.loads(meta_path.read_text())
            cfg = meta["config"]
            card = meta.get("card") or {}
            alpha = card.get("alpha")  # none recorded: never the default pick
            if alpha is None and card.get("alpha_range"):  # alpha-conditioned: ranked by its lowest alpha
                alpha = card["alpha_range"][0]
            val = (card.get("metrics") or {}).get("val_reward")  # of the checkpoint kept
            val = None if val is None or val != val else val  # none or NaN: ranked last
            out.append({"path": meta_path.parent.name, "base_model": cfg["base_model"], "task": cfg["task"],
                        "block": cfg["block"], "gen_length": cfg["gen_length"],
                        "alpha": float("inf") if alpha is None else float(alpha),
                        "alpha_range": card.get("alpha_range"),
                        "val_reward": float("-inf") if val is None else float(val)})
        except (ValueError, KeyError, TypeError) as e:
            raise CatalogError(f"shipped policy {meta_path} is malformed ({type(e).__name__}: {e}); valid: "
                            f"policy.json as `python -m train.grpo` writes it") from None
    return out


def shipped_for(model_id: str) -> list[dict]:
    """The catalog entries trained on this model."""
    return [e for e in catalog() if e["base_model"] == model_id]


def resolve_policy(policy: str, *, model_id: str, block: int, gen_length: int) -> Path:
    """An explicit folder (or a shipped policy's name), or the catalog entry for this model: exact
    block first, then the nearest; among policies for the same block the lowest alpha (the one that
    weighs accuracy most; the others, trained to spend fewer forwards, are picked by name), and among
    those the highest validation reward on the card (at one alpha and block the reward weighs
    accuracy and NFE alike; the validation sets may still differ in size), then name."""
    if policy:
        p = Path(policy).expanduser()
        if not p.exists() and (HERE / policy).exists():
            p = HERE / policy
        if not p.exists():
            raise CatalogError(f"policy {policy!r} does not exist; valid: a folder written by "
                            f"`python -m train.grpo`, or one of: "
                            f"{', '.join(e['path'] for e in catalog()) or '(none shipped)'}")
        return p
    eff = min(block, gen_length)
    same = shipped_for(model_id)
    if not same:
        have = "; ".join(f"{e['path']} ({e['base_model']}, block {e['block']})" for e in catalog())
        raise CatalogError(f"no shipped policy for model {model_id!r}; valid: policy=<folder from "
                        f"`python -m train.grpo`>, or a model with a shipped policy: {have or '(none)'}")
    best = min(same, key=lambda e: (min(e["block"], e["gen_length"]) != eff,
                                    abs(min(e["block"], e["gen_length"]) - eff), *_rank(e)))
    return HERE / best["path"]


def variants_for(model_id: str, block: int) -> list[str]:
    """Names of the shipped policies for this model trained at exactly this block (B >= L: full
    diffusion, L being each policy's own gen_length), the default pick first: what the results
    grid sweeps for sampler `learned`."""
    same = [e for e in shipped_for(model_id) if min(e["block"], e["gen_length"]) == min(block, e["gen_length"])]
    return [e["path"] for e in sorted(same, key=_rank)]


def _rank(e: dict) -> tuple:
    """Order among policies for one block: lowest alpha, then highest validation reward, then name."""
    return e["alpha"], -e["val_reward"], e["path"]
