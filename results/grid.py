"""The sweep: settings (sampler, its parameters, block size) run through `lm_eval.simple_evaluate`.

Every run's raw lm-eval results JSON is kept under `<out>/runs/<model>/<task>/<key>.json`, keyed by
its settings; a rerun skips runs whose file exists, so an interrupted sweep resumes where it stopped.
Under `accelerate launch` every process runs each run's share of documents and the main one writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import lm_eval
import torch
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from lm_eval_dllm.policy import find_policy
from lm_eval_dllm.samplers.learned import SETTINGS, from_card
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write_json

import policies

log = logging.getLogger("results")

# parameter sweeps per sampler: what each heuristic trades accuracy for speed with
SWEEPS: dict[str, list[dict]] = {
    "confidence": [{"k": 1}, {"k": 2}, {"k": 4}],
    # k = 2 commits safely with any of the three scores (100 % on the bundled task); k = 4 tells them apart
    "margin": [{"k": 4}],
    "entropy": [{"k": 4}],
    "random": [{"k": 1}, {"k": 4}],
    "threshold": [{"tau": t} for t in (0.5, 0.7, 0.9, 0.95, 0.99)],
    "factor": [{"f": f} for f in (0.5, 1.0, 2.0)],
    "eb": [{"gamma": g} for g in (0.1, 1.0)],
    # the shipped policy for the model and block (or --policy): first with nothing but the policy, as
    # a user types it (its card's recommended mode/temperature/cutoff, else the paper's defaults), then
    # greedy: commit where p > cutoff, every 0.05 from 0.05 to 0.95 plus 0.01 (as aggressive as the
    # threshold rule's low taus) and 0.98 (more cautious than its 0.99): a policy's accuracy climbs
    # steeply with NFE, so its sweep is dense
    "learned": [{}] + [{"mode": "greedy", "cutoff": c}
                       for c in (0.01, *(round(0.05 * i, 2) for i in range(1, 20)), 0.98)],
}
# an alpha-conditioned policy (train.grpo --alpha-range) sweeps its alpha instead of the cutoff: every
# half-octave from 1/16 to 2048 inside its trained range, and the alphas its card's map chose between them
# (`python -m results alpha-map` starts from the same and refines: `results.alpha_map.refine`)
ALPHAS = tuple(round(2 ** (k / 2), 4) for k in range(-8, 23))


def alphas_for(alpha_range) -> list[float]:
    """ALPHAS inside [lo, hi]."""
    lo, hi = alpha_range
    return [a for a in ALPHAS if lo - 1e-9 <= a <= hi + 1e-9]


def swept_alphas(card: dict) -> list[float]:
    """The alphas a results sweep runs for an alpha-conditioned policy: ALPHAS inside its range, plus every
    alpha its card's map and operating points name (so the test split runs each alpha chosen on validation)."""
    named = [m["alpha"] for m in (card.get("alpha_map") or {}).values()]
    named += [p["alpha"] for p in (card.get("operating_points") or {}).values()]
    return sorted(set(alphas_for(card["alpha_range"])) | set(named))


# one-token-per-step runs cost L forwards per sample (most of the grid's time): they mark the ceiling
# at the smallest block and at full diffusion only
ENDS_ONLY = {("confidence", (("k", 1),)), ("random", (("k", 1),))}
# the grid's default dtype: faster than float32 on CPUs with bf16 instructions, with accuracies close
# to float32's on the bundled model (`python -m benchmarks.dtype` measures both); LLaDA and Dream are bf16
DEFAULT_DTYPE = "bfloat16"
# the testbed table (results/README.md, copied into the README): sampler choice visibly matters
TESTBED = [("confidence", {"k": 1}), ("random", {"k": 1}), ("confidence", {"k": 4})] + [
    ("threshold", {"tau": t}) for t in (0.5, 0.7, 0.9, 0.95)]


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    blocks: tuple[int, ...]
    gen_length: int | None = None  # None: each task's max_gen_toks
    fewshot: tuple[tuple[str, int], ...] = ()  # (task, shots); a task not named keeps its own count
    require_policy: bool = False  # `learned` without a policy is an error (with the command to train one)


