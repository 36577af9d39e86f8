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

`compat=fast-dllm` (lm_eval_dllm.compat) reproduces Fast-dLLM's loops where ours differs by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .blocks import BlockLayout, block_layout
from .cache import CachedForward, FullForward, check_cache_support, forward_strategy, positions_from, span_forward
from .compat import Compat, check_compat
from .models import NativeDLLM
from .samplers.base import STATISTICS, Action, Sampler, StepState, row_uniforms
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
    top: torch.Tensor | None = None  # (b, L, K) top-K token probabilities (samplers that read them)
    steps: torch.Tensor | None = None  # (b,) decode steps each row took before this one
    hidden: torch.Tensor | None = None  # (b, L, D) the dLLM's last hidden states (samplers that read them)
    block_start: int = 0  # the generated position the block (the span the policy saw) starts at
    block_size: int = 0

    @classmethod
    def of(cls, rows, state: StepState, action: Action, block: int, num_blocks: int, step: int) -> "StepRecord":
        """The record of one step, on the CPU."""
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return cls(rows=rows.cpu(), conf=state.conf.cpu(), margin=state.margin.cpu(), entropy=state.entropy.cpu(),
                   masked=state.masked.cpu(), eligible=state.eligible.cpu(), action=action.commit.cpu(), block=block,
                   num_blocks=num_blocks, step=step, rank=cpu(action.rank), top=cpu(state.top), steps=cpu(state.steps),
                   hidden=cpu(state.hidden), block_start=state.block_start, block_size=state.block_size)


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
            chunk_elements: int = CHUNK_ELEMENTS, length: int | None = None, offset: int = 0, top_k: int = 0,
            statistics: frozenset[str] = STATISTICS):
    """Token proposal and its statistics. logits: (b, L, V) float -> x0, conf, margin, entropy, and
    top (b, L, top_k) the top_k highest probabilities (None when top_k is 0). margin and entropy are
    computed only if `statistics` names them (else None); x0 and conf are the same either way.

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
    conf = torch.empty((b, L), dtype=logits.dtype, device=logits.device)
    margin, entropy = (torch.empty((b, L), dtype=logits.dtype, device=logits.device) if s in statistics else None
                       for s in ("margin", "entropy"))
    k = max(2, top_k) if margin is not None else top_k  # the top probabilities to find: the margin needs two
    top = torch.empty((b, L, top_k), dtype=logits.dtype, device=logits.device) if top_k else None
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
            if k:
                top2 = p.topk(k, dim=-1).values  # (r, c, k)
                if margin is not None:
                    margin[rs, ps] = top2[..., 0] - top2[..., 1]
                if top_k:
                    top[rs, ps] = top2[..., :top_k]
            if entropy is not None:
                entropy[rs, ps] = torch.special.entr(p).sum(-1)  # 0 log 0 = 0
            del logp, p  # free this chunk's temporaries before the next chunk allocates its own
    return x0, conf, margin, entropy, top


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
    record_top: int = 0,
    compat: str | Compat = "none",
    record_hidden: bool = False,
) -> DecodeOutput:
    """Generate gen_length tokens after each prompt (a list of token ids), batched.

    forward: a strategy of lm_eval_dllm.cache, or a plain `forward(ids, attn) -> logits`.
    record_top: top token probabilities to compute (and record) even if the sampler reads fewer,
    for a policy that replays the trajectory (an expert's rollout, replayed by the paper's policy);
    record_hidden: the same for the dLLM's last hidden states (a dit_hidden policy replays them). A
    sampler that reads them (`reads_hidden`) gets them in StepState.hidden: the output of the model's
    final norm, kept per position from the last forward that computed it, as the statistics are.
    compat: "none", or "fast-dllm" (lm_eval_dllm.compat; it turns early_exit off)."""
    strategy = forward if hasattr(forward, "start_block") else FullForward(forward)
    cached = isinstance(strategy, CachedForward)
    mode = check_compat(compat, strategy.refresh, strategy.window) if cached else check_compat(compat)
    Bk = check_block(block, gen_length)
    # what a sampler may ask of the loop (a duck-typed one, with select alone, asks nothing but the
    # statistics, which it gets all of); a recorded trajectory keeps every statistic a policy replays
    k_top = max(getattr(sampler, "top_probs", lambda: 0)(), record_top)
    stats = frozenset(getattr(sampler, "statistics", lambda: STATISTICS)())
    if stats - STATISTICS:
        raise DLLMError(f"sampler {type(sampler).__name__}: statistics() names {sorted(stats - STATISTICS)[0]!r}; "
                        f"valid: a subset of {', '.join(sorted(STATISTICS))}")
    stats = STATISTICS if record else stats
    may_pass = getattr(sampler, "may_commit_nothing", lambda: False)()
    tap = _hidden_tap(strategy, getattr(sampler, "reads_hidden", lambda: False)() or record_hidden)
    run = _Run(strategy, prompts, spec, gen_length, Bk, mode, device, k_top, tap, stats)
    early_exit = early_exit and mode.early_exit
    gens = run.generators(seeds)
    traj: list[StepRecord] | None = [] if record else None
    nb = run.lay.count
    for b in range(nb):
        in_block = run.lay.in_block(b)  # (B, W)
        lo, hi = run.start_block(b)
        step = 0
        while not (may_pass and step >= Bk):  # a sampler that may pass gets Bk steps a block (the paper's cap)
            masked = run.generated() == spec.mask_id  # (B, W)
            eligible = masked & in_block & ~run.done[:, None]
            rows = (eligible.any(-1) | run.noop).nonzero().squeeze(-1)  # (b,)
            if rows.numel() == 0:
                break
            x0, state = run.step(rows, b, temperature, [gens[i] for i in rows.tolist()], masked, eligible)
            action = Action.of(sampler.select(state))
            _check_action(sampler, action.commit, state.eligible, may_pass)
            if traj is not None:
                traj.append(StepRecord.of(rows, state, action, b, nb, step))
            run.commit(rows, action.commit, x0, early_exit)
            if step == 0 and cached and mode.noop_forward:
                run.owe_noop(rows, in_block)
            step += 1
    strategy.release()
    if tap is not None:
        tap.set(False)
    return run.output(traj)


class _Run:
    """One `diffuse` call's canvas and per-row tallies, and the two halves of a step: the forward
    with its proposal (`step`), and the commit of the sampler's action (`commit`)."""

    def __init__(self, strategy, prompts: list[list[int]], spec: FamilySpec, L: int, Bk: int,
                 mode: Compat, device, k_top: int, tap=None, statistics: frozenset[str] = STATISTICS):
        self.strategy, self.spec, self.mode, self.L, self.k_top = strategy, spec, mode, L, k_top
        self.statistics = statistics
        self.tap, self.hidden_all = tap, None  # (B, W, D) in the model's dtype, from the first forward on
        self.lay = block_layout([len(p) for p in prompts], L, Bk, spec.block_causal, device)
        W = self.lay.width  # W = L unless blocks align to absolute positions
        if spec.block_causal:
            strategy.attend_blocks(Bk)
        self.device = device = torch.device(device)
        self.canvas, self.attn = _canvas(prompts, spec, self.lay, device)
        B, self.P = len(prompts), self.canvas.shape[1] - W
        self.stop = torch.tensor(spec.stop_ids or [-1], device=device)
        self.suppress = list(spec.suppress_ids) if mode.suppress_mask else []
        self.nfe, self.committed, self.positions = (torch.zeros(B, dtype=torch.long, device=device) for _ in range(3))
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.noop = torch.zeros(B, dtype=torch.bool, device=device)  # compat: rows owed a forward that commits nothing
        self.shift = 1 if spec.shifted else 0  # the logit of generated position j sits at column P + j - shift
        # per row, the statistics of every position from the last forward that computed it
        self.x0_all = torch.zeros((B, W), dtype=torch.long, device=device)
        self.conf_all, self.margin_all, self.entropy_all = (torch.zeros((B, W), device=device, dtype=mode.stats_dtype)
                                                            for _ in range(3))
        self.top_all = torch.zeros((B, W, k_top), device=device)

    def generators(self, seeds: list[int] | None) -> list[torch.Generator]:
        """One per row, seeded by `seeds` (default: the row index), on the device's generator type."""
        gen_dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        seeds = seeds if seeds is not None else list(range(self.canvas.shape[0]))
        return [torch.Generator(device=gen_dev).manual_seed(int(s)) for s in seeds]

    def generated(self) -> torch.Tensor:
        return self.canvas[:, self.P:]  # (B, W) view of the generated region

    def start_block(self, b: int) -> tuple[int, int]:
        """Tell the strategy block b starts; its generated positions [lo, hi)."""
        lo, hi = self.lay.span(b)
        P, shift = self.P, self.shift
        # the block's columns, and for Dream the one before it (which holds the first one's logit)
        self.strategy.start_block(P + lo - shift, P + hi, P - shift)  # logits from P - shift on
        self.lo, self.hi = lo, hi
        return lo, hi

    def step(self, rows, b: int, temperature: float, row_gens, masked, eligible) -> tuple[torch.Tensor, StepState]:
        """The one forward of a step for `rows` (where NFE is counted), its proposal x0 (b, W), and
        what the sampler sees."""
        P, shift, W, lo, hi = self.P, self.shift, self.lay.width, self.lo, self.hi
        logits, start, computed = self.strategy.step(self.canvas[rows], self.attn[rows], rows)  # (b, span, V)
        self.nfe[rows] += 1
        self.positions[rows] += self.attn[rows, computed:start + logits.shape[1]].sum(-1)
        g0 = max(start + shift - P, 0)  # generated positions [g0, g1) the span has logits for
        g1 = min(start + logits.shape[1] + shift - P, W)
        if g0 > lo or g1 < hi:
            raise RuntimeError(f"forward strategy returned columns from {start} for "
                               f"{logits.shape[1]}, which miss block {b}")
        lg = logits[:, P + g0 - shift - start:P + g1 - shift - start].to(self.mode.stats_dtype)  # (b, g1 - g0, V)
        lg[..., self.suppress] = float("-inf")
        stats = propose(lg, temperature, row_gens, length=W, offset=g0, top_k=self.k_top, statistics=self.statistics)
        for full, new in zip((self.x0_all, self.conf_all, self.margin_all, self.entropy_all, self.top_all), stats):
            if new is not None:
                full[rows, g0:g1] = new.to(full.dtype)
        if self.tap is not None:
            self._keep_hidden(rows, start + logits.shape[1])
        state = StepState(conf=self.conf_all[rows],  # margin, entropy: None where the sampler does without them
                          margin=self.margin_all[rows] if "margin" in self.statistics else None,
                          entropy=self.entropy_all[rows] if "entropy" in self.statistics else None,
                          masked=masked[rows], eligible=eligible[rows], generators=row_gens,
                          top=self.top_all[rows] if self.k_top else None, steps=self.nfe[rows] - 1,
                          hidden=None if self.tap is None else self.hidden_all[rows],
                          block_start=lo, block_size=hi - lo, rows=rows, x0=self.x0_all[rows])
        return state.x0, state

    def _keep_hidden(self, rows, end: int) -> None:
        """The tapped hidden states of the forward whose logits' columns end at `end`: the norm's
        columns end there too, and generated position j is column P + j."""
        h, P, W = self.tap.last, self.P, self.lay.width
        h0, h1 = max(end - h.shape[1] - P, 0), min(end - P, W)
        if self.hidden_all is None:
            self.hidden_all = torch.zeros((len(self.canvas), W, h.shape[-1]), dtype=h.dtype, device=self.device)
        self.hidden_all[rows, h0:h1] = h[:, P + h0 - end + h.shape[1]:P + h1 - end + h.shape[1]]

    def commit(self, rows, action: torch.Tensor, x0: torch.Tensor, early_exit: bool) -> None:
        """Write the committed proposals into `rows`; with early_exit, pad the rest of a row that
        has committed its stop token."""
        mask_id = self.spec.mask_id
        new = torch.where(action, x0, self.generated()[rows])
        self.committed[rows] += (action & (x0 != mask_id)).sum(-1)  # compat may propose the mask
        if early_exit:
            fin = _finished(new, mask_id, self.stop)
            if fin.any():
                # the text ends at the first stop token: what follows can only be padding
                new[fin] = torch.where(new[fin] == mask_id, self.spec.pad_id, new[fin])
                self.done[rows[fin]] = True
        self.canvas[rows, self.P:] = new
        self.noop[:] = False

    def owe_noop(self, rows, in_block: torch.Tensor) -> None:
        """compat: a block filled by its first (full) forward of a cached loop costs one more."""
        new = self.generated()[rows]
        self.noop[rows] = ~((new == self.spec.mask_id) & in_block[rows]).any(-1) & ~self.done[rows]

    def output(self, traj: list[StepRecord] | None) -> DecodeOutput:
        return DecodeOutput(tokens=self.canvas[:, self.P:self.P + self.L].clone(), nfe=self.nfe,
                            committed=self.committed, positions=self.positions, trajectory=traj)


