"""The policy network, the learned sampler, the task reward and the GRPO update."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from lm_eval_dllm.policy import ARCHS, PolicyConfig, UnmaskPolicy, build_policy
from lm_eval_dllm.policy_dit import tiny_arch
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.samplers.learned import LearnedSampler
from lm_eval_dllm.utils import DLLMError
from train import crash
from train.grpo import GRPOConfig, check_config, init_source, network_config, start_from, update
from train.grpo_loss import clipped_pg_loss, group_advantages

from .background import finish, start
from .test_samplers import state


def test_policy_size_and_slow_start():
    pol = UnmaskPolicy(PolicyConfig())
    n = sum(p.numel() for p in pol.parameters())
    assert 250_000 < n < 400_000  # the paper's ~0.3 M
    st = state(torch.rand(2, 48))
    p = torch.sigmoid(pol.logits_for(st.conf, st.margin, st.entropy, st.masked, st.eligible)).detach()
    assert p.mean() == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item(), abs=0.05)


def test_save_load_roundtrip(tmp_path):
    pol = UnmaskPolicy(PolicyConfig(features=("mask", "conf"), base_model="m", block=8, gen_length=48))
    pol.save(tmp_path / "p", {"note": 1})
    back = UnmaskPolicy.load(tmp_path / "p")
    assert back.cfg.features == ("mask", "conf") and back.card == {"note": 1}
    for a, b in zip(pol.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(DLLMError, match="has no policy.json"):
        UnmaskPolicy.load(tmp_path)


@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_learned_sampler_contract(mode):
    pol = UnmaskPolicy(PolicyConfig())
    s = LearnedSampler.from_policy(pol, mode=mode)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        masked = torch.rand(3, 48, generator=g) < 0.7
        st = state(torch.rand(3, 48, generator=g), masked, block=(8, 16))
        a = s.select(st).commit
        assert not (a & ~st.eligible).any()
        assert (a.sum(-1)[st.eligible.any(-1)] >= 1).all()


def test_greedy_cutoff_trades_commits_for_caution():
    pol = UnmaskPolicy(PolicyConfig(init="threshold"))
    g = torch.Generator().manual_seed(1)
    masked = torch.rand(4, 48, generator=g) < 0.8
    st = state(torch.rand(4, 48, generator=g), masked, block=(0, 48))
    acts = [LearnedSampler(LearnedSampler.Config(mode="greedy", cutoff=c), policy=pol).select(st).commit
            for c in (0.1, 0.5, 0.9)]
    assert torch.equal(acts[1], LearnedSampler.from_policy(pol, mode="greedy").select(st).commit)  # default
    sizes = [int(a.sum()) for a in acts]
    assert sizes[0] > sizes[1] > sizes[2] >= 4  # fewer commits as the cutoff rises, >= 1 per row
    assert not (acts[2] & ~acts[1]).any() and not (acts[1] & ~acts[0]).any()  # nested
    with pytest.raises(DLLMError, match="cutoff=0.8 needs mode=greedy"):
        make_sampler("learned", {"cutoff": 0.8})
    with pytest.raises(DLLMError, match=r"cutoff=1.0 is out of range; valid: \(0.0, 1.0\)"):
        make_sampler("learned", {"mode": "greedy", "cutoff": 1.0})


def test_learned_needs_a_policy_for_unknown_models():
    from lm_eval_dllm.policy import policy_for

    s = make_sampler("learned")
    assert s.wanted_policy() == "" and s.policy is None  # the sampler asks; it loads nothing itself
    with pytest.raises(DLLMError, match="no shipped policy for model 'someone/else'"):
        policy_for(s.wanted_policy(), model_id="someone/else", block=32, gen_length=256, device="cpu")
    s = make_sampler("learned", {"policy": "/no/such/policy"})
    with pytest.raises(DLLMError, match="policy '/no/such/policy' does not exist"):
        policy_for(s.wanted_policy(), model_id="x", block=8, gen_length=48, device="cpu")
    assert LearnedSampler.from_policy(UnmaskPolicy(PolicyConfig())).wanted_policy() is None  # training's own
    with pytest.raises(DLLMError, match="mode='best'; valid: sample, greedy"):
        make_sampler("learned", {"mode": "best"})


def test_reward_is_task_verdict_times_nfe_discount():
    from lm_eval_dllm.reward import TaskScorer, nfe_discount

    sc = TaskScorer("modchain")
    doc = sc.docs("train")[3]
    right, wrong = doc["answer"], doc["answer"].rsplit("#### ", 1)[0] + "#### " + str((int(doc["answer"][-1]) + 1) % 10)
    assert sc.score(doc, right) == 1.0 and sc.score(doc, wrong) == 0.0
    assert sc.reward(doc, right, nfe=12, gen_length=48, alpha=1.0) == pytest.approx((48 - 12 + 1) / 48)
    assert sc.reward(doc, right, nfe=12, gen_length=48, alpha=0.0) == 1.0
    assert sc.reward(doc, wrong, nfe=3, gen_length=48, alpha=1.0) == 0.0
    assert nfe_discount(100, 48, 2.0) == pytest.approx((1 / 48) ** 2)  # NFE beyond L is capped
    # the same verdict lm-eval's own pipeline gives
    inst_metrics = sc.task.process_results(doc, [right.split("#### ")[-1]])
    assert inst_metrics["exact_match"] == 1.0


def test_group_advantages_and_loss():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4])
    assert torch.allclose(group_advantages(r, 2), torch.tensor([0.5, -0.5, 0.0, 0.0, -0.1, 0.1]))
    lp = torch.zeros(3, requires_grad=True)
    loss = clipped_pg_loss(lp, torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-2 / 3) and torch.allclose(lp.grad, -torch.tensor([1.0, -1.0, 2.0]) / 3)
    # outside the clip range the gradient vanishes for the favourable direction
    lp2 = torch.full((1,), 1.0, requires_grad=True)
    clipped_pg_loss(lp2, torch.zeros(1), torch.ones(1), 0.5).backward()
    assert lp2.grad.item() == 0.0
    # per-rollout normalisation: rollout 0 has three steps, rollout 1 one; each rollout weighs 1/2
    lp3 = torch.zeros(4, requires_grad=True)
    loss = clipped_pg_loss(lp3, torch.zeros(4), torch.tensor([1.0, 1.0, 1.0, -1.0]), 0.5, torch.tensor([0, 0, 0, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.allclose(lp3.grad, torch.tensor([-1 / 6, -1 / 6, -1 / 6, 1 / 2]))


def test_one_grpo_update_changes_every_parameter():
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    pol = UnmaskPolicy(PolicyConfig())
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    cfg = GRPOConfig()
    opt = torch.optim.AdamW(pol.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    N, L = 32, 48
    batch = {"inputs": (torch.rand(N, L, len(pol.cfg.features)), torch.rand(N)),
             "action": torch.rand(N, L) < 0.3, "eligible": torch.rand(N, L) < 0.8,
             "row": torch.arange(N) % 8}
    adv = group_advantages(torch.rand(8), 4)
    losses = update(pol, pol, opt, sched, batch, adv, cfg, acc)
    assert len(losses) == cfg.inner_steps
    unchanged = [k for k, v in pol.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_ckpt):
    """Kill a run mid-way (LM_EVAL_DLLM_KILL_AT_STEP), resume it: the same final policy and optimizer state as
    a run never killed, and a log holding each step once."""
    base = [sys.executable, "-m", "train.grpo", "--pretrained", str(tiny_ckpt), "--steps", "4",
            "--prompts-per-step", "2", "--group", "4", "--val-every", "100", "--val-size", "2",
            "--save-every", "1", "--gen-length", "16", "--block", "8", "--lr", "1e-3", "--device", "cpu",
            "--dtype", "float32"]
    # one thread each: the uninterrupted and the killed run go side by side (each spends seconds
    # importing, one core apiece), and all three runs compute alike
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = [start(base + ["--out", str(whole)], tmp_path / "whole_log", env=env),
            # killed at the end of step 3: its log line is written, its state is not (saved every 2 steps)
            start(base + ["--out", str(cut), "--save-every", "2"], tmp_path / "cut_log", env=env | {crash.ENV: "3"})]
    r_whole, r = (finish(p) for p in runs)
    assert r_whole.returncode == 0, r_whole.stderr[-2000:]
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    killed = torch.load(cut / "trainer_state.pt", weights_only=False)
    assert killed["step"] == 2
    assert [json.loads(x)["step"] for x in (cut / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    subprocess.run(base + ["--out", str(cut), "--resume"], check=True, capture_output=True, env=env, timeout=600)

    a = torch.load(whole / "trainer_state.pt", weights_only=False)
    b = torch.load(cut / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"]
    steps = [json.loads(x)["step"] for x in (cut / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 redone, logged once
    assert b["train_seconds"] > killed["train_seconds"] > 0  # training time adds up across the resume
    assert "train_minutes" in json.loads((cut / "last" / "policy.json").read_text())["card"]


def test_threshold_init_starts_as_the_threshold_rule():
    pol = UnmaskPolicy(PolicyConfig(init="threshold", init_tau=0.8))
    conf = torch.tensor([[0.99, 0.95, 0.5, 0.1]])
    st = state(conf)
    p = torch.sigmoid(pol.logits_for(st.conf, st.margin, st.entropy, st.masked, st.eligible)).detach()
    assert p[0, 0] > 0.9 and p[0, 1] > 0.9 and p[0, 2] < 0.01 and p[0, 3] < 0.01
    with pytest.raises(DLLMError, match="policy init 'fast'; valid: slow, threshold"):
        PolicyConfig(init="fast")


def test_catalog_is_read_from_the_shipped_folders(tmp_path, monkeypatch, caplog):
    import policies

    monkeypatch.setattr(policies, "HERE", tmp_path)
    for name, block in (("m-B8", 8), ("m-B48", 48)):
        UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=block, gen_length=48)).save(tmp_path / name)
    assert {(e["path"], e["block"]) for e in policies.catalog()} == {("m-B8", 8), ("m-B48", 48)}
    pick = lambda block: policies.resolve_policy("", model_id="m", block=block, gen_length=48).name  # noqa: E731
    assert pick(48) == "m-B48" and pick(8) == "m-B8" and pick(256) == "m-B48"  # B >= L is full diffusion
    assert pick(16) == "m-B8"  # no exact match: the nearest block size ...
    from lm_eval_dllm.policy import policy_for

    with caplog.at_level("WARNING"):
        policy_for("", model_id="m", block=16, gen_length=48, device="cpu")
    assert "transfer across block sizes" in caplog.text  # ... with a warning
    with pytest.raises(policies.CatalogError, match=r"no shipped policy for model 'x'; valid: .*m-B8 \(m, block 8\)"):
        policies.resolve_policy("", model_id="x", block=8, gen_length=48)


def test_the_card_command_reproduces_the_config():
    import shlex

    from train.grpo import command_line, parse_args

    cfg = GRPOConfig(block=48, lr=5e-4, init="threshold", apply_chat_template=True, pretrained="", steps=7)
    argv = shlex.split(command_line(cfg))[3:]  # after "python -m train.grpo"
    assert parse_args(argv) == (cfg, False, False)


def test_policies_for_one_block_pick_the_lowest_alpha_and_sweep_all(tmp_path, monkeypatch):
    import policies
    from results.grid import Grid

    monkeypatch.setattr(policies, "HERE", tmp_path)
    for name, alpha in (("m-B48-a8", 8.0), ("m-B48", 1.0), ("m-B48-a32", 32.0)):
        UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=48, gen_length=48)).save(
            tmp_path / name, {"alpha": alpha})
    UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=8, gen_length=48)).save(
        tmp_path / "m-B8", {"alpha": 1.0})
    assert policies.resolve_policy("", model_id="m", block=48, gen_length=48).name == "m-B48"
    assert policies.variants_for("m", 48) == ["m-B48", "m-B48-a8", "m-B48-a32"]
    assert policies.variants_for("m", 256) == policies.variants_for("m", 48)  # B >= L: full diffusion
    g = Grid(tasks=["t"], blocks=[8, 48], samplers=["learned"], pretrained="m", only=[("learned", {"cutoff": 0.5})])
    got = [(s.block, dict(s.params).get("policy")) for s in g.settings()]
    assert got == [(8, None), (48, None), (48, "m-B48-a8"), (48, "m-B48-a32")]
    assert "policy=m-B48-a8" in g.settings()[2].model_args(None, 8, 0)
    # an explicit --policy sweeps that policy only
    g.policy = str(tmp_path / "m-B48-a8")
    assert [dict(s.params).get("policy") for s in g.settings()] == [None, None]
    # a policy named in a setting: only a shipped one, and not together with --policy
    with pytest.raises(DLLMError, match=r"policy='m-B48-a8' with --policy .*; valid: one of them"):
        Grid(tasks=["t"], blocks=[48], samplers=["learned"], pretrained="m", policy=g.policy,
             only=[("learned", {"policy": "m-B48-a8"})]).settings()
    with pytest.raises(DLLMError, match=r"policy='runs/x/best'; valid: .*m-B48-a32"):
        Grid(tasks=["t"], blocks=[48], samplers=["learned"], pretrained="m",
             only=[("learned", {"policy": "runs/x/best"})]).settings()
    # a policy whose card records no alpha (or no card) is never the default pick
    UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=48, gen_length=48)).save(tmp_path / "a-handmade")
    assert policies.resolve_policy("", model_id="m", block=48, gen_length=48).name == "m-B48"
    assert policies.variants_for("m", 48)[-1] == "a-handmade"
    # two at the same alpha: the higher validation reward on the card, whatever the names
    for name, val in (("m-B8-a", 0.5), ("m-B8-z", 0.9)):
        UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=8, gen_length=48)).save(
            tmp_path / name, {"alpha": 1.0, "metrics": {"val_reward": val}})
    assert policies.resolve_policy("", model_id="m", block=8, gen_length=48).name == "m-B8-z"
    assert policies.variants_for("m", 8) == ["m-B8-z", "m-B8-a", "m-B8"]  # no reward recorded: last


def test_seed_sweep_of_a_shipped_policy_reuses_the_grid_run_keys(tmp_path, monkeypatch):
    import policies
    from results.seeds import _sweep_of
    from results.grid import SWEEPS, Grid

    shipped, other = tmp_path / "policies", tmp_path / "other"  # other: a policy outside the catalog
    monkeypatch.setattr(policies, "HERE", shipped)
    for name, alpha in (("m-B48", 1.0), ("m-B48-a8", 8.0)):
        UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=48, gen_length=48)).save(
            shipped / name, {"alpha": alpha})
    UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=48, gen_length=48, init="threshold")).save(other)
    g = Grid(tasks=["t"], blocks=[48], samplers=["learned"], pretrained="m")
    grid_keys = {s.key for s in g.settings()}
    for folder in ("m-B48", "m-B48-a8", str(shipped / "m-B48-a8")):
        keys = [s.key for s in _sweep_of(g, folder, 48).settings()]
        assert len(keys) == len(SWEEPS["learned"]) and set(keys) <= grid_keys, folder
    keys = {s.key for s in _sweep_of(g, str(other), 48).settings()}
    assert len(keys) == len(SWEEPS["learned"]) and not keys & grid_keys


def test_seeds_one_section_per_command_and_a_policy_named_twice_counts_once(tmp_path, monkeypatch):
    import policies
    import results.seeds as rm
    from results.grid import Grid
    from results.report import Row

    shipped = tmp_path / "policies"
    monkeypatch.setattr(policies, "HERE", shipped)
    for name, alpha in (("m-B48", 1.0), ("m-B48-a8", 8.0)):
        UnmaskPolicy(PolicyConfig(base_model="m", task="modchain", block=48, gen_length=48)).save(
            shipped / name, {"alpha": alpha})
    ran = []

    def fake_run_grid(g):  # one "run file" per learned sweep: the policy it sweeps
        if g.samplers != ["learned"]:
            return []
        name = g.policy or dict(g.only[0][1])["policy"]
        ran.append(name)
        return [name]

    acc = {"m-B48-a8": 0.9, "s1": 0.8, "m-B48": 0.7, "s2": 0.6}
    monkeypatch.setattr(rm, "run_grid", fake_run_grid)
    monkeypatch.setattr(rm, "report_paths", lambda g: [])
    monkeypatch.setattr(rm, "load_rows", lambda paths: [
        Row("t", "learned", (("cutoff", 0.5),), 48, 48, acc[Path(p).name], 3.0, 1.0, 0.1, 100) for p in paths])
    g = Grid(tasks=["t"], blocks=[48], samplers=["learned"], pretrained="m", out=tmp_path / "out")
    text = rm.seeds(g, ["m-B48-a8", str(shipped / "m-B48-a8"), "s1"], ["m-B48", "s2"])
    assert ran == ["m-B48-a8", "s1", "m-B48", "s2"]  # the path of a shipped policy is the same policy
    assert text.count("### Command of ") == 2 and "### Command of `m-B48`" in text
    assert (tmp_path / "out" / g.model_tag / "seed_noise.md").read_text() == text
    with pytest.raises(DLLMError, match=r"--policies 'm-B48-a8' names 1 distinct folder"):
        rm.seeds(g, ["m-B48", "s2"], ["m-B48-a8", str(shipped / "m-B48-a8")])
    with pytest.raises(DLLMError, match="no --policies given"):
        rm.seeds(g)


def test_init_from_starts_from_the_policy_weights(tmp_path, caplog):
    src = UnmaskPolicy(PolicyConfig(base_model="m", block=48, gen_length=48))
    torch.nn.init.normal_(src.out.weight)
    src.save(tmp_path / "src")
    dst = UnmaskPolicy(PolicyConfig(base_model="m", block=8, gen_length=48))
    with caplog.at_level("WARNING"):
        start_from(dst, str(tmp_path / "src"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    assert "trained with block=48; this run has 8" in caplog.text
    other = UnmaskPolicy(PolicyConfig(features=("mask", "conf"), base_model="m", block=8, gen_length=48))
    with pytest.raises(DLLMError, match=r"--init-from .* has features=\('mask', 'eligible'"):
        start_from(other, str(tmp_path / "src"))



def test_init_from_of_another_shape_is_refused_in_one_line_before_and_at_load(tmp_path):
    """check_config (before anything loads) and start_from (when the weights load) refuse --init-from
    in the same line: a policy with another number of layers, which no flag can ask for."""
    run = GRPOConfig(out=str(tmp_path / "run"))
    UnmaskPolicy(PolicyConfig(layers=2)).save(tmp_path / "deep")
    with pytest.raises(DLLMError) as early:
        check_config(replace(run, init_from=str(tmp_path / "deep")), resume=False, overwrite=False)
    with pytest.raises(DLLMError) as late:
        start_from(build_policy(network_config(run)), str(tmp_path / "deep"))
    assert str(early.value) == str(late.value)
    assert "\n" not in str(early.value)
    assert str(early.value).endswith("has layers=2; valid: a policy with this run's layers=1")


# a value other than the default, for the settings whose type alone does not give one
# (features: one the run lacks; fewer features than the run's load, their columns widened with zeros)
OTHER = {"init": "threshold", "sampling": "pl", "features": ("mask", "conf", "near")}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_setting_that_shapes_the_weights_is_checked(tmp_path, arch):
    """A policy whose weights have other names or shapes than the run's cannot be loaded into it:
    init_source (the one --init-from check) refuses it in one line, whichever setting made them differ."""
    # dit_hidden's width, heads and feed-forward are the dLLM's (dllm_arch), not hidden/ff/heads
    base = PolicyConfig(arch=arch, dllm_arch=tiny_arch({}) if arch == "dit_hidden" else {})
    shapes = {k: v.shape for k, v in build_policy(base).state_dict().items()}
    differ = []
    for f in fields(PolicyConfig):
        v = getattr(base, f.name)
        if f.name == "dllm_arch" and v:
            other = tiny_arch({"d_model": 2 * v["d_model"]})
        elif f.name in OTHER:
            other = OTHER[f.name]
        elif isinstance(v, bool):
            other = not v
        elif isinstance(v, (int, float)):
            other = v * 2 if v else 1
        else:
            continue  # names (arch, base_model, task) and extra: no weights
        try:
            variant = build_policy(replace(base, **{f.name: other}))
        except DLLMError:
            continue  # not a valid policy (init_tau 1.8)
        if {k: v.shape for k, v in variant.state_dict().items()} != shapes:
            differ.append(f.name)
            variant.save(tmp_path / f.name)
            with pytest.raises(DLLMError, match=f"has {f.name}=.*; valid: a policy with this run's {f.name}="):
                init_source(str(tmp_path / f.name), base)
    sizes = {"dllm_arch", "layers"} if arch == "dit_hidden" else {"hidden", "ff", "layers"}
    assert sizes <= set(differ)  # the check above ran for the network's sizes


def test_grpo_flags_show_defaults_and_reject_bad_counts(capsys):
    from train.grpo import main, parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--alpha ALPHA NFE discount exponent; 0 = reward accuracy only (default: 1.0)" in text
    assert "--group GROUP rollouts per prompt (default: 8)" in text
    for flag in ("--val-every", "--prompts-per-step", "--save-every"):
        with pytest.raises(SystemExit, match=f"train.grpo: error: {flag} 0; valid: a positive whole number"):
            main([flag, "0", "--out", "/nonexistent/never-written"])