PRESETS = {
    "default": Preset(tasks=("modchain",), blocks=(8, 16, 48)),
    "testbed": Preset(tasks=("modchain",), blocks=(8, 16, 48)),
    # the seed paper's grid: L = 256, semi-autoregressive block 32 and full diffusion (256).
    # Few-shot counts as Fast-dLLM evaluates LLaDA (GSM8K 5, MATH 4, HumanEval 0); MBPP runs
    # 0-shot because mbpp_dllm's data (the hub's test split) carries no few-shot split
    "paper": Preset(tasks=("gsm8k", "minerva_math500_dllm", "humaneval_dllm", "mbpp_dllm"), blocks=(32, 256),
                    gen_length=256, fewshot=(("gsm8k", 5), ("minerva_math500_dllm", 4), ("humaneval_dllm", 0),
                                             ("mbpp_dllm", 0)), require_policy=True),
}


@dataclass(frozen=True)
class Setting:
    sampler: str
    params: tuple  # sorted (key, value) pairs
    block: int
    policy: str = ""  # learned only: the policy folder ("" = shipped) ...
    policy_tag: str = ""  # ... and a fingerprint of the policy weights, part of the run's key

    @staticmethod
    def make(sampler: str, params: dict, block: int, policy: str = "", policy_tag: str = "") -> "Setting":
        if sampler != "learned":
            policy = policy_tag = ""
        return Setting(sampler, tuple(sorted(params.items())), block, policy, policy_tag)

    @property
    def key(self) -> str:
        p = "-".join(f"{k}{v}" for k, v in self.params)
        tag = f"-pol{self.policy_tag}" if self.policy_tag else ""
        return f"{self.sampler}{'-' + p if p else ''}{tag}-B{self.block}"

    @property
    def label(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.sampler}({p})" if p else self.sampler

    def model_args(self, pretrained: str | None, batch_size: int, seed: int, dtype: str = "auto",
                   gen_length: int | None = None, cache: str = "none") -> str:
        args = {"sampler": self.sampler, "block": self.block, "batch_size": batch_size, "seed": seed}
        if cache != "none":
            args["cache"] = cache
        if gen_length:
            args["gen_length"] = gen_length
        if dtype != "auto":
            args["dtype"] = dtype
        if pretrained:
            args["pretrained"] = pretrained
        if self.policy:
            args["policy"] = self.policy
        args.update(dict(self.params))
        return ",".join(f"{k}={v}" for k, v in args.items())