def _hidden_tap(strategy, wanted: bool):
    """The strategy's tap on the model's hidden states, on when `wanted` (else off: a decode that
    stopped with an error may have left it on); a one-line error when wanted but absent."""
    tap = getattr(strategy, "tap", None)
    if tap is not None:
        tap.set(wanted)
    if wanted and tap is None:
        raise DLLMError("a policy of arch dit_hidden reads the dLLM's last hidden states, which this model does "
                        "not expose here; valid: a native model (impl=native: llada, dream, ...) or the bundled "
                        "model, or a policy of arch features or dit_confidence")
    return tap if wanted else None


def _canvas(prompts: list[list[int]], spec: FamilySpec, lay: BlockLayout, device: torch.device):
    """(canvas, attn), both (B, P + W): the prompts left-padded (left_pad) to end at column P - 1,
    then each row's lay.lengths masks (padding after them)."""
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:  # at every batch size: a row is refused for itself, not for its batch
        raise DLLMError(f"empty prompt (row {empty[0]} of {len(prompts)}); valid: at least one prompt token")
    ctx, ctx_attn = left_pad(prompts, max(len(p) for p in prompts), spec.pad_id, device)
    real = torch.arange(lay.width, device=device)[None, :] < lay.lengths.to(device)[:, None]  # (B, W)
    gen = torch.where(real, spec.mask_id, spec.pad_id)
    return torch.cat([ctx, gen], dim=1), torch.cat([ctx_attn, real.long()], dim=1)


