"""The decode loop: invariants, NFE accounting, early exit, families, determinism."""

import pytest
import torch

from benchmarks.stats_memory import propose_reference
from lm_eval_dllm.decode import check_block, diffuse, model_forward, propose
from lm_eval_dllm.samplers import Action, make_sampler
from lm_eval_dllm.spec import FamilySpec
from lm_eval_dllm.utils import DLLMError

V, MASK, EOS, PAD = 12, 11, 10, 10


def spec(shifted=False, stops=(EOS,)):
    return FamilySpec(family="test", mask_id=MASK, stop_ids=stops, pad_id=PAD, shifted=shifted,
                      suppress_ids=(MASK,), max_length=None, default_gen_length=16, default_block=4)


def fake_forward(seed=0, calls=None):
    """Deterministic logits that depend on the canvas (so order matters), never proposing EOS."""
    W = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3

    def fwd(ids, attn):
        if calls is not None:
            calls.append(ids.clone())
        x = torch.nn.functional.one_hot(ids, V).float()  # (b, T, V)
        ctx = x.cumsum(1) + x.flip(1).cumsum(1).flip(1)  # bidirectional-ish context
        logits = ctx @ W + torch.arange(ids.shape[1])[None, :, None] * 0.37 % 1.0
        logits[..., EOS] = -1e4
        return logits

    return fwd


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 1]]


