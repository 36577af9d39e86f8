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
import inspect
import json
import logging
import math
import os
import random
import re
import shlex
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.model import BUNDLED_ID
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy, bernoulli_logprob, build_features
from lm_eval_dllm.reward import TaskScorer, nfe_discount
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.text import PromptFitter, completion_text, stop_strings
from lm_eval_dllm.utils import DLLMError, atomic_write

from .grpo_loss import clipped_pg_loss, group_advantages, loss_count

log = logging.getLogger("train.grpo")


@dataclass
class GRPOConfig:
    task: str = "modchain"  # lm-eval task: its training split, prompt format, filters and metric
    include_path: str = ""  # extra folder of task YAMLs, as lm_eval's --include_path
    pretrained: str = ""  # "" = the bundled tiny dLLM
    block: int = 0  # 0 = the model's default block; >= gen_length = full diffusion
    gen_length: int = 0  # 0 = the task's max_gen_toks, else the model's default
    alpha: float = 1.0  # NFE discount exponent; 0 = reward accuracy only
    group: int = 8  # rollouts per prompt
    prompts_per_step: int = 8  # per process
    steps: int = 200  # rollout batches (each followed by --inner-steps updates)
    lr: float = 3e-5  # AdamW learning rate
    warmup: int = 0  # linear learning-rate warmup steps
    clip_eps: float = 0.5  # PPO-style ratio clip
    loss_norm: str = "step"  # step: mean over (rollout, step) terms, as the paper | rollout: each rollout weighs the same
    inner_steps: int = 2  # optimizer steps per rollout batch (rollouts reused)
    grad_clip: float = 0.2  # gradient-norm clip
    weight_decay: float = 0.0  # AdamW weight decay
    dllm_temperature: float = 0.0  # the dLLM's own token choice: 0 = argmax
    num_fewshot: int = -1  # -1 = the task's own
    train_split: str = "train"  # where training prompts come from
    val_split: str = "validation"  # where validation prompts come from (never trained on)
    apply_chat_template: bool = False
    val_every: int = 20  # steps between validations (and one at the last step)
    val_mode: str = "greedy"  # policy mode for validation (and so for keeping `best`): greedy | sample
    val_size: int = 128  # validation problems
    save_every: int = 10  # steps between checkpoints of OUT/last and the trainer state (and at the last step)
    batch_size: int = 64  # decode batch for rollouts and validation
    features: str = ",".join(PolicyConfig.features)  # comma-separated policy input features
    hidden: int = 128  # policy width
    ff: int = 512  # policy feed-forward width
    heads: int = 2  # policy attention heads
    init: str = "slow"  # slow (the paper's bias -2) | threshold (start as Fast-dLLM's rule at --init-tau)
    init_tau: float = 0.9  # the threshold start's tau
    skip_gain: float = 0.0  # gain of the policy's linear skip path; 0 = --init's own: its sharpness (20) for threshold, 1 for slow
    init_from: str = ""  # start from this policy's weights (a train.grpo OUT/best, or a shipped name), e.g. to retrain at another --alpha
    seed: int = 0  # policy init, prompt order and rollout sampling
    dtype: str = "auto"  # the dLLM's dtype: auto, float32, bfloat16, float16
    device: str = ""  # cpu forces the CPU; otherwise accelerate's device (a GPU if there is one)
    out: str = "runs/grpo"  # OUT/best, OUT/last, OUT/log.jsonl, OUT/trainer_state.pt


CHOICES = {"val_mode": ("greedy", "sample"), "init": ("slow", "threshold"), "loss_norm": ("step", "rollout")}
RESUME_MAY_CHANGE = {"val_every", "save_every", "out", "device", "batch_size"}