def _check_action(sampler: Sampler, action: torch.Tensor, eligible: torch.Tensor, may_pass: bool = False) -> None:
    if action.shape != eligible.shape or action.dtype != torch.bool:
        raise RuntimeError(f"sampler {sampler.name!r} returned {tuple(action.shape)} "
                           f"{action.dtype}; expected {tuple(eligible.shape)} torch.bool")
    if (action & ~eligible).any():
        raise RuntimeError(f"sampler {sampler.name!r} committed a position outside the masked "
                           f"positions of the current block")
    if not may_pass and (eligible.any(-1) & ~action.any(-1)).any():
        raise RuntimeError(f"sampler {sampler.name!r} committed nothing in a step; every step "
                           f"must commit at least one masked position of the current block")


def left_pad(rows: list, width: int, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids (lists or 1-D tensors) right-aligned in a (len(rows), width) canvas of
    `pad_id`, and its attention mask (1 on real tokens): left padding, as the decode loop and the
    ELBO batches both lay rows out, so that each row's last token is in the last column and its
    positions count from its first token."""
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
    def forward(ids: torch.Tensor, attn: torch.Tensor, block: int = 0) -> torch.Tensor:
        if isinstance(model, NativeDLLM):
            return model(ids, attn, positions_from(attn), block=block)[0]
        if block:
            raise DLLMError(f"block-diffusion attention ({spec.family}) runs natively only, not in "
                            f"{type(model).__name__}; valid: impl=auto or impl=native")
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

    if spec is not None and spec.block_causal:  # no span forward under block attention yet
        check_cache_support(cache, False, f"the {spec.family} family (block diffusion)")
    run = span_forward(model)  # models that compute logits of the needed columns only
    project = None if run is None else (lambda ids, attn, out_from, **kw: run(ids, attn, positions_from(attn), None,
                                                                              False, out_from, **kw)[0])
    return forward_strategy(model, forward, cache, refresh, window, project)
