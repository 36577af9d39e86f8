"""A policy's defaults: model_args > its card's `recommended` > the paper's; how the card gets them.

    python -m pytest tests/test_recommend.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

import policies

from lm_eval_dllm.model import DLLM
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy, update_card
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.learned import LearnedSampler, resolve_settings
from lm_eval_dllm.utils import DLLMError
from results.grid import Grid, policy_fingerprint
from results.recommend import Trial, choose, recommend, summarize

from .test_samplers import state

UNSET = {"mode": None, "temperature": None, "cutoff": None}
GREEDY_CARD = {"recommended": {"mode": "greedy", "temperature": 1.0, "cutoff": 0.35}}
SAMPLE_CARD = {"recommended": {"mode": "sample", "temperature": 0.25, "cutoff": 0.5}}


def used(given: dict, card, block: int, L: int) -> tuple:
    s = resolve_settings(UNSET | given, card, block, L)
    return s["mode"], s["temperature"], s["cutoff"]


def test_no_card_gives_the_papers_defaults_by_block():
    assert used({}, None, 8, 48) == ("sample", 0.5, 0.5)  # semi-autoregressive
    assert used({}, {}, 16, 48) == ("sample", 0.5, 0.5)
    assert used({}, {"alpha": 2.0}, 48, 48) == ("sample", 1.0, 0.5)  # full diffusion
    assert used({}, None, 256, 48) == ("sample", 1.0, 0.5)  # a block past L is full diffusion
    assert used({"mode": "greedy"}, None, 8, 48) == ("greedy", 1.0, 0.5)  # greedy: temperature 1
    assert resolve_settings(UNSET, None, 8, 48)["source"] == dict.fromkeys(("mode", "temperature", "cutoff", "alpha"), "default")


def test_a_card_gives_its_recommendation_and_given_values_win():
    assert used({}, GREEDY_CARD, 8, 48) == ("greedy", 1.0, 0.35)
    assert used({}, SAMPLE_CARD, 48, 48) == ("sample", 0.25, 0.5)
    assert resolve_settings(UNSET, GREEDY_CARD, 8, 48)["source"] == {"mode": "card", "temperature": "default",
                                                                      "cutoff": "card", "alpha": "default"}
    assert used({"cutoff": 0.9, "mode": "greedy"}, GREEDY_CARD, 8, 48) == ("greedy", 1.0, 0.9)
    assert used({"temperature": 2.0}, SAMPLE_CARD, 48, 48) == ("sample", 2.0, 0.5)
    # a card's temperature or cutoff was chosen for its mode: another mode given gets that mode's defaults
    assert used({"mode": "sample"}, GREEDY_CARD, 8, 48) == ("sample", 0.5, 0.5)
    assert used({"mode": "greedy"}, SAMPLE_CARD, 8, 48) == ("greedy", 1.0, 0.5)
    with pytest.raises(DLLMError, match="card recommends mode='best'; valid: sample, greedy"):
        used({}, {"recommended": {"mode": "best"}}, 8, 48)


def test_the_sampler_runs_what_it_resolved():
    pol = UnmaskPolicy(PolicyConfig(init="threshold"))
    pol.card = GREEDY_CARD
    g = torch.Generator().manual_seed(3)
    st = state(torch.rand(4, 48, generator=g), torch.rand(4, 48, generator=g) < 0.8, block=(0, 48))
    typed = make_sampler("learned")  # sampler=learned, nothing else
    typed.attach(pol, 48, 48)
    explicit = LearnedSampler(LearnedSampler.Config(mode="greedy", temperature=1.0, cutoff=0.35), policy=pol)
    assert torch.equal(typed.select(st).commit, explicit.select(st).commit)
    assert typed.resolved[(48, 48)]["source"]["cutoff"] == "card"
    given = make_sampler("learned", {"mode": "greedy", "cutoff": "0.9"})
    given.attach(pol, 48, 48)
    assert given.settings["cutoff"] == 0.9 and given.settings["source"]["cutoff"] == "given"


def test_the_policy_temperature_has_its_own_model_arg():
    from lm_eval_dllm.config import DLLMConfig

    cfg = DLLMConfig.from_model_args({"sampler": "learned", "policy_temperature": "0.7", "temperature": "0"})
    assert cfg.temperature == 0.0 and cfg.sampler_args == {"temperature": "0.7"}  # the dLLM's, the policy's
    assert make_sampler("learned", cfg.sampler_args).config.temperature == 0.7


@pytest.mark.parametrize("params, msg", [
    ({"mode": "best"}, "mode='best'; valid: sample, greedy"),
    ({"temperature": "0"}, "temperature=0.0 is out of range"),
    ({"cutoff": "1.5", "mode": "greedy"}, "cutoff=1.5 is out of range"),
    ({"cutoff": "0.8"}, "needs mode=greedy"),
])
def test_bad_values_are_one_line_errors(params, msg):
    with pytest.raises(DLLMError, match=msg) as e:
        make_sampler("learned", params)
    assert "\n" not in str(e.value)


def test_the_rule_is_the_policys_own_reward():
    # two settings on four problems: one always right in 12 forwards, one 3 of 4 right in 4 forwards
    careful = summarize({"mode": "greedy", "temperature": 1.0, "cutoff": 0.9}, [1, 1, 1, 1], [12] * 4, 48, 0.0)
    fast = summarize({"mode": "greedy", "temperature": 1.0, "cutoff": 0.1}, [1, 1, 1, 0], [4] * 4, 48, 0.0)
    assert choose([fast, careful]) is careful  # alpha 0: accuracy only
    careful8 = summarize({"mode": "greedy", "temperature": 1.0, "cutoff": 0.9}, [1, 1, 1, 1], [12] * 4, 48, 8.0)
    fast8 = summarize({"mode": "greedy", "temperature": 1.0, "cutoff": 0.1}, [1, 1, 1, 0], [4] * 4, 48, 8.0)
    assert fast8.reward == pytest.approx(0.75 * (45 / 48) ** 8) and choose([careful8, fast8]) is fast8
    # ties: fewer NFE, then the one listed first
    a, b, c = (Trial("greedy", 1.0, x, 1.0, nfe, 0.5) for x, nfe in ((0.2, 5.0), (0.3, 4.0), (0.4, 4.0)))
    assert choose([a, b, c]) is b and choose([c, b, a]) is c
    with pytest.raises(DLLMError, match="no candidate"):
        choose([])


def test_a_card_change_makes_new_runs_of_the_policy_as_typed(tmp_path):
    pol = UnmaskPolicy(PolicyConfig(base_model="m", block=48, gen_length=48))
    pol.save(tmp_path / "p", {"alpha": 2.0})
    fp = policy_fingerprint(tmp_path / "p")
    g = Grid(tasks=["t"], blocks=[48], samplers=["learned"], policy=str(tmp_path / "p"),
             only=[("learned", {}), ("learned", {"mode": "greedy", "cutoff": 0.5})])
    before = [s.key for s in g.settings()]
    update_card(tmp_path / "p", recommended=GREEDY_CARD["recommended"])
    after = [s.key for s in g.settings()]
    assert policy_fingerprint(tmp_path / "p") == fp  # the weights and config did not change
    assert after[1] == before[1]  # a setting that gives mode and cutoff takes nothing from the card
    assert after[0] != before[0] and "card-modegreedy-cutoff0.35" in after[0]
    meta = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert meta["card"]["alpha"] == 2.0 and meta["card"]["recommended"]["cutoff"] == 0.35


def test_recommend_writes_the_card_that_evaluation_then_uses(tmp_path, tiny_ckpt):
    torch.manual_seed(0)
    pol = UnmaskPolicy(PolicyConfig(base_model=str(tiny_ckpt), task="modchain", block=8, gen_length=48,
                                    init="threshold", init_tau=0.6))
    pol.save(tmp_path / "p", {"alpha": 1.0})
    rec = recommend(str(tmp_path / "p"), limit=4, batch_size=4, dtype="float32", device="cpu",
                    temperatures=(0.5,), cutoffs=(0.3, 0.9), cache_dir=tmp_path / "cache")
    assert rec["split"] == "validation" and rec["n"] == 4 and len(rec["sweep"]) == 3
    best = max(rec["sweep"], key=lambda t: (t[5], -t[4]))
    assert (rec["mode"], rec["cutoff"] if rec["mode"] == "greedy" else 0.5) == (best[0], best[2])
    assert UnmaskPolicy.load(tmp_path / "p").card["recommended"]["mode"] == rec["mode"]

    lm = DLLM(pretrained=str(tiny_ckpt), sampler="learned", policy=str(tmp_path / "p"), block=8,
              batch_size=4, device="cpu", dtype="float32")
    p = {"until": ["Q:"], "max_gen_toks": 48}
    lm.generate_until([Instance(request_type="generate_until", doc={}, arguments=("Q: 1+2*3\nA: ", p), idx=0,
                                metadata=("modchain", 0, 1))], disable_tqdm=True)
    [res] = lm.get_model_info()["dllm"]["sampler_resolved"]
    assert (res["block"], res["gen_length"], res["mode"], res["source"]["mode"]) == (8, 48, rec["mode"], "card")


def test_transfer_cells_keep_the_policys_kind_of_block():
    from results.transfer import cells

    assert cells(8, 48, [8, 16, 48], 96) == [(8, 48), (16, 48), (48, 48), (8, 96)]
    assert cells(48, 48, [8, 16, 48], 96) == [(8, 48), (16, 48), (48, 48), (96, 96)]  # full diffusion stays full


@pytest.mark.slow
def test_transfer_table_of_one_policy(tmp_path, monkeypatch):
    import results.transfer as transfer

    monkeypatch.setattr(transfer, "TAUS", [0.5, 0.99])
    grid = Grid(tasks=["modchain"], blocks=[48], samplers=[], limit=3, batch_size=8, out=tmp_path)
    text = transfer.transfer(grid, ["modchain-B8-alphas"], long_L=64)
    rows = [line for line in text.splitlines() if line.startswith("| `modchain-B8-alphas`")]
    assert len(rows) == 2 and "full (B = L = 48)" in rows[0] and "B = 8 (longer L)" in rows[1]
    rec = json.loads((policies.HERE / "modchain-B8-alphas" / "policy.json").read_text())["card"]["recommended"]
    assert rec["mode"] == "greedy"  # the shipped card's choice, which the table shows it ran
    assert all(f"greedy, T=1, cutoff={rec['cutoff']:g}, alpha={rec['alpha']:g} (card/default)" in r for r in rows)
    assert (tmp_path / "bundled" / "transfer.md").read_text() == text
    assert transfer.transfer(grid, ["modchain-B8-alphas"], long_L=64) == text  # the second time: every run on disk
