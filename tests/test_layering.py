"""Package boundaries, read from the import statements themselves (top-level and nested).

    python -m pytest tests/test_layering.py -q

lm_eval_dllm is the library: it imports nothing from the tools built on it (train, results,
benchmarks). policies is shipped data and its catalog reader: it imports nothing of ours, so no
cycle runs through it. Samplers do no I/O: they import neither the catalog nor torch's loaders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OURS = {"lm_eval_dllm", "train", "results", "benchmarks", "policies"}


def _imports(pkg: str) -> dict[str, set[str]]:
    """file -> the top-level packages of ours it imports (relative imports resolve to its own)."""
    out = {}
    for f in sorted((ROOT / pkg).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found.add(pkg if node.level else (node.module or "").split(".")[0])
        out[str(f.relative_to(ROOT))] = found & OURS
    return out


ALLOWED = {
    "lm_eval_dllm": {"lm_eval_dllm", "policies"},
    "policies": {"policies"},
    "train": {"train", "lm_eval_dllm"},
    "results": {"results", "lm_eval_dllm", "policies", "train"},  # train: the command to make a policy
    "benchmarks": {"benchmarks", "lm_eval_dllm", "policies", "results"},
}


# commands inside a package that may reach further than it: nothing of ours imports them, so no cycle
COMMANDS = {"policies/import_paper.py": {"lm_eval_dllm"}, "policies/gate.py": {"lm_eval_dllm"},
            "benchmarks/dependency_start.py": {"train"}}  # train.grpo.start_from: the start it measures


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_each_package_imports_only_what_it_may(pkg):
    bad = {f: sorted(used - ALLOWED[pkg] - COMMANDS.get(f, set())) for f, used in _imports(pkg).items()
           if used - ALLOWED[pkg] - COMMANDS.get(f, set())}
    assert not bad, f"{pkg} reaches into {bad}"


def test_samplers_do_no_io():
    for f in sorted((ROOT / "lm_eval_dllm" / "samplers").glob("*.py")):
        text = f.read_text()
        for needle in ("policies", "UnmaskPolicy.load", "open(", "safetensors", "torch.load"):
            assert needle not in text, f"{f.name} mentions {needle!r}"


def test_every_per_row_draw_uses_the_generators_device(monkeypatch, tiny_loaded):
    """Each random draw of a row is made on its generator's device (a CUDA generator cannot draw
    on the CPU): checked by recording every torch.rand call the decode loop and samplers make."""
    from lm_eval_dllm.decode import diffuse, model_forward
    from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
    from lm_eval_dllm.samplers import make_sampler
    from lm_eval_dllm.samplers.learned import LearnedSampler

    calls = []
    real = torch.rand

    def rand(*args, generator=None, device=None, **kw):
        calls.append((generator is not None, generator is not None and device == generator.device))
        return real(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "rand", rand)
    model, _, spec = tiny_loaded
    samplers = [make_sampler("random", {"k": 2}),
                LearnedSampler.from_policy(UnmaskPolicy(PolicyConfig(block=8, gen_length=16)))]
    for sampler in samplers:
        diffuse(model_forward(model, spec), [[5, 6, 7], [8]], spec, sampler, 16, 8, temperature=0.7)
    assert len(calls) > 10 and all(g and same for g, same in calls), calls[:5]


def test_only_the_lm_eval_hook_side_imports_the_adapter():
    """lm_eval_dllm.model is the lm-eval adapter; constants live with what they name (BUNDLED_ID
    beside the bundled model), so the trainer and the results tools import it for nothing."""
    users = {f for pkg in sorted(ALLOWED) for f in _imports(pkg)
             if "lm_eval_dllm.model import" in (ROOT / f).read_text()
             or "from .model import" in (ROOT / f).read_text()}
    # model_dgemma.py is the adapter's DiffusionGemma subclass, so it imports what it extends
    assert users <= {"lm_eval_dllm/report.py", "lm_eval_dllm/model_dgemma.py"}, sorted(users)
