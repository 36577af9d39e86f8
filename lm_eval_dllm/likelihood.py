"""Log-likelihoods of a masked diffusion LM: the Monte-Carlo estimate of its ELBO, as LLaDA scores them.

    lm_eval --model dllm --model_args mc_num=128,mc_batch=8 --tasks modchain_mc

A dLLM has no left-to-right factorisation, so log p(target | context) is bounded from below by the
masked-diffusion ELBO, which LLaDA's own evaluation estimates (facts from its public
`get_log_likelihood`): draw k, the number of masked target tokens, uniformly from 1..|target|;
mask k target positions chosen at random (the context is never masked); the draw scores
(|target| / k) * sum of log p(token) over the masked positions; average over `mc_num` draws. The k
of a group of `mc_batch` draws are stratified (evenly spread over 1..|target| from one random
offset), which lowers the variance and leaves the mean unbiased.

When `mc_num` >= 2^|target| - 1 (every mask pattern), the expectation is computed exactly instead,
each pattern weighted by its probability: cheaper and noise-free (one forward for a one-token
target, as in MMLU). Every draw is planned from one generator seeded per request, so a request's
value does not depend on which other requests share its forward batch, nor on their order.

`is_greedy`: every target token is the model's argmax at its position when the whole target is
masked at once (one extra forward unless the plan already has that pattern). LLaDA's own check
unmasks the target one most-confident token at a time (|target| forwards); the two rules can
disagree (a later token may be the argmax only once earlier ones are visible).

Pure helpers (`mask_counts`, `draw_masks`, `all_patterns`, `plan`, `rolling_windows`) plus one
batched runner, `elbo_loglikelihoods`, that is handed the model as a `forward(ids, attn)` strategy,
as `decode.diffuse` is. Dream's shifted logits (the logit for position i sits at i - 1) come from
the FamilySpec.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .cache import FullForward
from .decode import Forward, left_pad
from .spec import FamilySpec
from .utils import DLLMError

EXACT_MAX_TOKENS = 16  # enumerate every mask pattern only for targets this short (2^16 rows at most)


def mask_counts(L: int, n: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) numbers of masked tokens in 1..L; each group of `group` draws is stratified.

    Within a group, t_j = (u + j) / group for one u ~ U[0, 1), and k_j = floor(t_j L) + 1: each
    k_j is spread over its own slice of 1..L, and the mean over a group is an unbiased estimate
    of the mean over k ~ U{1..L}.
    """
    out = []
    for start in range(0, n, group):
        g = min(group, n - start)
        u = torch.rand((), generator=gen, dtype=torch.float64)
        t = (u + torch.arange(g, dtype=torch.float64)) / g  # (g,) in [0, 1)
        out.append((t * L).floor().long().clamp(max=L - 1) + 1)
    return torch.cat(out)


def draw_masks(L: int, n: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (n, L) bool, k (n,)): k_j from `mask_counts`, then k_j target positions at random."""
    k = mask_counts(L, n, group, gen)
    masks = torch.zeros((n, L), dtype=torch.bool)
    for j in range(n):
        masks[j, torch.randperm(L, generator=gen)[: int(k[j])]] = True
    return masks, k


def all_patterns(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-empty mask pattern of L target tokens and its weight in the exact ELBO.

    ELBO = sum_k (1/L) sum_{|M| = k} (1 / C(L, k)) (L / k) sum_{i in M} log p_i, so a pattern of
    k masked tokens carries weight 1 / (k C(L, k)). Returns (masks (2^L - 1, L) bool, weights).
    """
    rows, weights = [], []
    for k in range(1, L + 1):
        w = 1.0 / (k * math.comb(L, k))
        for idx in itertools.combinations(range(L), k):
            m = torch.zeros(L, dtype=torch.bool)
            m[list(idx)] = True
            rows.append(m)
            weights.append(w)
    return torch.stack(rows), torch.tensor(weights, dtype=torch.float64)


