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
from lm_eval_dllm.reward import TaskScorer, reward
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.samplers.threshold import ThresholdSampler
from lm_eval_dllm.text import stop_strings
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID
from lm_eval_dllm.utils import DLLMError, atomic_write

from . import crash
from .grpo_loss import clipped_pg_loss, expert_mixture, group_advantages, loss_count, mixed_advantages
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
    save_every: int = opt(10, 'steps between checkpoints of OUT/last and the trainer state (and at the last step)')
    batch_size: int = opt(64, 'decode batch for rollouts and validation')
    arch: str = opt("features", "policy network: features (ours, --features) | dit_confidence (the paper's DiTConfidencePolicy) | dit_hidden (its DiTHiddenStatePolicy: the dLLM's hidden states through one LLaDA block of the dLLM's shape; --hidden/--ff/--heads do not apply)")
    top_p: int = opt(1, "--arch dit_confidence: the top token probabilities it reads per position")
    full_context: bool = opt(True, "--arch dit_confidence/dit_hidden: it sees the whole generated region (else the current block)")
    features: str = opt(",".join(PolicyConfig.features), 'comma-separated policy input features')
    hidden: int = opt(128, 'policy width')
    ff: int = opt(512, 'policy feed-forward width')
    heads: int = opt(2, 'policy attention heads')
    init: str = opt("slow", "slow (the paper's bias -2) | threshold (start as Fast-dLLM's rule at --init-tau)")
    init_tau: float = opt(0.9, "the threshold start's tau")
    skip_gain: float = opt(0.0, "gain of the policy's linear skip path; 0 = --init's own: its sharpness (20) for threshold, 1 for slow")
    init_from: str = opt("", "start from this policy's weights (a train.grpo OUT/best, or a shipped name), e.g. to retrain at another --alpha")
    seed: int = opt(0, 'policy init, prompt order and rollout sampling')
    dtype: str = opt("auto", "the dLLM's dtype: auto, float32, bfloat16, float16")
    device: str = opt("", "cpu forces the CPU; otherwise accelerate's device (a GPU if there is one)")
    out: str = opt("runs/grpo", 'OUT/best, OUT/last, OUT/log.jsonl, OUT/trainer_state.pt')


CHOICES = {"arch": ARCHS, "val_mode": ("greedy", "sample"), "sampling": SAMPLINGS, "init": ("slow", "threshold"), "loss_norm": ("step", "rollout"),
           "truncation": ("left", "error"), "cache": CACHE_MODES}
RESUME_MAY_CHANGE = {"val_every", "save_every", "out", "device", "batch_size"}


@dataclass
class Rollout:
    """One batch of completions: the per-step records the loss replays (empty unless recorded), and
    per completion its reward, the task's score, its NFE and its text."""
    trajectory: list
    rewards: torch.Tensor  # (n,)
    scores: torch.Tensor  # (n,)
    nfes: torch.Tensor  # (n,) float
    texts: list[str]


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
                record_hidden=False) -> Rollout:
        """Decode every prompt once (repeat prompts for groups) with the policy in `mode`, or with
        `sampler` (an expert; record_top, record_hidden: the top probabilities, hidden states the policy replays)."""
        # temperature 1: the replayed log-probabilities are those of the distribution sampled here
        sampler = sampler or LearnedSampler.from_policy(policy, mode=mode, temperature=1.0)
        texts, nfes, scores, traj_all = [], [], [], []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[i:i + self.cfg.batch_size]
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
        rewards = [reward(s, n, self.L, self.cfg.alpha) for s, n in zip(scores, nfes)]
        return Rollout(traj_all, torch.tensor(rewards), torch.tensor(scores), torch.tensor(nfes, dtype=torch.float),
                       texts)