@pytest.mark.parametrize("name", ["confidence", "margin", "entropy", "random", "threshold", "factor", "eb"])
@pytest.mark.parametrize("block", [4, 16])
def test_invariants(name, block):
    calls = []
    out = diffuse(fake_forward(calls=calls), PROMPTS, spec(), make_sampler(name), 16, block,
                  early_exit=False, seeds=[0, 1, 2])
    assert not (out.tokens == MASK).any()
    assert (out.nfe >= 16 // block).all() and (out.nfe <= 16).all()
    P = max(map(len, PROMPTS))
    for c in calls:  # prompt tokens never change across steps
        for i, p in enumerate(PROMPTS):
            row = c[i] if c.shape[0] == len(PROMPTS) else None
            if row is not None:
                assert row[P - len(p):P].tolist() == p


def test_committed_tokens_never_change_and_blocks_fill_in_order():
    calls = []
    diffuse(fake_forward(calls=calls), [[1, 2]], spec(), make_sampler("confidence"), 16, 4,
            early_exit=False)
    prev = None
    for c in calls:
        gen = c[0, 2:]
        if prev is not None:
            keep = prev != MASK
            assert torch.equal(gen[keep], prev[keep])
        filled = (gen != MASK).nonzero().flatten().tolist()
        if filled:  # everything filled lies in blocks up to the current one
            cur = max(filled) // 4
            assert all((gen[: cur * 4] != MASK).tolist())
        prev = gen


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_confidence_k_gives_nfe_L_over_k(k, block):
    out = diffuse(fake_forward(), PROMPTS, spec(), make_sampler("confidence", {"k": k}), 16, block,
                  early_exit=False)
    assert out.nfe.tolist() == [16 // k] * 3
    assert out.committed.tolist() == [16] * 3


def test_early_exit_saves_forwards_and_keeps_text():
    """A model that puts EOS at position 5: exit once 0..5 are committed; same text as without."""

    def fwd(ids, attn):
        T = ids.shape[1]
        logits = torch.zeros(ids.shape[0], T, V)
        for t in range(T):
            logits[:, t, (t % 9) + 1 if t < T - 16 + 5 else EOS] = 5.0 + (T - t) * 0.1
        return logits

    s = make_sampler("confidence")
    full = diffuse(fwd, [[1, 2]], spec(), s, 16, 16, early_exit=False)
    early = diffuse(fwd, [[1, 2]], spec(), s, 16, 16, early_exit=True)
    assert full.nfe.item() == 16
    assert early.nfe.item() == 6  # positions 0..5 committed one per step, then stop
    cut = lambda t: t[: t.tolist().index(EOS)].tolist()  # noqa: E731
    assert cut(early.tokens[0]) == cut(full.tokens[0])


def test_dream_shift_reads_previous_position():
    """Logits at i predict token i + 1: a shifted model whose logit row i says 'token i+1'."""

    def fwd(ids, attn):
        T = ids.shape[1]
        logits = torch.full((ids.shape[0], T, V), -5.0)
        for t in range(T):
            logits[:, t, (t + 1) % 9 + 1] = 5.0  # predicts position t + 1
        return logits

    out = diffuse(fwd, [[1, 2, 3]], spec(shifted=True), make_sampler("confidence"), 8, 8,
                  early_exit=False)
    P = 3
    assert out.tokens[0].tolist() == [(P + j) % 9 + 1 for j in range(8)]


def test_temperature_sampling_is_seeded_per_row():
    s = make_sampler("confidence")
    a = diffuse(fake_forward(), PROMPTS, spec(), s, 16, 4, temperature=1.0, seeds=[7, 8, 9])
    b = diffuse(fake_forward(), PROMPTS[::-1], spec(), s, 16, 4, temperature=1.0, seeds=[9, 8, 7])
    assert torch.equal(a.tokens, b.tokens.flip(0))
    c = diffuse(fake_forward(), PROMPTS, spec(), s, 16, 4, temperature=1.0, seeds=[1, 2, 3])
    assert not torch.equal(a.tokens, c.tokens)


def test_the_trajectory_records_the_order_the_sampler_returns():
    """A sampler's Action carries its commit order to the recorded step; a bare mask records none."""
    class Leftmost:
        name = "leftmost"

        def __init__(self, ordered):
            self.ordered = ordered

        def select(self, st):
            first = st.eligible.float().argmax(-1, keepdim=True)  # (b, 1) leftmost eligible position
            commit = torch.zeros_like(st.eligible).scatter(1, first, True) & st.eligible
            return Action(commit, torch.where(commit, 0, -1)) if self.ordered else commit

    ordered = diffuse(fake_forward(), PROMPTS, spec(), Leftmost(True), 16, 4, early_exit=False, record=True)
    plain = diffuse(fake_forward(), PROMPTS, spec(), Leftmost(False), 16, 4, early_exit=False, record=True)
    assert torch.equal(ordered.tokens, plain.tokens) and (ordered.nfe == 16).all()
    assert all(torch.equal(r.rank >= 0, r.action) for r in ordered.trajectory)
    assert all(r.rank is None for r in plain.trajectory)


def test_a_sampler_sees_the_proposed_tokens_a_commit_writes():
    """StepState.x0 is the proposal: every committed position ends holding the x0 of its step."""
    class Seen:
        name = "seen"

        def __init__(self):
            self.inner, self.writes = make_sampler("threshold", {"tau": 0.3}), []

        def select(self, st):
            commit = self.inner.select(st)
            assert st.x0.shape == st.conf.shape and st.x0.dtype == torch.long
            self.writes.append((st.rows.clone(), commit.clone(), st.x0.clone()))
            return commit

    seen = Seen()
    out = diffuse(fake_forward(), PROMPTS, spec(), seen, 16, 4, early_exit=False)
    got = torch.full_like(out.tokens, -1)
    for rows, commit, x0 in seen.writes:
        got[rows] = torch.where(commit, x0, got[rows])
    assert torch.equal(got, out.tokens)


def test_bad_sampler_output_is_caught():
    class Greedy:
        name = "bad"

        def select(self, st):
            return torch.ones_like(st.eligible)  # commits outside the block

    with pytest.raises(RuntimeError, match="outside the masked positions"):
        diffuse(fake_forward(), [[1]], spec(), Greedy(), 16, 4)


@pytest.mark.parametrize("block,L,needle", [
    (0, 16, "block=0 must be a positive integer"),
    (-2, 16, "block=-2 must be a positive integer"),
    (5, 16, "block=5 does not divide gen_length=16; valid: 1, 2, 4, 8, 16"),
    (4, 0, "gen_length=0 must be a positive integer"),
])
def test_block_errors(block, L, needle):
    with pytest.raises(DLLMError, match=needle.replace("(", r"\(")):
        check_block(block, L)


def test_block_at_least_L_is_full_diffusion():
    assert check_block(256, 48) == 48 and check_block(None, 48) == 48 and check_block(8, 48) == 8


def test_trajectory_records_every_step():
    out = diffuse(fake_forward(), PROMPTS, spec(), make_sampler("threshold", {"tau": 0.5}), 16, 8,
                  early_exit=False, record=True)
    assert len(out.trajectory) == int(out.nfe.max())
    per_row = torch.zeros(3, dtype=torch.long)
    for r in out.trajectory:
        per_row[r.rows] += 1
        assert not (r.action & ~r.eligible).any() and (r.action.sum(-1) >= 1).all()
    assert torch.equal(per_row, out.nfe)


def test_tiny_model_batch_equals_single_and_is_reproducible(tiny_loaded):
    model, tok, sp = tiny_loaded
    fwd = model_forward(model, sp)
    prompts = [tok(t)["input_ids"] for t in
               ["Q: 1+2*3\nA: ", "Q: 9-8*7+6-5\nA: ", "hi", "Q: 4*4*4*4+1-2\nA: ", "x" * 30,
                "Q: 0\nA: ", "abc", "Q: 5+5+5+5\nA: "]]
    for name, params in [("confidence", {}), ("threshold", {"tau": 0.3}), ("random", {"k": 2})]:
        s = make_sampler(name, params)
        batch = diffuse(fwd, prompts, sp, s, 24, 8, seeds=list(range(8)))
        again = diffuse(fwd, prompts, sp, s, 24, 8, seeds=list(range(8)))
        assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.nfe, again.nfe)
        for i, p in enumerate(prompts):
            one = diffuse(fwd, [p], sp, s, 24, 8, seeds=[i])
            assert torch.equal(one.tokens[0], batch.tokens[i]), (name, i)
            assert one.nfe.item() == batch.nfe[i].item()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("shape,chunk", [((3, 37, 50), 500), ((3, 37, 50), 3 * 37 * 50), ((5, 8, 50), 1000),
                                         ((2, 40, 126_464), None)])
def test_propose_chunked_equals_one_pass(temperature, shape, chunk):
    """Chunked statistics are bitwise those of one pass over the batch (the former propose), on
    uneven chunks of positions, groups of rows, one chunk, and LLaDA's vocabulary at the default."""
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(shape, generator=g) * 4  # (b, L, V)
    lg[..., 3] = float("-inf")  # a suppressed token
    lg[0, 1, 7] = 1e4  # a position with zero entropy
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(shape[0])]  # noqa: E731
    kw = {} if chunk is None else {"chunk_elements": chunk}
    new = propose(lg, temperature, gens(), **kw)
    old = propose_reference(lg, temperature, gens())
    for n, o in zip(new, old):
        assert n.dtype == o.dtype and torch.equal(n, o)