def plan(L: int, mc_num: int, mc_batch: int, seed: int, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask patterns to score for one target of L tokens and their weights: (masks (n, L), w (n,)).

    The estimate is sum_r w_r * sum_{i masked in r} log p(target_i | row r). exact=None enumerates
    every pattern when that takes no more rows than mc_num draws (and L <= EXACT_MAX_TOKENS).
    """
    if L < 1:
        raise DLLMError(f"empty target (L={L}); valid: at least one target token")
    if exact is None:
        exact = L <= EXACT_MAX_TOKENS and 2**L - 1 <= mc_num
    if exact:
        return all_patterns(L)
    gen = torch.Generator().manual_seed(int(seed))
    masks, k = draw_masks(L, mc_num, mc_batch, gen)
    return masks, (L / k.double()) / mc_num


def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the tokenizer splits context + continuation.

    Split at the context's own tokens when the joint encoding starts with them (a character
    tokenizer, a context ending at a word boundary); otherwise move the context's trailing
    whitespace into the continuation first, as lm-eval's HF model does for BPE tokenizers.
    """
    ctx, whole = encode(context), encode(context + continuation)
    if whole[:len(ctx)] != ctx:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx, whole = encode(context), encode(context + continuation)
    if len(whole) <= len(ctx):
        raise DLLMError(f"continuation {continuation!r} has no tokens of its own; valid: a non-empty continuation")
    return ctx, whole[len(ctx):]


def rolling_windows(ids: list[int], max_length: int, prefix: int) -> list[tuple[list[int], list[int]]]:
    """A document's tokens as disjoint (context, target) windows that each fit max_length.

    The first window's context is the one `prefix` token (BOS, else EOS); each later window's
    target is the next max_length // 2 tokens and its context the max_length - len(target)
    tokens before them. Each token is a target exactly once, so the document's log-likelihood
    is the sum over windows; every window after the first sees half a context of history.
    """
    if max_length < 2:
        raise DLLMError(f"max_length={max_length}; valid: at least 2 (one context and one target token)")
    out = []
    first = ids[: max_length - 1]
    if first:
        out.append(([prefix], first))
    step = max_length // 2
    for start in range(len(first), len(ids), step):
        tgt = ids[start:start + step]
        out.append((ids[max(0, start - (max_length - len(tgt))):start], tgt))
    return out


@dataclass
class _Req:
    ctx: list[int]
    tgt: list[int]
    masks: torch.Tensor  # (n, L) bool
    weights: torch.Tensor  # (n,) float64
    greedy_row: int  # index of the all-masked row in masks (appended if the plan lacked it)
    row_scores: list[float] = field(default_factory=list)
    greedy: bool = False


def _rows(reqs: list[_Req]) -> Iterable[tuple[int, int]]:
    """(request, row) pairs, longest requests first so a forward batch pads little."""
    order = sorted(range(len(reqs)), key=lambda i: (-(len(reqs[i].ctx) + len(reqs[i].tgt)), i))
    for i in order:
        for r in range(reqs[i].masks.shape[0]):
            yield i, r


@torch.no_grad()
def elbo_loglikelihoods(
    forward: Forward,
    pairs: list[tuple[list[int], list[int], int]],
    spec: FamilySpec,
    mc_num: int,
    mc_batch: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    exact: bool | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[tuple[float, bool, int]]:
    """(ELBO estimate, is_greedy, forwards) for each (context ids, target ids, seed).

    A forward batch holds `batch_size` rows (draws of one or more requests, left-padded); the
    value of a request depends only on its own ids and seed. on_done(n) reports finished requests.
    """
    if spec.block_causal:  # its likelihood is a per-block one under block attention, not this ELBO
        raise DLLMError(f"loglikelihood is not supported for the block-diffusion family {spec.family}; "
                        f"valid: generation tasks (generate_until), or a masked family")
    reqs = []
    for ctx, tgt, seed in pairs:
        if not ctx:
            raise DLLMError("empty context; valid: at least one token (a BOS/EOS prefix)")
        masks, w = plan(len(tgt), mc_num, mc_batch, seed, exact)
        full = masks.all(-1).nonzero()
        if len(full):
            g = int(full[0])
        else:  # one extra row for is_greedy, weight 0
            masks = torch.cat([masks, torch.ones((1, len(tgt)), dtype=torch.bool)])
            w = torch.cat([w, torch.zeros(1, dtype=torch.float64)])
            g = masks.shape[0] - 1
        reqs.append(_Req(ctx, tgt, masks, w, g, [0.0] * masks.shape[0]))
    left = [r.masks.shape[0] for r in reqs]
    device = torch.device(device)
    strategy = forward if hasattr(forward, "start_block") else FullForward(forward)  # takes out_from
    shift = 1 if spec.shifted else 0
    it = _rows(reqs)
    while batch := list(itertools.islice(it, batch_size)):
        T = max(len(reqs[i].ctx) + len(reqs[i].tgt) for i, _ in batch)
        seqs, tgt_pos, tgt_tok, row_of = [], [], [], []  # masked target positions in the padded batch
        for b, (i, r) in enumerate(batch):
            q = reqs[i]
            seq = torch.tensor(q.ctx + q.tgt, dtype=torch.long)
            P, L = len(q.ctx), len(q.tgt)
            tgt = seq[P:].clone()
            seq[P:] = torch.where(q.masks[r], spec.mask_id, tgt)  # the context is never masked
            seqs.append(seq)
            pos = (T - L + q.masks[r].nonzero().squeeze(-1)).tolist()
            tgt_pos += pos
            tgt_tok += tgt[q.masks[r]].tolist()
            row_of += [b] * len(pos)
        ids, attn = left_pad(seqs, T, spec.pad_id, device)  # as the decode loop lays rows out
        # the one forward, its logits from the first target column on (targets end every row)
        first = T - max(len(reqs[i].tgt) for i, _ in batch) - shift
        logits = strategy(ids, attn, first)  # (b, T - first, V)
        rows = torch.tensor(row_of, device=logits.device)
        cols = torch.tensor(tgt_pos, device=logits.device) - shift - first
        lp = F.log_softmax(logits[rows, cols].float(), dim=-1)  # (n_masked, V)
        tok = torch.tensor(tgt_tok, device=logits.device)
        tok_lp = lp.gather(-1, tok[:, None]).squeeze(-1).double().cpu()  # (n_masked,)
        hit = (lp.argmax(-1) == tok).cpu()
        n = 0
        for b, (i, r) in enumerate(batch):
            k = int(reqs[i].masks[r].sum())
            reqs[i].row_scores[r] = float(tok_lp[n:n + k].sum())
            if r == reqs[i].greedy_row:
                reqs[i].greedy = bool(hit[n:n + k].all())
            n += k
            left[i] -= 1
            if left[i] == 0 and on_done is not None:
                on_done(1)
    out = []
    for q in reqs:
        scores = torch.tensor(q.row_scores, dtype=torch.float64)
        out.append((float((q.weights * scores).sum()), q.greedy, q.masks.shape[0]))
    return out
