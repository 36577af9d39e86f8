"""Import a policy trained with the paper's own code (apple/ml-rl-dllm) as a policy folder.

    python -m policies.import_paper --yaml EXPERIMENT.yaml --weights model.safetensors --out DIR
    python -m policies.import_paper ... --dllm-config LLaDA-8B-Instruct/config.json   # policy_type dit_hidden
    lm_eval --model dllm --model_args pretrained=...,sampler=learned,policy=DIR ...
    python -m train.grpo ... --arch dit_confidence --init-from DIR     # keep training it here

The paper's checkpoint is the `state_dict` of its `PolicyHFWrapper` (keys `base_policy.…`) saved
with safetensors; the architecture is not in that file but in the experiment YAML that trained it
(`policy_type`, `policy_hidden_dim`, …). DIR gets policy.json (the config, and a card naming the
origin, the files and the YAML's settings, recommending the paper's sampling at policy temperature 1)
and policy.safetensors. A YAML key of the policy that is not the paper's, a value we cannot run, or
a weight whose name or shape does not match the YAML's architecture is a one-line error.

A `dit_hidden` policy (DiTHiddenStatePolicy) adds one LLaDA block shaped like the dLLM it was trained
on; the paper builds it from that model's config, which is not in the YAML either: `--dllm-config`
names the model's config.json (or its folder), else the YAML's `model_path` when it is a local folder.

This command imports lm_eval_dllm (the rest of `policies` does not): nothing of ours imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml
from safetensors.torch import load_file

from lm_eval_dllm.policy import PolicyConfig, build_policy
from lm_eval_dllm.policy_dit import dllm_arch_of_config
from lm_eval_dllm.utils import DLLMError, check_safetensors

ORIGIN = "apple/ml-rl-dllm"
# the paper's Config fields that shape the policy or its sampling, with the paper's defaults
# (common/config.py); None: read from the weights (hidden) or derived (feed-forward: 4 x hidden)
POLICY_KEYS = {"policy_type": "dit_confidence", "policy_num_heads": 2, "policy_hidden_dim": None,
               "policy_feedforward_dim": None, "policy_dropout": 0.0, "policy_time_embed_dim": 256,
               "policy_time_period": 1.0, "policy_num_blocks": 1, "policy_smart_init": None,
               "policy_full_context": True, "confidences_top_p": 1, "sampling_mode": "bernoulli",
               "dpls_stop_logit": 0.0}
SAMPLING = {"bernoulli": "bernoulli", "bernoulli-argmax": "bernoulli", "dpls": "pl"}  # -> PolicyConfig.sampling
RUNNABLE = {"policy_type": ("dit_confidence", "dit_hidden"), "sampling_mode": tuple(SAMPLING)}


def read_yaml(path: Path) -> dict:
    """The experiment YAML's settings; policy keys checked against the paper's."""
    try:
        exp = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DLLMError(f"--yaml {str(path)!r} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                        f"valid: an experiment YAML of the paper's code") from None
    if not isinstance(exp, dict):
        raise DLLMError(f"--yaml {str(path)!r} is not a mapping of settings; valid: an experiment YAML of the paper's code")
    for k, v in exp.items():
        if k.startswith("policy_") and k not in POLICY_KEYS:
            raise DLLMError(f"--yaml {path.name}: unknown policy key {k!r}; valid: "
                            f"{', '.join(k for k in POLICY_KEYS if k.startswith('policy_'))}")
        if k in RUNNABLE and v not in RUNNABLE[k]:
            raise DLLMError(f"--yaml {path.name}: {k}={v!r}; valid: {', '.join(RUNNABLE[k])}")
    return exp


def dllm_config(exp: dict, given: str | Path | None) -> dict:
    """The dLLM's block settings (a dit_hidden policy's dllm_arch) from its config.json: `given` (the file
    or its folder), else the YAML's model_path when that is a local folder."""
    path = Path(given) if given else Path(str(exp.get("model_path", "")))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        where = f"--dllm-config {str(given)!r} is not a file" if given else \
            f"the YAML's model_path {str(exp.get('model_path', ''))!r} is not a local folder"
        raise DLLMError(f"policy_type dit_hidden is shaped by its dLLM's config, and {where}; valid: "
                        f"--dllm-config the dLLM's config.json (or its checkpoint folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DLLMError(f"--dllm-config {str(path)!r} cannot be read ({type(e).__name__}); valid: a config.json") from None
    if not isinstance(cfg, dict):
        raise DLLMError(f"--dllm-config {str(path)!r} is not a mapping; valid: a model's config.json")
    return dllm_arch_of_config(cfg)


def policy_config(exp: dict, weights: dict, dllm_arch: dict | None = None) -> PolicyConfig:
    """Our config of the YAML's policy; the width, when the YAML leaves it to the dLLM's, from the
    weights; a dit_hidden policy's block from `dllm_arch` (its width, heads and feed-forward are the dLLM's)."""
    s = {k: exp.get(k, d) for k, d in POLICY_KEYS.items()}
    proj = weights.get("base_policy.confidence_proj.weight")
    hidden = s["policy_hidden_dim"] or (proj.shape[0] if proj is not None else 0)
    if dllm_arch:  # dit_hidden: the paper's policy_hidden_dim, _feedforward_dim, _num_heads do not apply
        hidden, s["policy_feedforward_dim"], s["policy_num_heads"] = (dllm_arch[k] for k in ("d_model", "d_ff", "n_heads"))
    try:
        return PolicyConfig(arch=s["policy_type"], hidden=int(hidden), ff=int(s["policy_feedforward_dim"] or 4 * hidden),
                            heads=int(s["policy_num_heads"]), layers=int(s["policy_num_blocks"]),
                            dllm_arch=dllm_arch or {},
                            top_p=int(s["confidences_top_p"]), full_context=bool(s["policy_full_context"]),
                            time_embed_dim=int(s["policy_time_embed_dim"]), time_period=float(s["policy_time_period"]),
                            smart_init=s["policy_smart_init"], dropout=float(s["policy_dropout"]),
                            sampling=SAMPLING[s["sampling_mode"]], stop_logit=float(s["dpls_stop_logit"]),
                            base_model=str(exp.get("model_path", "")), task=str(exp.get("dataset", "")),
                            block=int(exp.get("block_length", 0)), gen_length=int(exp.get("max_completion_length", 0)))
    except (TypeError, ValueError) as e:
        raise DLLMError(f"--yaml: a policy setting is not a number ({e}); valid: the paper's types "
                        f"(common/config.py)") from None


def check_weights(weights: dict, want: dict) -> None:
    """Every name the architecture has, with its shape, and no other."""
    for name, t in want.items():
        if name not in weights:
            raise DLLMError(f"--weights lacks {name!r}, which the YAML's architecture has; valid: the "
                            f"PolicyHFWrapper state_dict of the run this YAML configured")
        if tuple(weights[name].shape) != tuple(t.shape):
            raise DLLMError(f"--weights {name!r} has shape {tuple(weights[name].shape)}, the YAML's architecture "
                            f"{tuple(t.shape)}; valid: the weights of the run this YAML configured")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise DLLMError(f"--weights has {extra[0]!r}, which the YAML's architecture lacks; valid: names "
                        f"{', '.join(sorted(want)[:3])}, …")


def import_paper(yaml_path: str | Path, weights_path: str | Path, out: str | Path,
                 dllm_config_path: str | Path | None = None) -> Path:
    """Write the policy folder `out` from the paper's YAML and safetensors (and, for dit_hidden, the
    dLLM's config.json); returns it."""
    yaml_path, weights_path, out = Path(yaml_path), Path(weights_path), Path(out)
    exp = read_yaml(yaml_path)
    hidden = exp.get("policy_type", POLICY_KEYS["policy_type"]) == "dit_hidden"
    dllm_arch = dllm_config(exp, dllm_config_path) if hidden else None
    check_safetensors(weights_path, remedy="the model.safetensors of a run of the paper's code")
    weights = load_file(str(weights_path))
    cfg = policy_config(exp, weights, dllm_arch)
    pol = build_policy(cfg)
    check_weights(weights, pol.state_dict())
    pol.load_state_dict(weights)
    mode = exp.get("sampling_mode", POLICY_KEYS["sampling_mode"])
    card = {"origin": ORIGIN, "yaml": str(yaml_path), "weights": str(weights_path),
            **({"dllm_config": str(dllm_config_path or exp.get("model_path"))} if hidden else {}),
            "experiment": json.loads(json.dumps(exp, default=str)),
            "recommended": {"mode": mode, "temperature": 1.0}}  # the paper samples at temperature_policy 1
    pol.save(out, card)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yaml", required=True, help="the experiment YAML that trained the policy")
    p.add_argument("--weights", required=True, help="its checkpoint's model.safetensors (PolicyHFWrapper)")
    p.add_argument("--out", required=True, help="the policy folder to write")
    p.add_argument("--dllm-config", default=None,
                   help="policy_type dit_hidden: the dLLM's config.json (or checkpoint folder) its block is shaped by")
    a = p.parse_args(argv)
    try:
        out = import_paper(a.yaml, a.weights, a.out, a.dllm_config)
    except DLLMError as e:
        raise SystemExit(f"policies.import_paper: error: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("policies.import_paper").info("wrote %s: use it as policy=%s in --model_args", out, out)


if __name__ == "__main__":
    main()