class Env:
    """The frozen dLLM plus the task: prompts in, rewards out, through the shared decode loop."""

    def __init__(self, cfg: GRPOConfig, device):
        self.cfg = cfg
        path = cfg.pretrained or None
        from lm_eval_dllm.tiny import BUNDLED_DIR

        self.model, self.tok, self.spec = load(path or str(BUNDLED_DIR), cfg.dtype, str(device))
        self.model_id = cfg.pretrained or BUNDLED_ID
        self.forward = model_forward(self.model)
        chat = None
        if cfg.apply_chat_template:
            def chat(msgs, add_generation_prompt=True, **kw):
                return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        tm = None
        if cfg.include_path:
            from lm_eval.tasks import TaskManager

            if not os.path.isdir(cfg.include_path):
                raise DLLMError(f"--include-path {cfg.include_path!r} is not a folder; valid: a folder of task YAMLs")
            tm = TaskManager(include_path=cfg.include_path)
        self.scorer = TaskScorer(cfg.task, num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                                 chat_template=chat, task_manager=tm)
        self.L = cfg.gen_length or int(self.scorer.gen_kwargs.get("max_gen_toks") or self.spec.default_gen_length)
        self.block = min(cfg.block or self.spec.default_block, self.L)
        self.until = stop_strings(self.scorer.gen_kwargs, self.tok, self.spec)
        self.device = device
        self._fit = PromptFitter(self.spec.max_length)

    def encode(self, context: str) -> list[int]:
        """Token ids of a prompt, left-truncated to the model's context as evaluation does."""
        ids = self.tok(context, add_special_tokens=not self.cfg.apply_chat_template)["input_ids"]
        return self._fit(ids, self.L)

    def rollout(self, policy, prompts, seeds, mode="sample", record=True):
        """Decode every prompt once (repeat prompts for groups). Returns trajectory, rewards, stats."""
        # temperature 1: the replayed log-probabilities are those of the distribution sampled here
        sampler = LearnedSampler.from_policy(policy, mode=mode, temperature=1.0)
        texts, nfes, scores, traj_all = [], [], [], []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[i:i + self.cfg.batch_size]
            ids = [self.encode(p.context) for p in chunk]
            out = diffuse(self.forward, ids, self.spec, sampler, self.L, self.block,
                          temperature=self.cfg.dllm_temperature, seeds=seeds[i:i + len(chunk)],
                          record=record, device=self.device)
            for j, p in enumerate(chunk):
                # exactly the text evaluation would score: stop tokens, then the task's stop strings
                text = completion_text(out.tokens[j].tolist(), self.tok, self.spec, self.until)
                texts.append(text)
                nfes.append(int(out.nfe[j]))
                scores.append(self.scorer.score(p.doc, text))
            if record:
                for r in out.trajectory:
                    r.rows = r.rows + i  # rows index the whole rollout batch
                traj_all += out.trajectory
        rewards = [s * nfe_discount(n, self.L, self.cfg.alpha) for s, n in zip(scores, nfes)]
        return traj_all, torch.tensor(rewards), torch.tensor(scores), torch.tensor(nfes, dtype=torch.float), texts


def stack_steps(traj, features) -> dict:
    """All (rollout, step) records as one batch: features (N, L, F), t (N,), action/eligible (N, L), row (N,)."""
    cat = lambda name: torch.cat([getattr(r, name) for r in traj])  # noqa: E731
    conf, margin, entropy, masked, eligible = (cat(n) for n in ("conf", "margin", "entropy", "masked", "eligible"))
    return {"feats": build_features(features, conf, margin, entropy, masked, eligible),
            "t": masked.float().mean(-1), "action": cat("action"), "eligible": eligible, "row": cat("rows")}


