"""One GRPO update on fixed rollouts, this process's share of them (run by tests/test_grpo_parallel.py).

    python tests/grpo_dp_worker.py OUT.pt                                              # all rollouts
    accelerate launch --multi_gpu --num_processes 2 tests/grpo_dp_worker.py OUT.pt   # half each

The rollouts are built from a fixed seed, not rolled out, so every process count sees the same
ones: 4 prompts x 4 rollouts, each rollout with 1-5 steps, so halves hold unequal step counts.
One update per --loss-norm, each from the same start; the main process saves the parameters
after each, {loss_norm: state_dict}.
"""

import sys

import torch
from accelerate import Accelerator

from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
from train.grpo import GRPOConfig, update
from train.grpo_loss import group_advantages

PROMPTS, GROUP, L = 4, 4, 16


def fixed_rollouts() -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    R = PROMPTS * GROUP
    steps = torch.randint(1, 6, (R,), generator=g)  # (R,) steps per rollout
    row = torch.repeat_interleave(torch.arange(R), steps)  # (N,)
    N, F = len(row), len(PolicyConfig.features)
    batch = {"inputs": (torch.rand(N, L, F, generator=g), torch.rand(N, generator=g)),
             "action": torch.rand(N, L, generator=g) < 0.3, "eligible": torch.rand(N, L, generator=g) < 0.8,
             "row": row}
    return batch, group_advantages(torch.rand(R, generator=g), GROUP)


def share(batch: dict, adv: torch.Tensor, rank: int, world: int) -> tuple[dict, torch.Tensor]:
    """Whole prompts (groups) per process, rows renumbered from 0 as train.grpo numbers them."""
    per = PROMPTS // world * GROUP
    lo, hi = rank * per, (rank + 1) * per
    keep = (batch["row"] >= lo) & (batch["row"] < hi)
    mine = {k: tuple(x[keep] for x in v) if isinstance(v, tuple) else v[keep] for k, v in batch.items()}
    mine["row"] = mine["row"] - lo
    return mine, adv[lo:hi]


def main(out: str) -> None:
    acc = Accelerator(cpu=True)
    batch, adv = share(*fixed_rollouts(), acc.process_index, acc.num_processes)
    params = {}
    for norm in ("step", "rollout"):
        torch.manual_seed(0)
        policy = UnmaskPolicy(PolicyConfig())
        cfg = GRPOConfig(loss_norm=norm)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ddp, opt = acc.prepare(policy, opt)
        update(ddp, acc.unwrap_model(ddp), opt, sched, batch, adv, cfg, acc)
        params[norm] = {k: v.detach().cpu().clone() for k, v in acc.unwrap_model(ddp).state_dict().items()}
    if acc.is_main_process:
        torch.save(params, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