@pytest.mark.parametrize("statistics", [frozenset(), frozenset({"margin"}), frozenset({"entropy"})])
@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_propose_skips_the_statistics_not_asked_for(statistics, top_k):
    """What a sampler does without (Sampler.statistics) is None; everything else is bitwise what
    the full computation gives."""
    g = torch.Generator().manual_seed(1)
    lg = torch.randn((3, 37, 50), generator=g) * 4
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    full = dict(zip(("x0", "conf", "margin", "entropy", "top"), propose(lg, 0.7, gens(), top_k=top_k)))
    part = dict(zip(full, propose(lg, 0.7, gens(), top_k=top_k, statistics=statistics)))
    for name in full:
        if name in ("margin", "entropy") and name not in statistics:
            assert part[name] is None, name
        elif full[name] is None:
            assert part[name] is None and name == "top" and top_k == 0
        else:
            assert torch.equal(part[name], full[name]), name


class Spy:
    """A duck-typed sampler (select alone): the threshold rule, noting which statistics it was given."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def select(self, state):
        self.seen.add((state.margin is None, state.entropy is None))
        return self.inner.select(state)


def test_samplers_get_the_statistics_they_read_and_decode_alike(tiny_loaded):
    """threshold, confidence, factor and random read neither margin nor entropy, and get None for
    them; margin and eb get theirs. Each decodes the tokens and NFE it decodes with every
    statistic computed (a duck-typed sampler gets them all, as does a recorded decode). A name
    outside STATISTICS is one line."""
    model, tok, sp = tiny_loaded
    fwd = model_forward(model, sp)
    prompts = [tok(t)["input_ids"] for t in ["Q: 1+2*3\nA: ", "Q: 9-8*7+6-5\nA: ", "x" * 30]]
    reads = {"threshold": (True, True), "confidence": (True, True), "factor": (True, True), "random": (True, True),
             "margin": (False, True), "entropy": (True, False), "eb": (True, False)}
    for name, params in [("threshold", {"tau": 0.7}), ("confidence", {}), ("factor", {"f": 1.0}), ("random", {"k": 2}),
                         ("margin", {}), ("entropy", {}), ("eb", {"gamma": 0.5})]:
        s = make_sampler(name, params)
        given, whole = set(), set()
        lean = diffuse(fwd, prompts, sp, Spy(s, given), 24, 8, seeds=[0, 1, 2])  # a duck type: all
        assert given == {(False, False)}
        ran = type(s)(s.config)
        ran.select = lambda state, ran=ran: (whole.add((state.margin is None, state.entropy is None)),
                                             type(ran).select(ran, state))[1]
        out = diffuse(fwd, prompts, sp, ran, 24, 8, seeds=[0, 1, 2])
        assert whole == {reads[name]}, name
        assert torch.equal(out.tokens, lean.tokens) and torch.equal(out.nfe, lean.nfe), name
        rec = diffuse(fwd, prompts, sp, s, 24, 8, seeds=[0, 1, 2], record=True)
        assert all(r.margin is not None and r.entropy is not None for r in rec.trajectory)
        assert torch.equal(rec.tokens, out.tokens), name
    odd = make_sampler("threshold", {"tau": 0.7})
    odd.statistics = lambda: frozenset({"entropies"})
    with pytest.raises(DLLMError, match="^sampler ThresholdSampler: statistics\\(\\) names 'entropies'; valid: a subset "
                                        "of entropy, margin$"):
        diffuse(fwd, prompts, sp, odd, 24, 8)
