"""Shipped learned unmasking policies and the catalog that picks one for a model and block size.

`catalog.json` lists each policy folder (relative to this package) with the model, task, block
size and generation length it was trained for; each entry is the output of the documented
`python -m train.grpo ...` command in its `policy.json` card.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def catalog() -> list[dict]:
    p = HERE / "catalog.json"
    return json.loads(p.read_text()) if p.exists() else []


def resolve_policy(policy: str, *, model_id: str, block: int, gen_length: int) -> Path:
    """An explicit folder, or the catalog entry for this model (exact block first, then nearest)."""
    from lm_eval_dllm.utils import DLLMError

    if policy:
        p = Path(policy).expanduser()
        if not p.exists() and (HERE / policy).exists():
            p = HERE / policy
        if not p.exists():
            raise DLLMError(f"policy {policy!r} does not exist; valid: a folder written by "
                            f"`python -m train.grpo`, or one of: "
                            f"{', '.join(e['path'] for e in catalog()) or '(none shipped)'}")
        return p
    eff = min(block, gen_length)
    same = [e for e in catalog() if e["base_model"] == model_id]
    if not same:
        have = "; ".join(f"{e['path']} ({e['base_model']}, block {e['block']})" for e in catalog())
        raise DLLMError(f"no shipped policy for model {model_id!r}; valid: policy=<folder from "
                        f"`python -m train.grpo`>, or a model with a shipped policy: {have or '(none)'}")
    best = min(same, key=lambda e: (min(e["block"], e["gen_length"]) != eff,
                                    abs(min(e["block"], e["gen_length"]) - eff)))
    return HERE / best["path"]