def commit_rank(r) -> torch.Tensor:
    """A step's commits in order, (b, L) long (-1 = not committed): the sampler's own order, or for
    an unordered one (an expert) by the dLLM's confidence, most confident first."""
    if r.rank is not None:
        return r.rank
    key = torch.where(r.action, r.conf.float(), torch.full_like(r.conf, -float("inf"), dtype=torch.float))
    order = key.argsort(-1, descending=True)
    pos = torch.arange(key.shape[1]).expand_as(order)
    return torch.full_like(order, -1).scatter(-1, order, torch.where(r.action.gather(-1, order), pos, -1))


def stack_steps(traj, policy: Policy) -> dict:
    """All (rollout, step) records as one batch: inputs (the policy's forward arguments),
    action/eligible/rank (N, L), row (N,)."""
    cat = lambda name: torch.cat([getattr(r, name) for r in traj])  # noqa: E731
    steps = SimpleNamespace(**{n: cat(n) for n in ("conf", "margin", "entropy", "masked", "eligible")})
    if policy.cfg.arch in DIT_ARCHS:
        steps.steps = cat("steps")
        steps.top = cat("top") if policy.top_probs else None
        steps.hidden = cat("hidden") if policy.reads_hidden else None
        steps.block_start = torch.cat([torch.full((len(r.rows),), r.block_start) for r in traj])
        steps.block_size = traj[0].block_size
    return {"inputs": policy.inputs(steps), "action": cat("action"), "eligible": steps.eligible,
            "masked": steps.masked, "row": cat("rows"), "rank": torch.cat([commit_rank(r) for r in traj])}


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


def init_mismatch(folder: str, src: PolicyConfig, run: PolicyConfig) -> None:
    """A one-line error unless --init-from's network is this run's."""
    diff = network_diff(src, run)
    if diff:
        raise DLLMError(f"--init-from {folder!r} has {', '.join(f'{k}={getattr(src, k)}' for k in diff)}; "
                        f"valid: a policy with this run's {', '.join(f'{k}={v}' for k, v in diff.items())}")


def start_from(policy: Policy, folder: str) -> None:
    """Load --init-from's weights into `policy`; its network must be the same."""
    src = UnmaskPolicy.load(find_policy(folder, model_id="", block=0, gen_length=0))
    init_mismatch(folder, src.cfg, policy.cfg)
    for k in ("base_model", "block", "gen_length"):
        if getattr(src.cfg, k) != getattr(policy.cfg, k):
            log.warning("--init-from %s was trained with %s=%s; this run has %s", folder, k,
                        getattr(src.cfg, k), getattr(policy.cfg, k))
    policy.load_state_dict(src.state_dict())
    log.info("policy initialised from %s", folder)


def network_config(cfg: GRPOConfig) -> PolicyConfig:
    """The policy network the flags ask for."""
    return PolicyConfig(arch=cfg.arch, features=tuple(f for f in cfg.features.split(",") if f), hidden=cfg.hidden,
                        ff=cfg.ff, heads=cfg.heads, top_p=cfg.top_p, full_context=cfg.full_context)


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


RUN_FILES = ("best", "last", "trainer_state.pt", "log.jsonl")  # what a run writes into OUT


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
    try:
        taus = expert_taus(cfg)
    except ValueError:
        raise bad("expert_tau", "comma-separated thresholds in (0, 1], e.g. 0.9,0.7") from None
    if any(not 0 < t <= 1 for t in taus):
        raise bad("expert_tau", "comma-separated thresholds in (0, 1], e.g. 0.9,0.7")
    if cfg.sampling not in SAMPLINGS:
        raise bad("sampling", ", ".join(SAMPLINGS))
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
        src = UnmaskPolicy.load(find_policy(cfg.init_from, model_id="", block=0, gen_length=0))
        init_mismatch(cfg.init_from, src.cfg, network_config(cfg))
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


