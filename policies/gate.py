"""Give a policy the block gate (`PolicyConfig.gate_hi`) without retraining it.

    python -m policies.gate --policy modchain-B48-alphas --gate-hi 0.95 --out runs/gated-B48

The weights are the policy's, unchanged; its config gains gate_hi, and its card keeps the training
record (command, steps, train_minutes, metrics) and says where the gate came from (`gate`). What was
chosen for the policy without the gate is dropped from the card: `alpha_map`, `alpha_map_summary`,
`operating_points` and `recommended` (`python -m results alpha-map --policy OUT` chooses them again).

The gate: where the policy would commit every eligible position, the block ends with this step as
it decides; else it commits only where also conf >= gate_hi, since the block takes another forward
anyway and what it holds back then costs none (`benchmarks.fast_end` measures the rule alone).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from lm_eval_dllm.policy import UnmaskPolicy, find_policy
from lm_eval_dllm.utils import DLLMError

CHOSEN = ("alpha_map", "alpha_map_summary", "alpha_map_command", "operating_points", "recommended")


def add_gate(policy: str, gate_hi: float, out: str | Path) -> Path:
    """Write `policy` with the block gate at `gate_hi` to the folder `out` (new, or absent)."""
    src = find_policy(policy, model_id="", block=0, gen_length=0)
    pol = UnmaskPolicy.load(src)
    if pol.cfg.arch != "features":
        raise DLLMError(f"policy {str(src)!r} has arch {pol.cfg.arch}; valid: a policy of arch features")
    if pol.cfg.gate_hi:
        raise DLLMError(f"policy {str(src)!r} already has the gate (gate_hi {pol.cfg.gate_hi:g}); valid: one without")
    pol.cfg = replace(pol.cfg, gate_hi=gate_hi)  # checks gate_hi, and that the policy reads conf and eligible
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DLLMError(f"--out {str(out)!r} is not empty; valid: a new folder")
    card = {k: v for k, v in pol.card.items() if k not in CHOSEN}
    card["gate"] = {"gate_hi": gate_hi, "from": src.name,
                    "command": f"python -m policies.gate --policy {src.name} --gate-hi {gate_hi:g} --out {out}",
                    "retrained": False}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pol.save(tmp, card)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a shipped policy's name or a policy folder")
    p.add_argument("--gate-hi", type=float, required=True, help="the gate's confidence bar, in (0, 1]")
    p.add_argument("--out", required=True, help="the policy folder to write (new)")
    a = p.parse_args(argv)
    try:
        if not 0 < a.gate_hi <= 1:
            raise DLLMError(f"--gate-hi {a.gate_hi}; valid: a number in (0, 1]")
        out = add_gate(a.policy, a.gate_hi, a.out)
    except DLLMError as e:
        raise SystemExit(f"policies.gate: error: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("policies.gate").info("wrote %s: use it as policy=%s in --model_args", out, out)


if __name__ == "__main__":
    main()
