"""Samplers on hand-built statistics: the contract and each rule's behaviour."""

import pytest
import torch

from lm_eval_dllm.samplers import StepState, available_samplers, make_sampler, register_sampler
from lm_eval_dllm.samplers.base import Sampler
from lm_eval_dllm.utils import DLLMError

ALL = ["confidence", "eb", "entropy", "factor", "margin", "random", "threshold"]


def state(conf, masked=None, block=(0, None), entropy=None, margin=None, seed=0):
    conf = torch.as_tensor(conf, dtype=torch.float32)
    B, L = conf.shape
    masked = torch.ones(B, L, dtype=torch.bool) if masked is None else torch.as_tensor(masked)
    lo, hi = block[0], block[1] if block[1] is not None else L
    in_block = torch.zeros(L, dtype=torch.bool)
    in_block[lo:hi] = True
    ent = -(conf * conf.clamp_min(1e-9).log() + (1 - conf) * (1 - conf).clamp_min(1e-9).log())
    return StepState(conf=conf, margin=conf - (1 - conf) if margin is None else margin,
                     entropy=ent if entropy is None else torch.as_tensor(entropy),
                     masked=masked, eligible=masked & in_block,
                     generators=[torch.Generator().manual_seed(seed + i) for i in range(B)])


def test_all_registered():
    assert set(ALL) <= set(available_samplers())


@pytest.mark.parametrize("name", ALL)
def test_contract_on_random_states(name):
    """>= 1 commit per row with eligible positions, never outside masked ∩ block."""
    g = torch.Generator().manual_seed(0)
    s = make_sampler(name)
    for trial in range(50):
        conf = torch.rand(4, 16, generator=g)
        masked = torch.rand(4, 16, generator=g) < 0.6
        masked[0] = False  # a row with nothing left
        lo = int(torch.randint(0, 12, (1,), generator=g))
        st = state(conf, masked, block=(lo, lo + 4))
        a = s.select(st)
        assert a.dtype == torch.bool and a.shape == (4, 16)
        assert not (a & ~st.eligible).any()
        has = st.eligible.any(-1)
        assert (a.sum(-1)[has] >= 1).all()
        assert (a.sum(-1)[~has] == 0).all()


def test_threshold_rule():
    st = state([[0.95, 0.5, 0.91, 0.2]])
    assert make_sampler("threshold", {"tau": 0.9}).select(st).tolist() == [[True, False, True, False]]
    # nothing above tau: still the single most confident one
    assert make_sampler("threshold", {"tau": 0.99}).select(st).tolist() == [[True, False, False, False]]


def test_higher_tau_never_commits_more():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        st = state(torch.rand(3, 12, generator=g))
        counts = [int(make_sampler("threshold", {"tau": t}).select(st).sum())
                  for t in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
        assert counts == sorted(counts, reverse=True)


def test_eb_monotone_in_gamma_and_accepts_zero_entropy():
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        st = state(torch.rand(3, 12, generator=g))
        counts = [int(make_sampler("eb", {"gamma": x}).select(st).sum())
                  for x in (0.0, 0.01, 0.1, 0.5, 1.0, 5.0)]
        assert counts == sorted(counts)
    # zero-entropy positions cost nothing: with gamma 0 all of them are committed, plus the
    # next one (the bound excludes the largest entropy of the set), and no more
    st = state([[0.5, 0.5, 0.5, 0.5]], entropy=[[0.0, 0.7, 0.0, 0.9]])
    assert make_sampler("eb", {"gamma": 0.0}).select(st).tolist() == [[True, True, True, False]]


def test_factor_rule():
    # sorted c = 0.99, 0.9, 0.6: (n+1)(1-c_n) = 0.02, 0.3, 1.6
    st = state([[0.6, 0.99, 0.9]])
    assert make_sampler("factor", {"f": 1.0}).select(st).tolist() == [[False, True, True]]
    assert make_sampler("factor", {"f": 0.1}).select(st).tolist() == [[False, True, False]]
    assert make_sampler("factor", {"f": 2.0}).select(st).tolist() == [[True, True, True]]
    assert make_sampler("factor", {"f": 0.001}).select(st).sum() == 1  # at least the top one


def test_topk_orders():
    conf = [[0.2, 0.9, 0.5, 0.7]]
    assert make_sampler("confidence", {"k": 2}).select(state(conf)).tolist() == [[False, True, False, True]]
    st = state(conf, margin=torch.tensor([[0.9, 0.1, 0.2, 0.3]]))
    assert make_sampler("margin", {"k": 1}).select(st).tolist() == [[True, False, False, False]]
    st = state(conf, entropy=[[2.0, 1.0, 0.1, 3.0]])
    assert make_sampler("entropy", {"k": 1}).select(st).tolist() == [[False, False, True, False]]


def test_random_is_seeded_per_row():
    st1 = state(torch.rand(2, 20), seed=5)
    st2 = state(torch.rand(2, 20), seed=5)
    s = make_sampler("random", {"k": 3})
    assert torch.equal(s.select(st1), s.select(st2))


@pytest.mark.parametrize("name,params,needle", [
    ("nope", {}, "unknown sampler 'nope'; valid: confidence"),
    ("threshold", {"tau": "abc"}, "tau='abc' is not a valid float"),
    ("threshold", {"tau": "1.5"}, "tau=1.5 is out of range; valid: (0.0, 1.0]"),
    ("threshold", {"k": 2}, "has no parameter 'k'; valid: tau"),
    ("confidence", {"k": 0}, "k=0 is out of range"),
    ("confidence", {"k": "2.5"}, "k='2.5' is not a valid int"),
    ("eb", {"gamma": -1}, "gamma=-1.0 is out of range"),
])
def test_bad_params_one_line(name, params, needle):
    with pytest.raises(DLLMError) as e:
        make_sampler(name, params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_user_sampler_registration():
    from dataclasses import dataclass

    @register_sampler("leftmost_test")
    class Leftmost(Sampler):
        @dataclass(frozen=True)
        class Config:
            n: int = 1

        def select(self, st):
            first = st.eligible.float().argmax(-1)
            out = torch.zeros_like(st.eligible)
            out[torch.arange(len(first)), first] = True
            return out & st.eligible

    s = make_sampler("leftmost_test", {"n": "2"})
    assert s.config.n == 2
    assert s.select(state([[0.1, 0.9]])).tolist() == [[True, False]]
    with pytest.raises(ValueError):
        register_sampler("confidence")(Leftmost)  # name taken by another class


def test_sampler_by_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_samplers_test.py").write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "from lm_eval_dllm.samplers import Sampler, top_k\n"
        "class Leftmost(Sampler):\n"
        "    @dataclass(frozen=True)\n"
        "    class Config:\n"
        "        k: int = 1\n"
        "    def select(self, st):\n"
        "        score = -torch.arange(st.conf.shape[1], dtype=torch.float32).expand_as(st.conf)\n"
        "        return top_k(score, st.eligible, self.config.k)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = make_sampler("my_samplers_test:Leftmost", {"k": "2"})
    assert s.select(state([[0.1, 0.9, 0.8]])).tolist() == [[True, True, False]]
    with pytest.raises(DLLMError, match="cannot import sampler 'nowhere_xyz:Cls'"):
        make_sampler("nowhere_xyz:Cls")