@dataclass
class Grid:
    tasks: list[str]
    blocks: list[int]
    samplers: list[str]
    pretrained: str | None = None
    limit: int | None = None
    batch_size: int = 32
    seed: int = 1234
    out: Path = Path("results")
    only: list[tuple[str, dict]] | None = None  # explicit (sampler, params) list instead of SWEEPS
    policy: str = ""  # policy folder for `learned` ("" = the shipped one for the model and block)
    dtype: str = DEFAULT_DTYPE
    extra: dict = field(default_factory=dict)
    gen_length: int | None = None  # None: each task's max_gen_toks
    fewshot: dict = field(default_factory=dict)  # task -> shots; a task not named keeps its own count
    require_policy: bool = False  # `learned` without a policy: an error, not a skipped sampler
    cache: str = "none"  # the KV-cache mode of every run (lm_eval_dllm.cache); not none: runs in their own folder

    def settings(self) -> list[Setting]:
        pairs = self.only if self.only is not None else [
            (s, p) for s in self.samplers for p in SWEEPS.get(s, [{}])]
        samplers = list(self.samplers)
        if "learned" in samplers and not self.has_policy():
            msg = (f"no shipped policy for {self.pretrained or 'the bundled model'}; valid: --policy "
                   f"<folder>, the OUT/best of " + " or ".join(f"`{c}`" for c in self.train_commands())
                   + ", or --samplers without learned")
            if self.require_policy:
                raise DLLMError(msg)
            log.warning("results: skipping sampler 'learned': %s", msg)
            samplers.remove("learned")
        ends = (min(self.blocks), max(self.blocks)) if self.blocks else ()
        return [Setting.make(s, q, b, self.policy, self.policy_tag(q, b) if s == "learned" else "")
                for b in self.blocks for s, p in pairs
                if s in samplers and (b in ends or (s, tuple(sorted(p.items()))) not in ENDS_ONLY)
                for q in self._variants(s, p, b)]

    def _variants(self, sampler: str, params: dict, block: int) -> list[dict]:
        """`learned` with the shipped policies: the sweep once per policy shipped for this block
        (e.g. trained at several alphas); the default pick keeps params without a `policy` key."""
        if sampler == "learned" and "policy" in params:
            names = [e["path"] for e in policies.catalog()]
            if self.policy or params["policy"] not in names:
                raise DLLMError(f"learned setting policy={params['policy']!r}" + (f" with --policy {self.policy!r}"
                                if self.policy else "") + f"; valid: one of them, and in a setting only a "
                                f"shipped policy's name: {', '.join(names) or '(none shipped)'}")
            return [params]
        if sampler != "learned":
            return [params]
        names = [""] + ([] if self.policy else policies.variants_for(self.pretrained or BUNDLED_ID, block)[1:])
        out = []
        for q in (params | ({"policy": n} if n else {}) for n in names):
            card = policy_card(self.policy_dir(q, block))
            if card.get("alpha_range") is None or (params and self.only is not None):  # one alpha, or spelled out
                out.append(q)
            elif not params:  # an alpha-conditioned policy: as typed, then its alpha sweep ...
                out += [q] + [q | {"alpha": a} for a in swept_alphas(card)]
            # ... instead of SWEEPS' cutoffs
        return out

    def policy_dir(self, params: dict, block: int) -> Path:
        """The policy folder a `learned` run with these params at this block uses: --policy, the
        shipped policy its params name, or the shipped default pick for the model and block."""

        model = self.pretrained or BUNDLED_ID
        if self.policy:  # found as `sampler=learned,policy=...` finds it
            d = find_policy(self.policy, model_id="", block=0, gen_length=0)
            if not (d / "policy.json").exists():
                raise DLLMError(f"--policy {self.policy!r} has no policy.json; valid: a folder written "
                                f"by `python -m train.grpo` (OUT/best or OUT/last)")
            return d
        if "policy" in params:
            return policies.HERE / params["policy"]
        names = policies.variants_for(model, block)
        return policies.HERE / names[0] if names else find_policy("", model_id=model, block=block, gen_length=block)

    def policy_tag(self, params: dict, block: int) -> str:
        """A fingerprint of the one policy a `learned` run uses, part of its key: retraining that
        policy never reuses its old runs, and adding or retraining another policy keeps them. The
        settings the run takes from the policy's card (those its params leave unset) follow it, so
        a new recommendation on the card makes a new run."""
        d = self.policy_dir(params, block)
        # params are model_args: the policy's temperature is `policy_temperature` there
        given = {k: params.get("policy_temperature" if k == "temperature" else k) for k in SETTINGS}
        used = from_card(given, policy_card(d))
        return policy_fingerprint(d) + ("-card" + "".join(f"-{k}{v}" for k, v in used.items()) if used else "")

    def is_current(self, path: Path) -> bool:
        """Whether a run file on disk is of the policy its setting would use now (non-learned: always)."""

        if "-pol" not in path.stem:
            return True
        try:
            s = json.loads(path.read_text())["dllm_setting"]
            return f"-pol{self.policy_tag(s['params'], s['block'])}-" in path.stem
        except (OSError, ValueError, KeyError, TypeError, DLLMError):
            return False  # unreadable, or its policy is no longer shipped

    def train_commands(self) -> list[str]:
        """The `python -m train.grpo` command that trains a policy for this grid's model, per block
        (on its first task, at its generation length)."""
        from train.grpo import GRPOConfig, command_line  # imported here: results needs train only for this

        return [command_line(GRPOConfig(task=self.tasks[0], pretrained=self.pretrained or "", block=b,
                                        gen_length=self.gen_length,
                                        out=f"runs/grpo-{self.model_tag}-{self.tasks[0]}-B{b}"))
                for b in self.blocks]

    def has_policy(self) -> bool:

        return bool(self.policy) or bool(policies.shipped_for(self.pretrained or BUNDLED_ID))

    @property
    def model_tag(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "__", self.pretrained or "bundled")

    @property
    def report_dir(self) -> Path:
        """Where the report's tables and figures go: a cached grid's beside, not over, the uncached one's."""
        d = self.out / self.model_tag
        return d if self.cache == "none" else d / f"cache-{self.cache}"

    def run_dir(self, task: str) -> Path:
        lim = f"-limit{self.limit}" if self.limit else ""
        dt = f"-{self.dtype}" if self.dtype != "auto" else ""
        dt += f"-cache{self.cache}" if self.cache != "none" else ""
        gl = f"-L{self.gen_length}" if self.gen_length else ""
        shots = f"-{self.fewshot[task]}shot" if task in self.fewshot else ""
        return self.out / "runs" / self.model_tag / self.fingerprint / f"{task}{gl}{shots}{lim}{dt}-seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """Which weights: runs of a retrained checkpoint never mix with (or skip because of) old ones."""
        d = Path(self.pretrained) if self.pretrained else BUNDLED_DIR
        if not d.is_dir():
            return "hub"  # a hub id: its revision is the user's to pin
        h = hashlib.sha256()
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("config.json")):
            h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()[:10]

    def path(self, task: str, s: Setting) -> Path:
        return self.run_dir(task) / f"{s.key}.json"


def policy_fingerprint(d: Path) -> str:
    """Weights and config of a policy folder, not its card (its notes may change, the policy does not)."""
    h = hashlib.sha256()
    h.update((d / "policy.safetensors").read_bytes())
    h.update(json.dumps(json.loads((d / "policy.json").read_text())["config"], sort_keys=True).encode())
    return h.hexdigest()[:8]


def policy_card(d: Path) -> dict:
    try:
        return json.loads((d / "policy.json").read_text()).get("card") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # no readable card: the run fails on it with the sampler's own error


def run_file_ok(path: Path) -> bool:
    """Whether a finished run is on disk; a file a kill or a full disk left unreadable is not one."""
    if not path.exists():
        return False
    try:
        json.loads(path.read_text())["dllm_setting"]["task"]
        return True
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("run file %s is corrupt: running it again", path)
        return False


def main_process() -> bool:
    """False in the processes other than the first of a launch (accelerate launch, torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_grid(grid: Grid) -> list[Path]:
    """Run every missing (task, setting); returns the paths of all runs of the grid."""
    todo = [(t, s) for t in grid.tasks for s in grid.settings()]
    missing = [(t, s) for t, s in todo if not run_file_ok(grid.path(t, s))]
    log.info("grid: %d runs, %d already on disk, %d to run", len(todo), len(todo) - len(missing),
             len(missing))
    tm = TaskManager() if missing else None
    # every process decided `missing` before the first run (whose collectives wait for all of
    # them), so all take the same runs in the same order; lm-eval returns results on rank 0 only
    bar = tqdm(missing, desc="results grid", dynamic_ncols=True, disable=not main_process())
    for task, s in bar:
        bar.set_postfix_str(f"{task} {s.key}")
        t0 = time.time()
        res = lm_eval.simple_evaluate(
            model="dllm", model_args=s.model_args(grid.pretrained, grid.batch_size, grid.seed, grid.dtype,
                                                  grid.gen_length, grid.cache),
            tasks=[task], num_fewshot=grid.fewshot.get(task), limit=grid.limit, task_manager=tm,
            device=grid.extra.get("device"),
            random_seed=grid.seed, numpy_random_seed=grid.seed, torch_random_seed=grid.seed,
            fewshot_random_seed=grid.seed, log_samples=False)
        if res is None:  # not the main process: its share is in rank 0's results
            continue
        res.pop("samples", None)
        res["dllm_setting"] = {"sampler": s.sampler, "params": dict(s.params), "block": s.block,
                               "task": task, "limit": grid.limit, "seed": grid.seed, "dtype": grid.dtype,
                               "pretrained": grid.pretrained or "bundled", "cache": grid.cache,
                               "run_seconds": round(time.time() - t0, 2)}
        if task in grid.fewshot:
            res["dllm_setting"]["num_fewshot"] = grid.fewshot[task]
        if grid.gen_length:
            res["dllm_setting"]["gen_length"] = grid.gen_length
        atomic_write_json(grid.path(task, s), json.loads(json.dumps(res, default=str)))
    if missing and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the files are written before any process looks for the next grid's
    return [grid.path(t, s) for t, s in todo]


def report_paths(grid: Grid) -> list[Path]:
    """The finished runs on disk for the grid's model and tasks, any sampler and block size.

    Learned runs of other policy weights (an older training, another --policy) are left out."""
    paths = sorted({q for t in grid.tasks for q in grid.run_dir(t).glob("*.json")})
    return [q for q in paths if grid.is_current(q)]
