"""Plackett-Luce sampling of a step's commits, and its log-probability (no model, no I/O).

    python -m pytest tests/test_policy_grpo.py -k plackett -q

The paper's second policy sampling mode ("DPLS", its Appendix C), next to one Bernoulli coin per
position: at each step the policy's logits are utilities; a first position is drawn from their
softmax over the eligible positions (so a step always commits one), then further positions are
drawn in order, without replacement, from the rest plus a STOP item of fixed utility, until STOP
comes up. How many positions a step commits is thus decided by how many utilities beat STOP's.
"""

from __future__ import annotations

import torch


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))


def pl_sample(logits: torch.Tensor, eligible: torch.Tensor, stop: float,
              uniforms: torch.Tensor) -> torch.Tensor:
    """One Plackett-Luce step (the paper's "DPLS", Appendix C): a first position drawn from the
    softmax over the eligible ones (so every step commits one), then further positions drawn in
    order without replacement from the rest plus a STOP item of utility `stop`, until STOP comes.

    Both stages by the Gumbel-max trick: a draw without replacement in order is the ranking of the
    utilities plus Gumbel noise, and "until STOP" keeps what ranks above STOP's noisy utility.
    logits, eligible (b, L); uniforms (b, 2L + 1) in [0, 1). Returns rank (b, L) long: the order of
    each committed position (0 = the first pick), -1 where nothing was committed."""
    b, L = logits.shape
    u = logits.float().masked_fill(~eligible, float("-inf"))
    g = _gumbel(uniforms.float())
    first = (u + g[:, :L]).argmax(-1)  # (b,)
    z = (u + g[:, L:2 * L]).scatter(-1, first[:, None], float("-inf"))  # (b, L) the first is taken
    more = z > (stop + g[:, 2 * L:])  # (b, L) ranked above STOP
    order = torch.where(more, z, torch.full_like(z, float("-inf"))).argsort(-1, descending=True)
    rank = torch.full((b, L), -1, dtype=torch.long, device=logits.device)
    pos = torch.arange(1, L + 1, device=logits.device).expand(b, L)
    rank.scatter_(-1, order, torch.where(more.gather(-1, order), pos, -1))
    rank.scatter_(-1, first[:, None], 0)
    return rank


def pl_logprob(logits: torch.Tensor, rank: torch.Tensor, eligible: torch.Tensor, stop: float) -> torch.Tensor:
    """(b,) log-probability under `pl_sample` of the ordered commits `rank` (b, L; -1 = not
    committed, 0.. the order), every row with at least one commit. Stage 1: log softmax of the
    first pick over the eligible positions. Stage 2: each later pick against what had not been
    picked yet plus STOP, then STOP against what was never picked: one sort by rank and a reverse
    running logsumexp, O(L log L) per row."""
    b, L = logits.shape
    u = logits.float().masked_fill(~eligible, float("-inf"))
    chosen = rank >= 0
    first = (rank == 0).long().argmax(-1)  # (b,)
    lp1 = u.gather(-1, first[:, None]).squeeze(-1) - torch.logsumexp(u, -1)
    # stage 2 over the rest: picks in rank order, then every never-picked eligible position
    key = torch.where(chosen, rank.float(), torch.where(eligible, float(L + 1), float(L + 2)))
    key = key.scatter(-1, first[:, None], -1.0)  # the first pick leaves stage 2
    order = key.argsort(-1)
    us = u.gather(-1, order).scatter(-1, torch.zeros_like(first[:, None]), float("-inf"))  # (b, L)
    tail = torch.logcumsumexp(us.flip(-1), -1).flip(-1)  # logsumexp of us[j:]
    stop_t = torch.full_like(tail, float(stop))
    norm = torch.logaddexp(tail, stop_t)  # (b, L): at sorted slot j, what is still in the draw
    n = chosen.sum(-1)  # picks, the first included
    slot = torch.arange(L, device=logits.device).expand(b, L)
    picked = (slot >= 1) & (slot < n[:, None])
    lp2 = torch.where(picked, us - norm, torch.zeros_like(us)).sum(-1)
    # STOP at slot n (its normaliser: the never-picked ones plus STOP; all picked: STOP alone)
    rest = torch.where(n[:, None] < L, tail.gather(-1, n.clamp(max=L - 1)[:, None]),
                       torch.full_like(n[:, None], float("-inf"), dtype=tail.dtype)).squeeze(-1)
    lp_stop = stop - torch.logaddexp(rest, torch.full_like(rest, float(stop)))
    return lp1 + lp2 + lp_stop
