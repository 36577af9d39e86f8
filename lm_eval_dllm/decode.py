"""The one decode loop of a masked diffusion LM, for evaluation and RL rollouts alike.

The canvas is prompt + L mask tokens, filled block by block (block size B; B = L is full
diffusion). Each step is one forward pass over the canvas for the rows that still have masked
positions in the current block; the model proposes a token x0 for every position; the sampler
picks which masked positions of the block to commit; committed tokens never change.

NFE is counted in exactly one place: where `forward` is called, once per row it runs on.

Early exit: once a row has committed a stop token (EOS / end of turn) and every position before
it is committed, the text up to that token is final whatever the rest would become, so the rest
is filled with padding and the row costs no further forward.

The model is a strategy (lm_eval_dllm.cache): told where each block starts, it returns logits for
a span of the canvas each step: everything (cache=none, or a plain `forward(ids, attn) ->
logits`), or only what a key/value cache recomputes (prefix, dual). The statistics of positions
outside the span are those of the last forward that computed them. The same loop serves every
family; the family's one difference (Dream's logits are shifted one position) comes from the
FamilySpec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import FullForward, forward_strategy, positions_from
from .models import NativeDLLM
from .samplers.base import Sampler, StepState, row_uniforms
from .spec import FamilySpec
from .utils import DLLMError

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, attn) -> (B, T, V) logits


@dataclass
class StepRecord:
    """One step of a batch, enough to replay a policy over it without the dLLM."""

    rows: torch.Tensor  # (b,) indices of the rows that ran this step
    conf: torch.Tensor  # (b, L)
    margin: torch.Tensor  # (b, L)
    entropy: torch.Tensor  # (b, L)
    masked: torch.Tensor  # (b, L) bool, before the commit
    eligible: torch.Tensor  # (b, L) bool
    action: torch.Tensor  # (b, L) bool, what was committed
    block: int
    num_blocks: int
    step: int
    rank: torch.Tensor | None = None  # (b, L) long, the order of the commits (ordered samplers only)


@dataclass
class DecodeOutput:
    tokens: torch.Tensor  # (B, L) generated region; positions after an early exit hold pad
    nfe: torch.Tensor  # (B,) forward passes each row took part in
    committed: torch.Tensor  # (B,) positions the sampler committed (early-exit fill excluded)
    positions: torch.Tensor  # (B,) real (non-padding) positions the forwards computed, summed
    trajectory: list[StepRecord] | None = None


def check_block(block: int | None, gen_length: int) -> int:
    """The effective block size: B >= L means full diffusion; otherwise B must divide L."""
    if gen_length <= 0:
        raise DLLMError(f"gen_length={gen_length} must be a positive integer; valid: 1, 2, ...")
    if block is None:
        return gen_length
    if block <= 0:
        raise DLLMError(f"block={block} must be a positive integer; valid: a divisor of "
                        f"gen_length={gen_length}, or >= it for full diffusion")
    if block >= gen_length:
        return gen_length
    if gen_length % block:
        divs = [d for d in range(1, gen_length + 1) if gen_length % d == 0]
        raise DLLMError(f"block={block} does not divide gen_length={gen_length}; valid: "
                        f"{', '.join(map(str, divs))}, or >= {gen_length} for full diffusion")
    return block


# Elements of one chunk of the statistics' float32 temporaries (16 MB each). The statistics need
# log-probabilities, probabilities and entropy terms over the whole vocabulary; for LLaDA
# (V = 126,464) at L = 256 one such tensor is 130 MB per row, so holding them for the whole batch
# caps the batch long before the model does. Chunks of at least 32 positions keep the per-position
# reductions on the same kernels as one pass over everything (bitwise-equal results on CPU).
CHUNK_ELEMENTS = 1 << 22


def propose(logits: torch.Tensor, temperature: float, generators: list[torch.Generator],
            chunk_elements: int = CHUNK_ELEMENTS, length: int | None = None, offset: int = 0):
    """Token proposal and its statistics. logits: (b, L, V) float -> x0, conf, margin, entropy.

    Computed chunk by chunk (whole rows while they fit in `chunk_elements`, else runs of positions
    of one row), so the extra memory is a few chunks plus, with temperature, one row's noise.
    logits may be positions [offset, offset + L) of a `length`-long region (a cached step's
    span): the noise is drawn for the whole region, as ever, and the span's part used, so a
    position's draw does not depend on the cache mode.
    """
    b, L, V = logits.shape
    rows_per = max(1, chunk_elements // (L * V))  # rows per group; 1 when one row is bigger than a chunk
    pos_per = L if rows_per > 1 else min(L, max(32, chunk_elements // V))  # positions per chunk
    x0 = torch.empty((b, L), dtype=torch.long, device=logits.device)
    conf, margin, entropy = (torch.empty((b, L), dtype=logits.dtype, device=logits.device)
                             for _ in range(3))
    for r in range(0, b, rows_per):
        rs = slice(r, r + rows_per)
        if temperature > 0:
            # Gumbel-max with each row's own generator: a row's draw does not depend on its batch.
            # Drawn as one (L, V) call per row, as ever, so the stream is the same on every device
            u = row_uniforms(generators[rs], (length or L, V), logits.device)[:, offset:offset + L]  # (r, L, V)
        for s in range(0, L, pos_per):
            ps = slice(s, s + pos_per)
            lg = logits[rs, ps]  # (r, c, V)
            if temperature > 0:
                lg = lg / temperature
            logp = F.log_softmax(lg, dim=-1)  # (r, c, V)
            p = logp.exp()
            if temperature > 0:
                x0[rs, ps] = (logp - torch.log(-torch.log(u[:, ps].clamp_min(1e-20)))).argmax(-1)
            else:
                x0[rs, ps] = lg.argmax(-1)
            conf[rs, ps] = p.gather(-1, x0[rs, ps, None]).squeeze(-1)
            top2 = p.topk(2, dim=-1).values  # (r, c, 2)
            margin[rs, ps] = top2[..., 0] - top2[..., 1]
            entropy[rs, ps] = torch.special.entr(p).sum(-1)  # 0 log 0 = 0
            del logp, p  # free this chunk's temporaries before the next chunk allocates its own
    return x0, conf, margin, entropy


def _finished(gen: torch.Tensor, mask_id: int, stop: torch.Tensor) -> torch.Tensor:
    """(b,) rows whose first stop token is committed with everything before it committed."""
    is_stop = torch.isin(gen, stop)  # (b, L); masks are never stop tokens
    has = is_stop.any(-1)
    first = is_stop.float().argmax(-1)  # (b,) first stop position (0 if none)
    before = torch.arange(gen.shape[1], device=gen.device)[None, :] < first[:, None]
    open_before = ((gen == mask_id) & before).any(-1)
    return has & ~open_before


@torch.no_grad()
def diffuse(
    forward: Forward | FullForward,
    prompts: list[list[int]],
    spec: FamilySpec,
    sampler: Sampler,
    gen_length: int,
    block: int | None = None,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
    early_exit: bool = True,
    record: bool = False,
    device: torch.device | str = "cpu",
) -> DecodeOutput:
    """Generate gen_length tokens after each prompt (a list of token ids), batched.

    forward: a strategy of lm_eval_dllm.cache, or a plain `forward(ids, attn) -> logits`."""
    strategy = forward if hasattr(forward, "start_block") else FullForward(forward)
    L = gen_length
    Bk = check_block(block, L)
    nb = L // Bk
    B, P = len(prompts), max(len(p) for p in prompts)
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:  # at every batch size: a row is refused for itself, not for its batch
        raise DLLMError(f"empty prompt (row {empty[0]} of {B}); valid: at least one prompt token")
    device = torch.device(device)
    # the prompt ends at column P - 1 in every row, the L masks follow
    canvas, attn = left_pad([list(p) + [spec.mask_id] * L for p in prompts], P + L, spec.pad_id, device)
    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    seeds = seeds if seeds is not None else list(range(B))
    gens = [torch.Generator(device=gen_dev).manual_seed(int(s)) for s in seeds]
    stop = torch.tensor(spec.stop_ids or [-1], device=device)
    suppress = list(spec.suppress_ids)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    committed = torch.zeros(B, dtype=torch.long, device=device)
    positions = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    traj: list[StepRecord] | None = [] if record else None
    pos = torch.arange(L, device=device)[None, :]
    shift = 1 if spec.shifted else 0  # the logit of generated position j sits at column P + j - shift
    # per row, the statistics of every position from the last forward that computed it
    x0_all = torch.zeros((B, L), dtype=torch.long, device=device)
    conf_all, margin_all, entropy_all = (torch.zeros((B, L), device=device) for _ in range(3))

    for b in range(nb):
        in_block = (pos >= b * Bk) & (pos < (b + 1) * Bk)  # (1, L)
        # the block's columns, and for Dream the one before it (which holds the first one's logit)
        strategy.start_block(P + b * Bk - shift, P + (b + 1) * Bk)
        step = 0
        while True:
            gen = canvas[:, P:]  # (B, L) view
            masked = gen == spec.mask_id
            eligible = masked & in_block & ~done[:, None]
            rows = eligible.any(-1).nonzero().squeeze(-1)  # (b,)
            if rows.numel() == 0:
                break
            logits, start = strategy.step(canvas[rows], attn[rows], rows)  # (b, span, V): the one forward
            nfe[rows] += 1
            positions[rows] += attn[rows, start:start + logits.shape[1]].sum(-1)
            g0 = max(start + shift - P, 0)  # generated positions [g0, g1) the span has logits for
            g1 = min(start + logits.shape[1] + shift - P, L)
            if g0 > b * Bk or g1 < (b + 1) * Bk:
                raise RuntimeError(f"forward strategy returned columns from {start} for "
                                   f"{logits.shape[1]}, which miss block {b}")
            lg = logits[:, P + g0 - shift - start:P + g1 - shift - start].float()  # (b, g1 - g0, V)
            lg[..., suppress] = float("-inf")
            row_gens = [gens[i] for i in rows.tolist()]
            stats = propose(lg, temperature, row_gens, length=L, offset=g0)
            for full, new in zip((x0_all, conf_all, margin_all, entropy_all), stats):
                full[rows, g0:g1] = new.to(full.dtype)
            x0, conf, margin, entropy = x0_all[rows], conf_all[rows], margin_all[rows], entropy_all[rows]
            state = StepState(conf=conf, margin=margin, entropy=entropy, masked=masked[rows],
                              eligible=eligible[rows], generators=row_gens)
            sampler.last_rank = None
            action = sampler.select(state)
            _check_action(sampler, action, state.eligible)
            if traj is not None:
                traj.append(StepRecord(rows=rows.cpu(), conf=conf.cpu(), margin=margin.cpu(),
                                       entropy=entropy.cpu(), masked=state.masked.cpu(),
                                       eligible=state.eligible.cpu(), action=action.cpu(),
                                       block=b, num_blocks=nb, step=step,
                                       rank=None if sampler.last_rank is None else sampler.last_rank.cpu()))
            new = torch.where(action, x0, gen[rows])
            committed[rows] += action.sum(-1)
            if early_exit:
                fin = _finished(new, spec.mask_id, stop)
                if fin.any():
                    # the text ends at the first stop token: what follows can only be padding
                    new[fin] = torch.where(new[fin] == spec.mask_id, spec.pad_id, new[fin])
                    done[rows[fin]] = True
            canvas[rows, P:] = new
            step += 1
    strategy.release()
    return DecodeOutput(tokens=canvas[:, P:].clone(), nfe=nfe, committed=committed,
                        positions=positions, trajectory=traj)


def _check_action(sampler: Sampler, action: torch.Tensor, eligible: torch.Tensor) -> None:
    if action.shape != eligible.shape or action.dtype != torch.bool:
        raise RuntimeError(f"sampler {sampler.name!r} returned {tuple(action.shape)} "
                           f"{action.dtype}; expected {tuple(eligible.shape)} torch.bool")
    if (action & ~eligible).any():
        raise RuntimeError(f"sampler {sampler.name!r} committed a position outside the masked "
                           f"positions of the current block")
    if (eligible.any(-1) & ~action.any(-1)).any():
        raise RuntimeError(f"sampler {sampler.name!r} committed nothing in a step; every step "
                           f"must commit at least one masked position of the current block")


def left_pad(rows: list, width: int, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids (lists or 1-D tensors) right-aligned in a (len(rows), width) canvas of `pad_id`, and its attention mask (1 on
    real tokens): left padding, as the decode loop and the ELBO batches both lay rows out, so that
    each row's last token is in the last column and its positions count from its first token."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long, device=device)
            attn[i, width - len(r):] = 1
    return ids, attn


def model_forward(model, spec: FamilySpec, cache: str = "none", refresh: int = 0, window: int = 0):
    """The model's forward strategy for the decode loop: the plain full forward (cache=none), or
    the key/value cache `cache` (with `refresh`, `window`: lm_eval_dllm.cache) over it. Callable
    as `forward(ids, attn)`.

    A native model (LLaDA, Dream) takes the ids, the 2-D mask and positions counted from each
    row's first real token. Other models take transformers' keywords: a 2-D attention_mask, or,
    where the family's code wants it (spec.mask_4d: Dream's remote code), what its own generation
    code passes for a padded batch: a 4-D bool mask (B, 1, T, T) of real query/key pairs and
    position ids counted from the first real token (1 on padding), and "full" when nothing is
    padded."""

    @torch.no_grad()
    def forward(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if isinstance(model, NativeDLLM):
            return model(ids, attn, positions_from(attn))[0]
        if not spec.mask_4d:
            out = model(input_ids=ids, attention_mask=attn)
        elif bool(attn.all()):
            out = model(input_ids=ids, attention_mask="full")
        else:
            real = attn.bool()
            mask = real[:, None, None, :] & real[:, None, :, None]  # (B, 1, T, T)
            pos = positions_from(attn).masked_fill(~real, 1)  # (B, T)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        return out.logits if hasattr(out, "logits") else out[0]

    return forward_strategy(model, forward, cache, refresh, window)
