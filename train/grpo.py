"""Learn an unmasking policy by RL (GRPO), with the dLLM frozen as the environment.

    python -m train.grpo --task modchain --block 48 --alpha 1.0 --out runs/grpo-modchain-B48
    python -m train.grpo ... --resume                      # continue a killed run
    accelerate launch --multi_gpu --num_processes 2 -m train.grpo ...  # data parallel over prompts

Each step: sample prompts from the task's training split (its own prompt format), roll out a group
of completions per prompt through the same decode loop as evaluation with the policy sampling its
actions, score each with the task's own filters + metric times the NFE discount, take group-relative
advantages, and make --inner-steps clipped policy-gradient updates by replaying the stored per-step
features through the policy (the dLLM is not re-run). Validation on the task's validation split;
the best policy by validation reward is kept in OUT/best, the latest in OUT/last.

Under `accelerate launch` each process rolls out --prompts-per-step prompts of one shared draw
(with the seeds one process would give them), the loss is normalised over all processes' rollouts
and gradients are averaged, so the update is the one a single process makes on the whole batch;
validation is split over processes, and only the main process writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from lm_eval_dllm.cache import CACHE_MODES, check_cache
from lm_eval_dllm.decode import check_block
from lm_eval_dllm.generate import Generator, chat_prompt
from lm_eval_dllm.generate_dgemma import DiffusionGemmaGenerator
from lm_eval_dllm.loading import load, resolve_dtype
from lm_eval_dllm.models.diffusion_gemma import MODEL_TYPE as DIFFUSION_GEMMA
from lm_eval_dllm.policy import (ALL_FEATURES, ARCHS, DIT_ARCHS, SAMPLINGS, Policy, PolicyConfig, UnmaskPolicy,
                                 action_logprob, build_policy, find_policy, network_diff)
from lm_eval_dllm.policy_dit import dllm_arch_of
from lm_eval_dllm.reward import TaskScorer, log_reward, reward
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.samplers.threshold import ThresholdSampler
from lm_eval_dllm.text import stop_strings
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write

from . import crash
from .grpo_loss import (clipped_pg_loss, expert_mixture, group_advantages, loss_count, mixed_advantages,
                        relative_advantages)
from .run_files import check_writable, keep_log_until, remove_partial_saves

log = logging.getLogger("train.grpo")


def opt(default, help: str):
    """A GRPOConfig field with its --help text (argparse reads it from the field's metadata)."""
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOConfig:
    task: str = opt("modchain", 'lm-eval task: its training split, prompt format, filters and metric')
    include_path: str = opt("", "extra folder of task YAMLs, as lm_eval's --include_path")
    pretrained: str = opt("", "a dLLM checkpoint or hub id; unset: the bundled tiny dLLM")
    block: int | None = opt(None, "unset: the model's default block; >= gen_length: full diffusion")
    gen_length: int | None = opt(None, "unset: the task's max_gen_toks, else the model's default")
    max_length: int | None = opt(None, "prompt + gen_length limit; unset: the model's context")
    truncation: str = opt("left", 'too-long prompts: left (keep the last tokens) | error')
    alpha: float = opt(1.0, 'NFE discount exponent; 0 = reward accuracy only')
    alpha_range: str = opt("", "LO,HI: one alpha-conditioned policy for the whole accuracy-speed curve: each prompt's group draws its alpha log-uniformly from [LO, HI] (the reward's and the policy's input); --alpha is then unused")
    alpha_shift: float = opt(0.15, "--alpha-range: at the start, how far alpha moves the commit threshold: the logits gain skip-gain x alpha-shift x log2(alpha) / 4 (0: alpha starts with no effect)")
    group: int = opt(8, 'rollouts per prompt')
    sampling: str = opt("bernoulli", "how the policy samples a step's commits: bernoulli (a coin per position) | pl (Plackett-Luce until STOP, the paper's dpls)")
    stop_logit: float = opt(0.0, "--sampling pl: the STOP item's utility (higher: fewer commits per step)")
    paper_mode: bool = opt(False, "--sampling bernoulli: roll out with the paper's plain Bernoulli (mode=bernoulli: a step may commit nothing, a block gets block-size steps) instead of forcing the top pick")
    expert_tau: str = opt("", "expert steering: comma-separated thresholds; each prompt's group also gets one rollout of Fast-dLLM's threshold rule per tau, scored in the baseline and in the loss as off-policy draws of the mixture (the paper's es_thresholds)")
    prompts_per_step: int = opt(8, 'prompts per step, per process (each rolled out --group times)')
    steps: int = opt(200, 'rollout batches (each followed by --inner-steps updates)')
    lr: float = opt(3e-5, 'AdamW learning rate')
    warmup: int = opt(0, 'linear learning-rate warmup steps')
    clip_eps: float = opt(0.5, 'PPO-style ratio clip')
    loss_norm: str = opt("step", 'step: mean over (rollout, step) terms | rollout: each rollout weighs the same (the paper code\'s)')
    adv_norm: str = opt("mean", "a rollout's advantage: mean (its reward minus its group's mean: the paper's) | relative (that divided by the group's mean reward, in log space: with --alpha-range every alpha's groups weigh the same, where a large alpha's rewards are tiny)")
    inner_steps: int = opt(2, 'optimizer steps per rollout batch (rollouts reused)')
    grad_clip: float = opt(0.2, 'gradient-norm clip')
    weight_decay: float = opt(0.0, 'AdamW weight decay')
    dllm_temperature: float = opt(0.0, "the dLLM's own token choice: 0 = argmax")
    cache: str = opt("none", f"the dLLM's key/value cache in rollouts and validation, as the cache "
                             f"model_arg: {' | '.join(CACHE_MODES)} (train a policy for the cached setting)")
    cache_window: int = opt(0, "with --cache dual: positions after the block recomputed too, as the window model_arg")
    num_fewshot: int = opt(-1, "-1 = the task's own")
    train_split: str = opt("train", 'where training prompts come from')
    val_split: str = opt("validation", 'where validation prompts come from (never trained on)')
    apply_chat_template: bool = opt(False, "format prompts with the tokenizer's chat template")
    val_every: int = opt(20, 'steps between validations (and one at the last step)')
    val_mode: str = opt("greedy", 'policy mode for validation (and so for keeping `best`): greedy | sample')
    val_size: int = opt(128, 'validation problems')
    keep_validated: bool = opt(False, "also keep the policy of each validation in OUT/validated/step-N, and the start as step-0 (to choose among afterwards, e.g. by `python -m results alpha-map`'s expected count)")
    save_every: int = opt(10, 'steps between checkpoints of OUT/last and the trainer state (and at the last step)')
    batch_size: int = opt(64, 'decode batch for rollouts and validation')
    arch: str = opt("features", "policy network: features (ours, --features) | dit_confidence (the paper's DiTConfidencePolicy) | dit_hidden (its DiTHiddenStatePolicy: the dLLM's hidden states through one LLaDA block of the dLLM's shape; --hidden/--ff/--heads do not apply)")
    top_p: int = opt(1, "--arch dit_confidence: the top token probabilities it reads per position")
    full_context: bool = opt(True, "--arch dit_confidence/dit_hidden: it sees the whole generated region (else the current block)")
    features: str = opt(",".join(PolicyConfig.features), f"comma-separated policy input features, of: {', '.join(ALL_FEATURES)}")
    hidden: int = opt(128, 'policy width')
    ff: int = opt(512, 'policy feed-forward width')
    heads: int = opt(2, 'policy attention heads')
    init: str = opt("slow", "slow (the paper's bias -2) | threshold (start as Fast-dLLM's rule at --init-tau)")
    init_tau: float = opt(0.9, "the threshold start's tau")
    init_near_conf: float = opt(0.0, "with feature near_conf: the threshold start commits where conf - tau + this x (near_conf - 1) > 0, holding a token back while what sits just before it is masked and unsure; with --init-from a policy without near_conf, added to it")
    skip_gain: float = opt(0.0, "gain of the policy's linear skip path; 0 = --init's own: its sharpness (20) for threshold, 1 for slow")
    gate_hi: float = opt(0.0, "the block gate (arch features): where the policy would commit every eligible position the block ends; else it commits only where also conf >= this, as the block takes another step anyway (0: no gate)")
    init_from: str = opt("", "start from this policy's weights (a train.grpo OUT/best, or a shipped name), e.g. to retrain at another --alpha")
    seed: int = opt(0, 'policy init, prompt order and rollout sampling')
    dtype: str = opt("auto", "the dLLM's dtype: auto, float32, bfloat16, float16")
    device: str = opt("", "cpu forces the CPU; otherwise accelerate's device (a GPU if there is one)")
    out: str = opt("runs/grpo", 'OUT/best, OUT/last, OUT/log.jsonl, OUT/trainer_state.pt')


CHOICES = {"arch": ARCHS, "val_mode": ("greedy", "sample"), "sampling": SAMPLINGS, "init": ("slow", "threshold"), "loss_norm": ("step", "rollout"), "adv_norm": ("mean", "relative"),
           "truncation": ("left", "error"), "cache": CACHE_MODES}
RESUME_MAY_CHANGE = {"val_every", "save_every", "out", "device", "batch_size", "keep_validated"}


@dataclass
class Rollout:
    """One batch of completions: the per-step records the loss replays (empty unless recorded), and
    per completion its reward, the task's score, its NFE, its text and (alpha-conditioned) its alpha."""
    trajectory: list
    rewards: torch.Tensor  # (n,)
    log_rewards: torch.Tensor  # (n,) float64, their logs (-inf: score 0), exact where a reward underflows
    scores: torch.Tensor  # (n,)
    nfes: torch.Tensor  # (n,) float
    texts: list[str]
    alphas: torch.Tensor | None = None  # (n,) each rollout's alpha, for an alpha-conditioned policy


def alpha_bounds(cfg: GRPOConfig) -> list[float] | None:
    """--alpha-range as [lo, hi], or None (one alpha: --alpha)."""
    if not cfg.alpha_range.strip():
        return None
    try:
        lo, hi = (float(x) for x in cfg.alpha_range.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (0 < lo < hi < float("inf")):
        raise DLLMError(f"--alpha-range {cfg.alpha_range!r}; valid: LO,HI with 0 < LO < HI, e.g. 0.25,64")
    return [lo, hi]


def val_alphas(bounds: list[float], n: int = 5) -> list[float]:
    """The alphas validation runs at: n points evenly spaced in log alpha over the trained range."""
    lo, hi = (math.log(b) for b in bounds)
    return [round(math.exp(lo + (hi - lo) * i / (n - 1)), 4) for i in range(n)]


def draw_alphas(cfg: GRPOConfig, step: int, n_groups: int, rank: int = 0) -> list[float]:
    """One alpha per prompt group of this process at `step`, log-uniform over --alpha-range, seeded by
    the group's global index (a launch's processes draw what one process drawing all would)."""
    lo, hi = (math.log(b) for b in alpha_bounds(cfg))
    return [math.exp(lo + (hi - lo) * random.Random(hash((cfg.seed, step, "alpha", rank * n_groups + g))).random())
            for g in range(n_groups)]


class Env:
    """The frozen dLLM plus the task: prompts in, rewards out, through the shared generate path."""

    def __init__(self, cfg: GRPOConfig, device):
        self.cfg = cfg
        chat = self._chat if cfg.apply_chat_template else None
        tm = None
        if cfg.include_path:
            if not os.path.isdir(cfg.include_path):
                raise DLLMError(f"--include-path {cfg.include_path!r} is not a folder; valid: a folder of task YAMLs")
            tm = TaskManager(include_path=cfg.include_path)
        self.scorer = TaskScorer(cfg.task, num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                                 chat_template=chat, task_manager=tm)
        max_gen_toks = self.scorer.gen_kwargs.get("max_gen_toks")
        task_L = cfg.gen_length if cfg.gen_length is not None else max_gen_toks
        if task_L is not None and cfg.block is not None:
            check_block(cfg.block, int(task_L))  # before the weights load
        self.model, self.tok, self.spec = load(cfg.pretrained or str(BUNDLED_DIR), cfg.dtype, str(device))
        self.model_id = cfg.pretrained or BUNDLED_ID
        make = DiffusionGemmaGenerator if self.spec.family == DIFFUSION_GEMMA else Generator  # issue 31 hook
        self.gen = make(self.model, self.tok, self.spec, model_id=self.model_id, device=device,
                             max_length=cfg.max_length, truncation=cfg.truncation,
                             chat=cfg.apply_chat_template, cache=cfg.cache,
                             window=cfg.cache_window)
        self.L, self.block = self.gen.resolve(cfg.gen_length, cfg.block, max_gen_toks)
        self.until = stop_strings(self.scorer.gen_kwargs, self.tok, self.spec)
        self.device = device

    def _chat(self, msgs, add_generation_prompt=True, **kw) -> str:  # as lm-eval calls a chat template
        return chat_prompt(self.tok, msgs, add_generation_prompt)

    def rollout(self, policy, prompts, seeds, mode="sample", record=True, sampler=None, record_top=0,
                record_hidden=False, alphas=None) -> Rollout:
        """Decode every prompt once (repeat prompts for groups) with the policy in `mode`, or with
        `sampler` (an expert; record_top, record_hidden: the top probabilities, hidden states the policy replays);
        `alphas`: one per prompt, the reward's (and an alpha-conditioned policy's) alpha, else --alpha."""
        # temperature 1: the replayed log-probabilities are those of the distribution sampled here
        sampler = sampler or LearnedSampler.from_policy(policy, mode=mode, temperature=1.0)
        per_row = alphas is not None and policy is not None and policy.alpha_conditioned  # else: the sampler's own
        alphas = [self.cfg.alpha] * len(prompts) if alphas is None else list(alphas)
        texts, nfes, scores, traj_all = [], [], [], []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[i:i + self.cfg.batch_size]
            if per_row:
                sampler.row_alpha = torch.tensor(alphas[i:i + len(chunk)], dtype=torch.float32)
            # exactly the text evaluation would score: stop tokens, then the task's stop strings
            out = self.gen.generate([p.context for p in chunk], sampler, gen_length=self.L,
                                    block=self.block, seeds=seeds[i:i + len(chunk)],
                                    temperature=self.cfg.dllm_temperature, until=self.until,
                                    record=record, record_top=record_top, record_hidden=record_hidden)
            for p, text, st in zip(chunk, out.texts, out.stats):
                texts.append(text)
                nfes.append(st["nfe"])
                scores.append(self.scorer.score(p.doc, text))
            if record:
                for r in out.trajectory:
                    r.rows = r.rows + i  # rows index the whole rollout batch
                traj_all += out.trajectory
        rewards = [reward(s, n, self.L, a) for s, n, a in zip(scores, nfes, alphas)]
        logs = [log_reward(s, n, self.L, a) for s, n, a in zip(scores, nfes, alphas)]
        return Rollout(traj_all, torch.tensor(rewards), torch.tensor(logs, dtype=torch.float64), torch.tensor(scores),
                       torch.tensor(nfes, dtype=torch.float),
                       texts, torch.tensor(alphas, dtype=torch.float32))


def commit_rank(r) -> torch.Tensor:
    """A step's commits in order, (b, L) long (-1 = not committed): the sampler's own order, or for
    an unordered one (an expert) by the dLLM's confidence, most confident first."""
    if r.rank is not None:
        return r.rank
    key = torch.where(r.action, r.conf.float(), torch.full_like(r.conf, -float("inf"), dtype=torch.float))
    order = key.argsort(-1, descending=True)
    pos = torch.arange(key.shape[1]).expand_as(order)
    return torch.full_like(order, -1).scatter(-1, order, torch.where(r.action.gather(-1, order), pos, -1))


def stack_steps(traj, policy: Policy, alphas: torch.Tensor | None = None) -> dict:
    """All (rollout, step) records as one batch: inputs (the policy's forward arguments; for an
    alpha-conditioned policy, each step's rollout's alpha from `alphas`, one per rollout),
    action/eligible/rank (N, L), row (N,)."""
    cat = lambda name: torch.cat([getattr(r, name) for r in traj])  # noqa: E731
    steps = SimpleNamespace(**{n: cat(n) for n in ("conf", "margin", "entropy", "masked", "eligible")})
    if policy.cfg.arch in DIT_ARCHS:
        steps.steps = cat("steps")
        steps.top = cat("top") if policy.top_probs else None
        steps.hidden = cat("hidden") if policy.reads_hidden else None
        steps.block_start = torch.cat([torch.full((len(r.rows),), r.block_start) for r in traj])
        steps.block_size = traj[0].block_size
    rows = cat("rows")
    return {"inputs": policy.full_inputs(steps, None if alphas is None else alphas[rows]), "action": cat("action"),
            "eligible": steps.eligible, "masked": steps.masked, "row": rows,
            "rank": torch.cat([commit_rank(r) for r in traj])}


def step_logprob(pol, policy: Policy, batch: dict, cfg: GRPOConfig, n_policy: int) -> torch.Tensor:
    """(N,) log-probability of each recorded step's commits under `pol` (policy or its DDP wrapper);
    the steps of rollouts n_policy and up are expert steering's, scored as draws of the mixture."""
    experts = len(expert_taus(cfg))
    scored = batch["eligible"]
    if experts and policy.cfg.arch in DIT_ARCHS and policy.cfg.full_context:
        # as the paper's code: an expert's step is scored over every masked position the policy
        # sees, those outside the block as not committed (it "mimics thresholding block-agnostically")
        scored = torch.where((batch["row"] >= n_policy)[:, None], batch["masked"], scored)
    logp = action_logprob(policy.cfg, pol(*batch["inputs"]), batch["action"], batch.get("rank"), scored)
    if experts:
        logp = torch.where(batch["row"] >= n_policy, expert_mixture(logp, cfg.group, experts), logp)
    return logp


def to_device(v, device):
    """A tensor, or a tuple of them (a policy's inputs), on `device`."""
    return tuple(to_device(x, device) for x in v) if isinstance(v, tuple) else v.to(device)


def expert_taus(cfg: GRPOConfig) -> list[float]:
    return [float(t) for t in cfg.expert_tau.split(",") if t.strip()]


def update(ddp_policy, policy, opt, sched, batch: dict, adv: torch.Tensor, cfg: GRPOConfig, acc,
           n_policy: int | None = None) -> list[float]:
    """--inner-steps clipped policy-gradient steps on one rollout batch; returns the losses.
    Rollouts n_policy and up (default: none) are expert steering's."""
    n_policy = len(adv) if n_policy is None else n_policy
    with torch.no_grad():  # the behaviour policy: the one that sampled the actions
        old = step_logprob(policy, policy, batch, cfg, n_policy)
    a = adv[batch["row"]]  # (N,) each step inherits its rollout's advantage
    per_rollout = cfg.loss_norm == "rollout"
    total = None
    if acc.num_processes > 1:
        # DDP averages the processes' gradients: each divides its share's sum by the count over
        # all shares over the process count, so shares of unequal size (rollouts of different
        # lengths) weigh as they do when one process holds the whole batch
        n = torch.tensor([float(loss_count(batch["row"], per_rollout))], device=acc.device)
        total = acc.reduce(n, reduction="sum") / acc.num_processes
    losses = []
    for _ in range(cfg.inner_steps):
        logp = step_logprob(ddp_policy, policy, batch, cfg, n_policy)
        loss = clipped_pg_loss(logp, old, a, cfg.clip_eps, batch["row"] if per_rollout else None, total)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(ddp_policy.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append((loss if total is None else acc.reduce(loss.detach(), reduction="mean")).item())
    return losses


def step_prompts(cfg: GRPOConfig, step: int, n_train: int, rank: int = 0, world: int = 1) -> tuple[list[int], list[int]]:
    """This process's training prompts of a step (indices, each --group times in a row) and their
    rollout seeds: its slice of one draw of world x --prompts-per-step prompts, seeded by global
    rollout index, so the processes roll out together what one process drawing them all would."""
    k = cfg.prompts_per_step
    if k * world > n_train:
        raise DLLMError(f"--prompts-per-step {k} x {world} processes > {n_train} {cfg.train_split} "
                        f"prompts; valid: at most {n_train // world}")
    rng = random.Random(cfg.seed * 1_000_003 + step * 1_009)
    picks = rng.sample(range(n_train), k * world)[rank * k:(rank + 1) * k]
    n = k * cfg.group
    # the 0 stands where the process index once was, so a single process draws as it always has
    seeds = [hash((cfg.seed, step, 0, rank * n + j)) % (2**62) for j in range(n)]
    return [i for i in picks for _ in range(cfg.group)], seeds


def command_line(cfg: GRPOConfig) -> str:
    """A `python -m train.grpo ...` line that reproduces cfg (settings that differ from the defaults)."""
    default, parts = GRPOConfig(), []
    for k, v in asdict(cfg).items():
        if v is None or v == getattr(default, k) and k not in ("task", "block", "alpha", "steps", "seed"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {shlex.quote(str(v))}")
    return "python -m train.grpo " + " ".join(parts)


def init_source(folder: str, run: PolicyConfig) -> Policy:
    """--init-from's policy, or a one-line error unless its network (every setting that shapes the
    weights: policy.NETWORK) is `run`'s. check_config and start_from both ask here."""
    src = UnmaskPolicy.load(find_policy(folder, model_id="", block=0, gen_length=0))
    diff = network_diff(src.cfg, run)
    if run.arch == "features" and set(src.cfg.features) <= set(run.features):
        diff.pop("features", None)  # features added: their input weights start at zero (`widened`)
    if src.alpha_conditioned and run.alpha_range is None:  # the other way round, the alpha input starts fresh
        diff["alpha_range"] = None
    if diff:
        raise DLLMError(f"--init-from {folder!r} has {', '.join(f'{k}={getattr(src.cfg, k)}' for k in diff)}; "
                        f"valid: a policy with this run's {', '.join(f'{k}={v}' for k, v in diff.items())}")
    return src


def start_from(policy: Policy, folder: str) -> None:
    """Load --init-from's weights into `policy`; its network must be the same."""
    src = init_source(folder, policy.cfg)
    for k in ("base_model", "block", "gen_length", "gate_hi"):
        if getattr(src.cfg, k) != getattr(policy.cfg, k):
            log.warning("--init-from %s was trained with %s=%s; this run has %s", folder, k,
                        getattr(src.cfg, k), getattr(policy.cfg, k))
    missing, _ = policy.load_state_dict(widened(src, policy.cfg.features),
                                        strict=not (policy.alpha_conditioned and not src.alpha_conditioned))
    if missing:  # only the alpha input's weights (`init_source` refuses every other difference)
        log.info("policy initialised from %s; its alpha input (%d tensors) starts fresh: at alpha 1 the policy is %s",
                 folder, len(missing), folder)
    else:
        log.info("policy initialised from %s", folder)
    added = [f for f in policy.cfg.features if f not in src.cfg.features]
    if added:
        log.info("features %s are new to %s: their input weights start at zero, so the run starts as %s",
                 ",".join(added), folder, folder)
    if "near_conf" in added and policy.cfg.init_near_conf:
        policy.start_near_conf()
        log.info("... plus the threshold start's near_conf term (--init-near-conf %g)", policy.cfg.init_near_conf)


def widened(src: Policy, features: tuple) -> dict:
    """`src`'s weights for a network that reads `features` (its own, in any order, plus new ones): the
    layers that read the features (UnmaskPolicy's inp, skip, alpha_skip) get their columns by name,
    zero for a new feature, so the wider network computes what `src` does."""
    state = src.state_dict()
    if src.cfg.arch != "features" or tuple(src.cfg.features) == tuple(features):
        return state
    out = dict(state)
    for name in ("inp.weight", "skip.weight", "alpha_skip.weight"):
        if name in state:
            w = state[name]
            cols = [w[:, src.cfg.features.index(f)] if f in src.cfg.features else torch.zeros_like(w[:, 0])
                    for f in features]
            out[name] = torch.stack(cols, dim=1)
    return out


def network_config(cfg: GRPOConfig) -> PolicyConfig:
    """The policy network the flags ask for."""
    return PolicyConfig(arch=cfg.arch, features=tuple(f for f in cfg.features.split(",") if f), hidden=cfg.hidden,
                        ff=cfg.ff, heads=cfg.heads, top_p=cfg.top_p, full_context=cfg.full_context,
                        skip_gain=skip_gain(cfg), alpha_range=alpha_bounds(cfg), alpha_shift=cfg.alpha_shift,
                        gate_hi=cfg.gate_hi)


def skip_gain(cfg: GRPOConfig) -> float:
    """--skip-gain, or its default: the threshold start's sharpness (so the skip path's weights are
    O(1) and Adam moves each feature's weight on the scale of conf's), 1 for the slow start."""
    if cfg.skip_gain < 0:
        raise DLLMError(f"--skip-gain {cfg.skip_gain}; valid: 0 (automatic) or a number > 0")
    return cfg.skip_gain or (PolicyConfig.init_sharpness if cfg.init == "threshold" else 1.0)


def lr_lambda(cfg: GRPOConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps * cfg.inner_steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return f


RUN_FILES = ("best", "last", "validated", "trainer_state.pt", "log.jsonl")  # what a run writes into OUT


def check_config(cfg: GRPOConfig, resume: bool, overwrite: bool) -> None:
    """Everything that can be refused before any weights or data load, as one-line errors."""
    def bad(flag: str, valid: str) -> DLLMError:
        return DLLMError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}; valid: {valid}")

    for k in ("steps", "prompts_per_step", "inner_steps", "val_every", "val_size", "save_every", "batch_size"):
        if getattr(cfg, k) < 1:
            raise bad(k, "a positive whole number")
    if cfg.group < 2:
        raise bad("group", "2 or more (advantages are relative to the group: with 1 they are all 0)")
    for k in ("lr", "clip_eps", "grad_clip"):
        if not cfg.__dict__[k] > 0:
            raise bad(k, "a number > 0")
    for k in ("alpha", "warmup", "weight_decay", "dllm_temperature"):
        if not cfg.__dict__[k] >= 0:
            raise bad(k, "a number >= 0" + (" (0 rewards accuracy only; < 0 would reward more NFE)"
                                              if k == "alpha" else ""))
    for k in ("block", "gen_length", "max_length"):
        if cfg.__dict__[k] is not None and cfg.__dict__[k] < 1:
            raise bad(k, "a positive whole number (or leave it unset)")
    if not 0 < cfg.init_tau <= 1:
        raise bad("init_tau", "a number in (0, 1]")
    if cfg.init_near_conf and "near_conf" not in cfg.features.split(","):
        raise bad("init_near_conf", f"0 without feature near_conf, or --features {cfg.features},near_conf")
    if not 0 <= cfg.init_near_conf < math.inf:
        raise bad("init_near_conf", "a finite number >= 0")
    if cfg.init_near_conf and cfg.init != "threshold" and not cfg.init_from:
        raise bad("init_near_conf", "0 with the slow start, or --init threshold (whose dependency term it is)")
    if isinstance(cfg.gate_hi, bool) or not 0 <= cfg.gate_hi <= 1:
        raise bad("gate_hi", "a number in (0, 1], or 0 for no gate")
    if cfg.gate_hi and (cfg.arch != "features" or not {"conf", "eligible"} <= set(cfg.features.split(","))):
        raise bad("gate_hi", f"0 with --arch {cfg.arch} --features {cfg.features}, or --arch features with features "
                             f"that include conf and eligible")
    if cfg.init == "threshold" and cfg.arch != "features":
        raise bad("init", f"slow with --arch {cfg.arch} (the paper's networks start from smart_init), or --arch features")
    try:
        taus = expert_taus(cfg)
    except ValueError:
        raise bad("expert_tau", "comma-separated thresholds in (0, 1], e.g. 0.9,0.7") from None
    if any(not 0 < t <= 1 for t in taus):
        raise bad("expert_tau", "comma-separated thresholds in (0, 1], e.g. 0.9,0.7")
    if cfg.sampling not in SAMPLINGS:
        raise bad("sampling", ", ".join(SAMPLINGS))
    alpha_bounds(cfg)  # a malformed --alpha-range fails here, before the model loads
    skip_gain(cfg)
    resolve_dtype(cfg.dtype)
    check_cache(cfg.cache, 0, cfg.cache_window)  # main() refuses other modes (CHOICES); this is for callers of the API
    feats = [f for f in cfg.features.split(",") if f]
    unknown = [f for f in feats if f not in ALL_FEATURES]
    if not feats or unknown:
        raise bad("features", f"a comma-separated subset of {', '.join(ALL_FEATURES)}")
    if cfg.block is not None and cfg.gen_length is not None:
        check_block(cfg.block, cfg.gen_length)
    if cfg.paper_mode and cfg.sampling != "bernoulli":
        raise bad("sampling", "bernoulli with --paper-mode (the paper's dpls is --sampling pl)")
    if cfg.top_p < 1:
        raise bad("top_p", "a positive whole number")
    if cfg.init_from:
        init_source(cfg.init_from, network_config(cfg))
    check_out(cfg, resume, overwrite)


def check_out(cfg: GRPOConfig, resume: bool, overwrite: bool) -> None:
    """--out is a folder we can write to; with --resume it holds a readable trainer state, and with
    neither --resume nor --overwrite no run at all."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DLLMError(f"--out {cfg.out!r} is a file; valid: a folder (new, or an earlier run's with --resume)")
    check_writable(out)
    state = out / "trainer_state.pt"
    if resume and overwrite:
        raise DLLMError("--resume and --overwrite together; valid: one of them")
    if resume and not state.exists():
        raise DLLMError(f"--resume: no trainer state at {state}; valid: the --out of an earlier run, "
                        f"or drop --resume to start one")
    if resume:
        load_state(state)  # a corrupt state fails here, not after the model loaded
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise DLLMError(f"--out {cfg.out!r} already holds a run ({', '.join(sorted(p.name for p in out.iterdir())[:4])}); "
                        f"valid: --resume to continue it, --overwrite to replace it, or a new --out")


def load_state(path: Path) -> dict:
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
        st["policy"], st["opt"], st["sched"], st["step"], st["best"], st["config"]  # noqa: B018
        return st
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a truncated file
        raise DLLMError(f"{path} cannot be read ({type(e).__name__}: {str(e).strip()[:100]}); valid: a "
                        f"trainer state as train.grpo writes it; rerun with --overwrite to start over") from None


class Trainer:
    """One GRPO run and its state: the environment (the frozen dLLM and the task), the policy, its
    optimizer and schedule, the step and the best validation reward so far.

        Trainer(cfg, resume=False).run()    # what `python -m train.grpo` does

    Each step of `run()`: rollouts -> advantages -> --inner-steps updates -> a log line, with
    validation (keeping OUT/best) and checkpoints (OUT/last and the trainer state) when due."""

    def __init__(self, cfg: GRPOConfig, resume: bool, overwrite: bool = False):
        check_config(cfg, resume, overwrite)
        self.cfg, self.out = cfg, Path(cfg.out)
        self.state_path = self.out / "trainer_state.pt"
        # without a GPU accelerate must be told so, or a launch leaves every process alone as rank 0
        self.acc = Accelerator(cpu=(cfg.device == "cpu" or not torch.cuda.is_available()))
        torch.manual_seed(cfg.seed)
        self.env = Env(cfg, self.acc.device)
        self.policy = self._new_policy().to(self.acc.device)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step, self.best, self.prior_seconds = 0, -float("inf"), 0.0
        if resume:
            self._resume()
        self.ddp_policy, self.opt = self.acc.prepare(self.policy, self.opt)
        self.train_prompts = self.env.scorer.prompts(cfg.train_split)
        self.val_prompts = self.env.scorer.prompts(cfg.val_split, n=cfg.val_size, seed=cfg.seed)
        if self.acc.is_main_process:
            self._prepare_out(overwrite)
        self.taus = expert_taus(cfg)
        self.loop_start, self.bar = time.time(), None

    def _new_policy(self) -> Policy:
        """The policy the flags ask for, trained for this run's model, task, block and L (--init-from's weights)."""
        cfg, env = self.cfg, self.env
        pcfg = replace(network_config(cfg), init=cfg.init, init_tau=cfg.init_tau, init_near_conf=cfg.init_near_conf,
                       skip_gain=skip_gain(cfg),
                       sampling=cfg.sampling, stop_logit=cfg.stop_logit,
                       base_model=env.model_id, task=cfg.task, block=env.block, gen_length=env.L,
                       dllm_arch=dllm_arch_of(env.model) if cfg.arch == "dit_hidden" else {})
        policy = build_policy(pcfg)
        if cfg.init_from:
            start_from(policy, cfg.init_from)
        return policy

    def _resume(self) -> None:
        """Policy, optimizer, schedule, step, best and training time from OUT/trainer_state.pt."""
        st = load_state(self.state_path)
        now = asdict(self.cfg)
        diff = sorted(k for k in st["config"] if st["config"][k] != now.get(k) and k not in RESUME_MAY_CHANGE)
        if diff:
            raise DLLMError(f"--resume with different settings ({', '.join(diff)}); valid: the "
                            f"settings of the run in {self.out}, or a new --out")
        self.policy.load_state_dict(st["policy"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.best = st["step"], st["best"]
        self.prior_seconds = st.get("train_seconds", 0.0)
        log.info("resumed %s at step %d", self.state_path, self.step)

    def _prepare_out(self, overwrite: bool) -> None:
        """OUT made ready by the main process: emptied with --overwrite, partial saves removed, the
        log cut back to the resumed step."""
        cfg, out = self.cfg, self.out
        if cfg.train_split == cfg.val_split:
            log.warning("validating on the training split %r: the validation numbers are not held out",
                        cfg.val_split)
        if overwrite:
            for name in RUN_FILES:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)
        keep_log_until(out / "log.jsonl", self.step)
        log.info("policy: %d parameters; task %s (%d train prompts), L=%d, block=%d, alpha=%s, %d processes",
                 sum(p.numel() for p in self.policy.parameters()), cfg.task, len(self.train_prompts),
                 self.env.L, self.env.block, cfg.alpha_range or f"{cfg.alpha:g}", self.acc.num_processes)

    def run(self) -> None:
        """Train from the current step to --steps."""
        self.loop_start = time.time()
        if self.cfg.keep_validated and self.step == 0 and self.acc.is_main_process:  # the start, to rank with the rest
            self.keep_validated({})
        self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc="grpo",
                        disable=not self.acc.is_main_process, dynamic_ncols=True)
        while self.step < self.cfg.steps:
            self.train_step()
        self.bar.close()

    def train_step(self) -> None:
        """One step: rollouts, advantages, updates; then its log line, validation and checkpoint when due."""
        t0 = time.time()
        ro, ex = self.rollouts()
        adv, a_ex = self.advantages(ro, ex)
        losses = self.optimize(ro, ex, adv)
        self.step += 1
        rec = self.record(ro, ex, a_ex, losses)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}", nfe=f"{rec['nfe']:.1f}")
        if self.due(self.cfg.val_every):
            rec |= self.validation()
        rec["seconds"] = round(time.time() - t0, 2)
        if self.acc.is_main_process:
            self.log_line(rec)
            if self.due(self.cfg.save_every):
                val = {k: v for k, v in rec.items() if k.startswith("val_")}
                self.checkpoint(val | {"train_reward": rec["reward"]})
        self.acc.wait_for_everyone()
        crash.end_of_step(self.step)

    def due(self, every: int) -> bool:
        """Whether the step just finished is one of every `every`, or the last."""
        return self.step % every == 0 or self.step == self.cfg.steps

    def rollouts(self) -> tuple[Rollout, list[Rollout]]:
        """This step's rollouts: the policy's (--group per prompt, sampling as training does), and
        for expert steering one per prompt and tau of Fast-dLLM's threshold rule."""
        cfg, acc = self.cfg, self.acc
        picks, seeds = step_prompts(cfg, self.step, len(self.train_prompts), acc.process_index, acc.num_processes)
        prompts = [self.train_prompts[i] for i in picks]
        pol = acc.unwrap_model(self.ddp_policy)
        alphas = None
        if pol.alpha_conditioned:  # one alpha per prompt group: advantages compare rollouts of one alpha
            alphas = [a for a in draw_alphas(cfg, self.step, cfg.prompts_per_step, acc.process_index)
                      for _ in range(cfg.group)]
        ro = self.env.rollout(pol, prompts, seeds, mode=policy_mode(cfg), alphas=alphas)
        ex = [self.env.rollout(None, prompts[::cfg.group], seeds[::cfg.group], record_top=pol.top_probs,
                               record_hidden=pol.reads_hidden, alphas=None if alphas is None else alphas[::cfg.group],
                               sampler=ThresholdSampler(ThresholdSampler.Config(tau=t))) for t in self.taus]
        return ro, ex

    def advantages(self, ro: Rollout, ex: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each rollout's advantage, row order: the policy's, then tau by tau; and the experts' own
        (k, E) (None without experts), whose rewards count in their prompt's group baseline."""
        G = self.cfg.group
        if self.cfg.adv_norm == "relative":  # in log space, so that tiny rewards (large alphas) count alike
            parts = [ro.log_rewards.view(-1, G)] + ([torch.stack([e.log_rewards for e in ex], 1)] if ex else [])
            a = relative_advantages(torch.cat(parts, 1)).float()
            a_pol, a_ex = a[:, :G], a[:, G:]
        elif not ex:
            return group_advantages(ro.rewards, G), None
        else:
            a_pol, a_ex = mixed_advantages(ro.rewards.view(-1, G), torch.stack([e.rewards for e in ex], dim=1))
        if not ex:
            return a_pol.flatten(), None
        return torch.cat([a_pol.flatten(), a_ex.T.flatten()]), a_ex

    def optimize(self, ro: Rollout, ex: list[Rollout], adv: torch.Tensor) -> list[float]:
        """--inner-steps updates replaying this step's recorded steps; returns the losses."""
        traj, n_policy = ro.trajectory, len(ro.rewards)
        for j, e in enumerate(ex):  # the experts' rows come after the policy's, tau by tau
            for r in e.trajectory:
                r.rows = r.rows + n_policy + j * len(e.rewards)
            traj = traj + e.trajectory
        pol = self.acc.unwrap_model(self.ddp_policy)
        batch = {k: to_device(v, self.acc.device)
                 for k, v in stack_steps(traj, pol, torch.cat([ro.alphas] + [e.alphas for e in ex])
                                         if pol.alpha_conditioned else None).items()}
        return update(self.ddp_policy, pol, self.opt, self.sched, batch, adv.to(self.acc.device), self.cfg,
                      self.acc, n_policy)

    def record(self, ro: Rollout, ex: list[Rollout], a_ex: torch.Tensor | None, losses: list[float]) -> dict:
        """The step's log record: the policy's mean reward, accuracy and NFE over all processes, the
        loss and learning rate; the experts' logged apart (their rollouts are not the policy's)."""
        acc = self.acc
        m = torch.tensor([ro.rewards.mean(), ro.scores.mean(), ro.nfes.mean()], device=acc.device)
        m = acc.reduce(m, reduction="mean").tolist()
        rec = {"step": self.step, "reward": m[0], "accuracy": m[1], "nfe": m[2], "loss": sum(losses) / len(losses),
               "lr": self.sched.get_last_lr()[0]}
        if ex:
            em = torch.stack([torch.stack([e.rewards.mean(), e.scores.mean(), e.nfes.mean()]) for e in ex]).to(acc.device)
            em = acc.reduce(em, reduction="mean").tolist()
            rec |= {"expert": {f"{t:g}": {"reward": r, "accuracy": a, "nfe": n} for t, (r, a, n) in zip(self.taus, em)},
                    "expert_advantage": a_ex.mean().item()}
        return rec

    def validation(self) -> dict:
        """Validate now: the val_* entries of the log record; a reward above the best so far is kept in OUT/best."""
        cfg, acc = self.cfg, self.acc
        vm = validate(self.env, acc.unwrap_model(self.ddp_policy), self.val_prompts, acc,
                      policy_mode(cfg) if cfg.val_mode == "sample" else "greedy", alpha_bounds(cfg))
        val = {f"val_{k}": v for k, v in vm.items()}
        if acc.is_main_process and vm["reward"] > self.best:
            self.best = vm["reward"]
            acc.unwrap_model(self.ddp_policy).save(self.out / "best", self.card(val))
        if acc.is_main_process and cfg.keep_validated:
            self.keep_validated(val)
        if acc.is_main_process:
            self.bar.write(f"step {self.step}: validation reward {vm['reward']:.3g}, accuracy {vm['accuracy']:.3f}, "
                           f"NFE {vm['nfe']:.2f}" + "".join(
                               f"; alpha {a}: {100 * v['accuracy']:.1f} % @ {v['nfe']:.2f}" for a, v in vm.get("at", {}).items()))
        return val

    def keep_validated(self, metrics: dict) -> None:
        """--keep-validated: the policy as it is now in OUT/validated/step-<step>."""
        self.acc.unwrap_model(self.ddp_policy).save(self.out / "validated" / f"step-{self.step}", self.card(metrics))

    def elapsed(self) -> float:
        """Training seconds since the run began, resumes included."""
        return self.prior_seconds + time.time() - self.loop_start

    def card(self, metrics: dict) -> dict:
        """A saved policy's card: how to rerun it, what it was trained for, and `metrics`."""
        cfg, env = self.cfg, self.env
        bounds = alpha_bounds(cfg)
        return {"command": command_line(cfg),
                "base_model": env.model_id, "task": cfg.task, "block": env.block, "gen_length": env.L,
                **({"alpha": cfg.alpha} if bounds is None else {"alpha_range": bounds}), "steps": self.step,
                "arch": cfg.arch,
                **({"features": [f for f in cfg.features.split(",") if f]} if cfg.arch == "features" else {}),
                "seed": cfg.seed, "processes": self.acc.num_processes, "metrics": metrics,
                "train_minutes": round(self.elapsed() / 60, 2)}  # since the loop started, resumes included

    def checkpoint(self, metrics: dict) -> None:
        """The trainer state (what --resume reads) and OUT/last."""
        policy = self.acc.unwrap_model(self.ddp_policy)
        st = {"policy": policy.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
              "step": self.step, "best": self.best, "config": asdict(self.cfg), "train_seconds": self.elapsed()}
        atomic_write(self.state_path, lambda tmp: torch.save(st, tmp))
        policy.save(self.out / "last", self.card(metrics))

    def log_line(self, rec: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def train(cfg: GRPOConfig, resume: bool, overwrite: bool = False) -> None:
    """Train a policy as `python -m train.grpo` does (see Trainer)."""
    Trainer(cfg, resume, overwrite).run()


def policy_mode(cfg: GRPOConfig) -> str:
    """The learned sampler's mode that samples as training does."""
    return "pl" if cfg.sampling == "pl" else "bernoulli" if cfg.paper_mode else "sample"


LOG_FLOOR = math.log(1e-300)  # validation: the log mean reward of an alpha where nothing is solved


@torch.no_grad()
def validate(env: Env, policy, prompts, acc, mode: str = "greedy", bounds: list[float] | None = None,
             alpha: float | None = None) -> dict:
    """The policy in `mode` (sampling with fixed seeds, or greedy) on held-out prompts, sharded
    over processes. Greedy by default: what evaluation with `mode=greedy` runs, without the
    sampling noise that would otherwise decide which checkpoint is kept.

    An alpha-conditioned policy (`bounds`: its --alpha-range) runs at each of `val_alphas(bounds)`;
    its reward is the geometric mean of theirs (each alpha's relative gain counts the same, though
    a large alpha's rewards are small), its accuracy and NFE their means, and `at` holds each alpha's.
    Mean rewards are taken in log space (`log_reward`: "log_reward" in each entry), so one far below
    float64's range still counts; an alpha where nothing is solved counts as LOG_FLOOR (none solving
    anything: 0)."""
    if bounds is not None:
        at = {f"{a:g}": validate(env, policy, prompts, acc, mode, None, a) for a in val_alphas(bounds)}
        solved = any(v["accuracy"] > 0 for v in at.values())
        log_geo = sum(max(v["log_reward"], LOG_FLOOR) for v in at.values()) / len(at) if solved else -math.inf
        return {"reward": math.exp(log_geo), "log_reward": log_geo,
                "accuracy": sum(v["accuracy"] for v in at.values()) / len(at),
                "nfe": sum(v["nfe"] for v in at.values()) / len(at), "at": at}
    idx = range(acc.process_index, len(prompts), acc.num_processes)
    mine = [prompts[i] for i in idx]  # seeded by index in the whole set: the same draws whatever the split
    ro = env.rollout(policy, mine, list(idx), mode=mode, record=False,
                     alphas=None if alpha is None else [alpha] * len(mine))
    m = torch.tensor([ro.scores.sum(), ro.nfes.sum(), float(len(mine))], device=acc.device)
    score, nfe, n = acc.reduce(m, reduction="sum").tolist()
    lse = torch.logsumexp(ro.log_rewards, 0) if len(mine) else torch.tensor(-math.inf, dtype=torch.float64)
    if acc.num_processes > 1:  # float64 (not on MPS, where there is only one process)
        lse = torch.logsumexp(acc.gather(lse.reshape(1).to(acc.device)).double().cpu(), 0)
    log_mean = float(lse) - math.log(n)
    return {"reward": math.exp(log_mean), "log_reward": log_mean, "accuracy": score / n, "nfe": nfe / n}


def parse_args(argv=None) -> tuple[GRPOConfig, bool, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GRPOConfig):  # each flag's help: its field's, then its default
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type={"int": int, "int | None": int, "float": float}.get(str(f.type), str),
                           default=f.default, choices=CHOICES.get(f.name), help=text.replace("%", "%%"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (best, last, "
                   "trainer state, log); without it an OUT that holds a run is an error")
    a = vars(p.parse_args(argv))
    resume, overwrite = a.pop("resume"), a.pop("overwrite")
    return GRPOConfig(**a), resume, overwrite


def main(argv=None) -> None:
    cfg, resume, overwrite = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(cfg, resume, overwrite)
    except DLLMError as e:
        raise SystemExit(f"train.grpo: error: {e}") from None


if __name__ == "__main__":
    main()