def update(ddp_policy, policy, opt, sched, batch: dict, adv: torch.Tensor, cfg: GRPOConfig, acc) -> list[float]:
    """--inner-steps clipped policy-gradient steps on one rollout batch; returns the losses."""
    with torch.no_grad():  # the behaviour policy: the one that sampled the actions
        old = bernoulli_logprob(policy(batch["feats"], batch["t"]), batch["action"], batch["eligible"])
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
        logp = bernoulli_logprob(ddp_policy(batch["feats"], batch["t"]), batch["action"], batch["eligible"])
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
        if v == getattr(default, k) and k not in ("task", "block", "alpha", "steps", "seed"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {shlex.quote(str(v))}")
    return "python -m train.grpo " + " ".join(parts)


def start_from(policy: UnmaskPolicy, folder: str) -> None:
    """Load --init-from's weights into `policy`; its features and sizes must be the same."""
    from policies import resolve_policy

    src = UnmaskPolicy.load(resolve_policy(folder, model_id="", block=0, gen_length=0))
    keys = ("features", "hidden", "ff", "heads", "layers")
    diff = [k for k in keys if getattr(src.cfg, k) != getattr(policy.cfg, k)]
    if diff:
        raise DLLMError(f"--init-from {folder!r} has {', '.join(f'{k}={getattr(src.cfg, k)}' for k in diff)}; "
                        f"valid: a policy with this run's {', '.join(f'{k}={getattr(policy.cfg, k)}' for k in diff)}")
    for k in ("base_model", "block", "gen_length"):
        if getattr(src.cfg, k) != getattr(policy.cfg, k):
            log.warning("--init-from %s was trained with %s=%s; this run has %s", folder, k,
                        getattr(src.cfg, k), getattr(policy.cfg, k))
    policy.load_state_dict(src.state_dict())
    log.info("policy initialised from %s", folder)


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


def train(cfg: GRPOConfig, resume: bool) -> None:
    from accelerate import Accelerator

    for k in ("steps", "group", "prompts_per_step", "inner_steps", "val_every", "val_size", "save_every", "batch_size"):
        if getattr(cfg, k) < 1:
            raise DLLMError(f"--{k.replace('_', '-')} {getattr(cfg, k)}; valid: a positive whole number")
    # without a GPU accelerate must be told so, or a launch leaves every process alone as rank 0
    acc = Accelerator(cpu=(cfg.device == "cpu" or not torch.cuda.is_available()))
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    env = Env(cfg, acc.device)
    features = tuple(f for f in cfg.features.split(",") if f)
    pcfg = PolicyConfig(features=features, hidden=cfg.hidden, ff=cfg.ff, heads=cfg.heads,
                        init=cfg.init, init_tau=cfg.init_tau, skip_gain=skip_gain(cfg),
                        base_model=env.model_id, task=cfg.task, block=env.block, gen_length=env.L)
    policy = UnmaskPolicy(pcfg)
    if cfg.init_from:
        start_from(policy, cfg.init_from)
    policy = policy.to(acc.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    step, best, prior_seconds = 0, -float("inf"), 0.0
    state_path = out / "trainer_state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
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
        out.mkdir(parents=True, exist_ok=True)
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

    bar = tqdm(total=cfg.steps, initial=step, desc="grpo", disable=not acc.is_main_process, dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.time()
        picks, seeds = step_prompts(cfg, step, len(train_prompts), acc.process_index, acc.num_processes)
        prompts = [train_prompts[i] for i in picks]
        traj, rewards, scores, nfes, _ = env.rollout(acc.unwrap_model(ddp_policy), prompts, seeds)
        adv = group_advantages(rewards, cfg.group)
        batch = {k: v.to(acc.device) for k, v in stack_steps(traj, features).items()}
        losses = update(ddp_policy, acc.unwrap_model(ddp_policy), opt, sched, batch, adv.to(acc.device), cfg, acc)
        step += 1
        m = torch.tensor([rewards.mean(), scores.mean(), nfes.mean()], device=acc.device)
        m = acc.reduce(m, reduction="mean").tolist()
        rec = {"step": step, "reward": m[0], "accuracy": m[1], "nfe": m[2], "loss": sum(losses) / len(losses),
               "lr": sched.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(reward=f"{m[0]:.3f}", acc=f"{m[1]:.2f}", nfe=f"{m[2]:.1f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            vm = validate(env, acc.unwrap_model(ddp_policy), val_prompts, acc, cfg.val_mode)
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
    bar.close()


@torch.no_grad()
def validate(env: Env, policy, prompts, acc, mode: str = "greedy") -> dict:
    """The policy in `mode` (sampling with fixed seeds, or greedy) on held-out prompts, sharded
    over processes. Greedy by default: what evaluation with `mode=greedy` runs, without the
    sampling noise that would otherwise decide which checkpoint is kept."""
    idx = range(acc.process_index, len(prompts), acc.num_processes)
    mine = [prompts[i] for i in idx]  # seeded by index in the whole set: the same draws whatever the split
    _, rewards, scores, nfes, _ = env.rollout(policy, mine, list(idx), mode=mode, record=False)
    m = torch.tensor([rewards.sum(), scores.sum(), nfes.sum(), float(len(mine))], device=acc.device)
    m = acc.reduce(m, reduction="sum").tolist()
    return {"reward": m[0] / m[3], "accuracy": m[1] / m[3], "nfe": m[2] / m[3]}


def parse_args(argv=None) -> tuple[GRPOConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # each flag's help: the comment on its GRPOConfig field, then its default
    notes = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*#\s*(.+)$", inspect.getsource(GRPOConfig), flags=re.M))
    for f in fields(GRPOConfig):
        flag = "--" + f.name.replace("_", "-")
        text = (notes[f.name] + " " if f.name in notes else "") + f"(default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}.get(str(f.type), str),
                           default=f.default, choices=CHOICES.get(f.name), help=text.replace("%", "%%"))
    p.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    return GRPOConfig(**a), resume


def main(argv=None) -> None:
    cfg, resume = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(cfg, resume)
    except DLLMError as e:
        raise SystemExit(f"train.grpo: error: {e}") from None


if __name__ == "__main__":
    main()