def train(cfg: GRPOConfig, resume: bool, overwrite: bool = False) -> None:
    check_config(cfg, resume, overwrite)
    # without a GPU accelerate must be told so, or a launch leaves every process alone as rank 0
    acc = Accelerator(cpu=(cfg.device == "cpu" or not torch.cuda.is_available()))
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    env = Env(cfg, acc.device)
    features = tuple(f for f in cfg.features.split(",") if f)
    pcfg = replace(network_config(cfg), init=cfg.init, init_tau=cfg.init_tau, skip_gain=skip_gain(cfg),
                   sampling=cfg.sampling, stop_logit=cfg.stop_logit,
                   base_model=env.model_id, task=cfg.task, block=env.block, gen_length=env.L,
                   dllm_arch=dllm_arch_of(env.model) if cfg.arch == "dit_hidden" else {})
    policy = build_policy(pcfg)
    if cfg.init_from:
        start_from(policy, cfg.init_from)
    policy = policy.to(acc.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    step, best, prior_seconds = 0, -float("inf"), 0.0
    state_path = out / "trainer_state.pt"
    if resume:
        st = load_state(state_path)
        diff = sorted(k for k in st["config"] if st["config"][k] != asdict(cfg).get(k) and k not in RESUME_MAY_CHANGE)
        if diff:
            raise DLLMError(f"--resume with different settings ({', '.join(diff)}); valid: the "
                            f"settings of the run in {out}, or a new --out")
        policy.load_state_dict(st["policy"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, best = st["step"], st["best"]
        prior_seconds = st.get("train_seconds", 0.0)
        log.info("resumed %s at step %d", state_path, step)
    ddp_policy, opt = acc.prepare(policy, opt)
    train_prompts = env.scorer.prompts(cfg.train_split)
    val_prompts = env.scorer.prompts(cfg.val_split, n=cfg.val_size, seed=cfg.seed)
    if cfg.train_split == cfg.val_split and acc.is_main_process:
        log.warning("validating on the training split %r: the validation numbers are not held out",
                    cfg.val_split)
    if acc.is_main_process:
        if overwrite:
            for name in RUN_FILES:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)
        keep_log_until(out / "log.jsonl", step)
        log.info("policy: %d parameters; task %s (%d train prompts), L=%d, block=%d, alpha=%g, %d processes",
                 sum(p.numel() for p in policy.parameters()), cfg.task, len(train_prompts), env.L,
                 env.block, cfg.alpha, acc.num_processes)

    loop_start = time.time()

    def elapsed() -> float:
        return prior_seconds + time.time() - loop_start

    def card(metrics: dict) -> dict:
        return {"command": command_line(cfg),
                "base_model": env.model_id, "task": cfg.task, "block": env.block, "gen_length": env.L,
                "alpha": cfg.alpha, "features": list(features), "steps": step, "seed": cfg.seed,
                "processes": acc.num_processes, "metrics": metrics,
                "train_minutes": round(elapsed() / 60, 2)}  # since the loop started, resumes included

    def save(metrics: dict) -> None:
        st = {"policy": acc.unwrap_model(ddp_policy).state_dict(), "opt": opt.state_dict(),
              "sched": sched.state_dict(), "step": step, "best": best, "config": asdict(cfg),
              "train_seconds": elapsed()}
        atomic_write(state_path, lambda tmp: torch.save(st, tmp))
        acc.unwrap_model(ddp_policy).save(out / "last", card(metrics))

    def log_line(rec: dict) -> None:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    taus = expert_taus(cfg)
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo", disable=not acc.is_main_process, dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.time()
        picks, seeds = step_prompts(cfg, step, len(train_prompts), acc.process_index, acc.num_processes)
        prompts = [train_prompts[i] for i in picks]
        pol = acc.unwrap_model(ddp_policy)
        ro = env.rollout(pol, prompts, seeds, mode=policy_mode(cfg))
        traj, rewards, scores, nfes = ro.trajectory, ro.rewards, ro.scores, ro.nfes
        n_policy = len(rewards)
        adv = group_advantages(rewards, cfg.group)
        if taus:  # expert steering: one rollout per tau and prompt, rows after the policy's
            firsts = prompts[::cfg.group]
            ex = [env.rollout(None, firsts, seeds[::cfg.group], sampler=ThresholdSampler(ThresholdSampler.Config(tau=t)),
                              record_top=pol.top_probs, record_hidden=pol.reads_hidden) for t in taus]
            for j, e in enumerate(ex):
                for r in e.trajectory:
                    r.rows = r.rows + n_policy + j * len(firsts)
                traj += e.trajectory
            ex_rewards = torch.stack([e.rewards for e in ex], dim=1)  # (k, E)
            a_pol, a_ex = mixed_advantages(rewards.view(-1, cfg.group), ex_rewards)
            adv = torch.cat([a_pol.flatten(), a_ex.T.flatten()])  # row order: policy, then tau by tau
        batch = {k: to_device(v, acc.device) for k, v in stack_steps(traj, pol).items()}
        losses = update(ddp_policy, pol, opt, sched, batch, adv.to(acc.device), cfg, acc, n_policy)
        step += 1
        m = torch.tensor([rewards.mean(), scores.mean(), nfes.mean()], device=acc.device)
        m = acc.reduce(m, reduction="mean").tolist()
        rec = {"step": step, "reward": m[0], "accuracy": m[1], "nfe": m[2], "loss": sum(losses) / len(losses),
               "lr": sched.get_last_lr()[0]}
        if taus:  # logged apart: the experts' rollouts are not the policy's
            em = torch.stack([torch.stack([e.rewards.mean(), e.scores.mean(), e.nfes.mean()]) for e in ex]).to(acc.device)
            em = acc.reduce(em, reduction="mean").tolist()
            rec |= {"expert": {f"{t:g}": {"reward": r, "accuracy": a, "nfe": n} for t, (r, a, n) in zip(taus, em)},
                    "expert_advantage": a_ex.mean().item()}
        bar.update(1)
        bar.set_postfix(reward=f"{m[0]:.3f}", acc=f"{m[1]:.2f}", nfe=f"{m[2]:.1f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            vm = validate(env, acc.unwrap_model(ddp_policy), val_prompts, acc,
                          policy_mode(cfg) if cfg.val_mode == "sample" else "greedy")
            rec |= {f"val_{k}": v for k, v in vm.items()}
            if acc.is_main_process and vm["reward"] > best:
                best = vm["reward"]
                acc.unwrap_model(ddp_policy).save(out / "best", card({f"val_{k}": v for k, v in vm.items()}))
            if acc.is_main_process:
                bar.write(f"step {step}: validation reward {vm['reward']:.3f}, accuracy {vm['accuracy']:.3f}, NFE {vm['nfe']:.2f}")
        rec["seconds"] = round(time.time() - t0, 2)
        if acc.is_main_process:
            log_line(rec)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save({k: v for k, v in rec.items() if k.startswith("val_")} | {"train_reward": m[0]})
        acc.wait_for_everyone()
        crash.end_of_step(step)
    bar.close()


def policy_mode(cfg: GRPOConfig) -> str:
    """The learned sampler's mode that samples as training does."""
    return "pl" if cfg.sampling == "pl" else "bernoulli" if cfg.paper_mode else "sample"


@torch.no_grad()
def validate(env: Env, policy, prompts, acc, mode: str = "greedy") -> dict:
    """The policy in `mode` (sampling with fixed seeds, or greedy) on held-out prompts, sharded
    over processes. Greedy by default: what evaluation with `mode=greedy` runs, without the
    sampling noise that would otherwise decide which checkpoint is kept."""
    idx = range(acc.process_index, len(prompts), acc.num_processes)
    mine = [prompts[i] for i in idx]  # seeded by index in the whole set: the same draws whatever the split
    ro = env.rollout(policy, mine, list(idx), mode=mode, record=False)
    m = torch.tensor([ro.rewards.sum(), ro.scores.sum(), ro.nfes.sum(), float(len(mine))], device=acc.device)
    m = acc.reduce(m, reduction="sum").tolist()
    return {"reward": m[0] / m[3], "accuracy": m[1] / m[3], "nfe": m[2] / m[3]}


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
