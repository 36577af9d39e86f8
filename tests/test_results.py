"""The results pipeline: results/README.md shows exactly what the committed run files say."""

import json
from pathlib import Path

import pytest

from results.__main__ import RESULTS_README, render, results_readme_text
from results.grid import TESTBED, Grid, Setting
from results.report import Row, load_rows, pareto

RESULTS = Path(__file__).resolve().parent.parent / "results"


def committed_runs() -> list[Path]:
    """The bundled model's runs for the weights it has now (as `python -m results report` reads them)."""
    from results.__main__ import report_paths

    return report_paths(Grid(tasks=["modchain"], blocks=[], samplers=["learned"], out=RESULTS))


@pytest.mark.skipif(not committed_runs(), reason="no committed results yet")
def test_results_readme_and_tables_match_the_run_files():
    """results/README.md and results/bundled/tables.md are re-derived from results/runs/, byte for byte."""
    paths = committed_runs()
    rows = load_rows(paths)
    grid = Grid(tasks=sorted({r.task for r in rows}), blocks=[], samplers=[], out=RESULTS)
    body, figs = render(grid, rows)
    assert RESULTS_README.read_text() == results_readme_text(grid, rows)
    assert (RESULTS / grid.model_tag / "tables.md").read_text() == body
    for f in figs:
        assert f.exists(), f
    for link in ("bundled/modchain_acc_vs_nfe.png", "bundled/modchain_acc_vs_block.png", "../docs/testbed.md"):
        assert f"({link})" in RESULTS_README.read_text() and (RESULTS / link).exists(), link


def test_tables_do_not_depend_on_the_order_runs_are_read_in():
    from results.report import best_per_sampler

    mk = lambda s, acc, nfe: Row("t", s, (("k", 2),), 8, 48, acc, nfe, 1.0, 0.1, 10)  # noqa: E731
    rows = [mk("margin", 1.0, 21.0), mk("entropy", 1.0, 21.0), mk("confidence", 1.0, 21.0), mk("factor", 0.9, 5.0)]
    for f in (best_per_sampler, pareto):
        assert [r.sampler for r in f(rows)] == [r.sampler for r in f(rows[::-1])]
    assert [r.sampler for r in best_per_sampler(rows)] == ["confidence", "entropy", "margin", "factor"]
    # the whole report, learned-vs-heuristics included, with heuristic settings that tie exactly
    from results.report import tables

    mk2 = lambda s, p, acc, nfe: Row("t", s, p, 8, 48, acc, nfe, 1.0, 0.1, 10)  # noqa: E731
    rows = [mk2("threshold", (("tau", 0.9),), 0.999, 5.53), mk2("factor", (("f", 1.0),), 0.999, 5.53),
            mk2("eb", (("gamma", 0.1),), 0.99, 5.53), mk2("learned", (("cutoff", 0.5),), 0.99, 5.4),
            mk2("learned", (("cutoff", 0.9),), 0.999, 5.53),
            mk2("learned", (("policy", "p"),), 0.99, 5.4)] + rows  # ties the cutoff 0.5 row exactly
    assert tables(rows, testbed=TESTBED) == tables(rows[::-1], testbed=TESTBED)
    assert tables(rows, testbed=TESTBED) == tables(rows[2:] + rows[:2], testbed=TESTBED)


def test_pareto_front():
    mk = lambda acc, nfe: Row("t", "s", (("x", acc),), 8, 48, acc, nfe, 1.0, 0.1, 10)  # noqa: E731
    rows = [mk(0.9, 10), mk(0.8, 5), mk(0.85, 12), mk(0.95, 20), mk(0.7, 5)]
    front = pareto(rows)
    assert [(r.acc, r.nfe) for r in front] == [(0.8, 5), (0.9, 10), (0.95, 20)]


def test_runs_are_keyed_by_the_weights(tmp_path):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    a = Grid(tasks=["t"], blocks=[8], samplers=[], pretrained=str(build_tiny_checkpoint(tmp_path / "a", seed=0)))
    b = Grid(tasks=["t"], blocks=[8], samplers=[], pretrained=str(build_tiny_checkpoint(tmp_path / "b", seed=1)))
    assert a.fingerprint != b.fingerprint and a.run_dir("t") != b.run_dir("t")
    assert Grid(tasks=["t"], blocks=[], samplers=[], pretrained="org/model").fingerprint == "hub"


def test_setting_keys_are_stable_and_distinct():
    keys = {Setting.make(s, p, b).key for s, p in TESTBED for b in (8, 48)}
    assert len(keys) == 2 * len(TESTBED)
    assert Setting.make("threshold", {"tau": 0.9}, 8).key == "threshold-tau0.9-B8"
    assert "pretrained=x" in Setting.make("eb", {}, 8).model_args("x", 4, 1)


def test_one_token_per_step_runs_only_at_the_ends_of_the_block_range():
    keys = {s.key for s in Grid(tasks=["t"], blocks=[8, 16, 48], samplers=["confidence", "random"]).settings()}
    for k1 in ("confidence-k1", "random-k1"):
        assert {f"{k1}-B8", f"{k1}-B48"} <= keys and f"{k1}-B16" not in keys
    assert {"confidence-k2-B16", "random-k4-B16"} <= keys
    only = {s.key for s in Grid(tasks=["t"], blocks=[16], samplers=["confidence"]).settings()}
    assert "confidence-k1-B16" in only  # a single block size is both ends


def test_rerun_skips_finished_runs(tmp_path, monkeypatch):
    """A run whose file exists is not run again (an interrupted sweep resumes)."""
    import lm_eval

    from results.grid import run_grid

    grid = Grid(tasks=["modchain"], blocks=[8], samplers=["threshold"], limit=2, out=tmp_path,
                only=[("threshold", {"tau": 0.9})])
    path = grid.path("modchain", grid.settings()[0])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dllm_setting": {"task": "modchain"}}))  # what run_file_ok reads
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: pytest.fail("re-ran a finished run"))
    assert run_grid(grid) == [path]


def test_learned_runs_only_with_a_policy_and_are_keyed_by_its_weights(tmp_path, caplog):
    from policies import catalog

    g = Grid(tasks=["t"], blocks=[48], samplers=["learned", "threshold"], pretrained="org/model")
    with caplog.at_level("WARNING"):
        assert {s.sampler for s in g.settings()} == {"threshold"}
    assert "skipping sampler 'learned': no shipped policy for org/model" in caplog.text
    if not any(e["base_model"] == "bundled:tiny-modchain" for e in catalog()):
        pytest.skip("no shipped policy for the bundled model")
    learned = [s for s in Grid(tasks=["t"], blocks=[48], samplers=["learned"]).settings()]
    assert learned and all(s.policy_tag and f"-pol{s.policy_tag}-B48" in s.key for s in learned)
    from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy

    UnmaskPolicy(PolicyConfig()).save(tmp_path / "p")
    other = Grid(tasks=["t"], blocks=[48], samplers=["learned"], policy=str(tmp_path / "p")).settings()
    assert other[0].policy_tag != learned[0].policy_tag and f"policy={tmp_path / 'p'}" in other[0].model_args(None, 4, 1)


def test_learned_run_keys_follow_the_one_policy_each_run_uses(tmp_path, monkeypatch):
    import shutil

    import policies
    from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy

    for name, block in (("p16", 16), ("p48", 48)):
        UnmaskPolicy(PolicyConfig(block=block, gen_length=48, base_model="bundled:tiny-modchain",
                                  task="modchain")).save(tmp_path / name, card={"alpha": 1.0})
    monkeypatch.setattr(policies, "HERE", tmp_path)
    grid = Grid(tasks=["t"], blocks=[16, 48], samplers=["learned"], out=tmp_path / "out")
    before = {s.key for s in grid.settings()}
    assert len({s.policy_tag for s in grid.settings()}) == 2  # one tag per policy, not one for all

    shutil.copytree(tmp_path / "p48", tmp_path / "p48-alpha8")  # a second policy for B = 48 ...
    meta = json.loads((tmp_path / "p48-alpha8" / "policy.json").read_text())
    meta["card"]["alpha"] = 8.0
    (tmp_path / "p48-alpha8" / "policy.json").write_text(json.dumps(meta))
    after = {s.key for s in grid.settings()}
    assert before < after and all("policyp48-alpha8" in k for k in after - before)  # ... adds runs, keeps the old

    UnmaskPolicy(PolicyConfig(block=16, gen_length=48, base_model="bundled:tiny-modchain", task="modchain",
                              init_tau=0.5)).save(tmp_path / "p16", card={"alpha": 1.0})  # retrained
    again = {s.key for s in grid.settings()}
    assert {k for k in again if k.endswith("B48")} == {k for k in after if k.endswith("B48")}
    assert not {k for k in again if k.endswith("B16")} & {k for k in after if k.endswith("B16")}

    # the report keeps a run file only while its setting's policy is unchanged
    s16 = next(s for s in grid.settings() if s.block == 16)
    stale = grid.path("t", s16).with_name(next(k for k in after if k.endswith("B16")) + ".json")
    fresh = grid.path("t", s16)
    for f, st in ((stale, s16), (fresh, s16)):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"dllm_setting": {"params": dict(st.params), "block": st.block}}))
    assert grid.is_current(fresh) and not grid.is_current(stale)


def test_only_the_default_grid_writes_results_readme(monkeypatch, tmp_path):
    import results.__main__ as cli

    calls = []
    monkeypatch.setattr(cli, "report_paths", lambda grid: [])
    monkeypatch.setattr(cli, "report", lambda grid, paths, nfe, results_readme: calls.append(results_readme))
    for argv in (["report"], ["report", "--seed", "7"], ["report", "--limit", "10"], ["report", "--dtype", "float32"],
                 ["report", "--out", str(tmp_path)], ["report", "--out", str(RESULTS)], ["report", "--blocks", "8"]):
        cli.main(argv)
    assert calls == [True, False, False, False, False, True, True]


def test_dtype_benchmark_runs_and_prints_its_table(capsys):
    from benchmarks.dtype import SETTINGS, main

    main(["--limit", "4", "--no-write"])
    out = capsys.readouterr().out
    assert "time float32 / bfloat16" in out and out.count("\n| ") == len(SETTINGS) + 1  # header and rows


def test_stats_time_benchmark_runs_and_prints_its_table(capsys):
    from benchmarks.stats_time import main

    with pytest.raises(SystemExit, match="^benchmarks.stats_time: error: --repeats 0; valid: a positive number$"):
        main(["--repeats", "0"])
    main(["--rows", "1", "--positions", "2", "--repeats", "1", "--no-write"])
    out = capsys.readouterr().out
    assert "python -m benchmarks.stats_time --rows 1 --positions 2 --repeats 1 --no-write" in out
    assert "every / alone" in out and out.count("\n| ") == 3  # header and two temperatures


def test_failure_kinds_and_the_failures_benchmark(capsys):
    from benchmarks.failures import kinds, main, settings

    docs = [{"answer": "3+7=0\n#### 0"}, {"answer": "3+7=0\n0*4=0\n#### 0"}, {"answer": "1+1=2\n#### 2"}]
    texts = ["3+7=1\n#### 1", "3+7=0\n#### 0", "1+1=2\n#### 2"]  # a wrong digit, a wrong end, right
    assert kinds(texts, docs) == (1, 1)
    main(["--limit", "4", "--no-write"])
    out = capsys.readouterr().out
    assert "end in the wrong place" in out and out.count("\n| ") == len(settings()) + 1


def test_the_validation_benchmark_reads_the_validation_split(capsys):
    from benchmarks.validation import main
    from lm_eval_dllm.tiny import BUNDLED_ID
    from lm_eval_dllm.tasks import modchain
    from policies import variants_for

    docs = [{"answer": "1+1=2\n#### 2"}, {"answer": "2+2=4\n#### 4"}]
    assert modchain.final_answers_right(["1+2=2\n#### 2", "2+2=4\n#### 5"], docs) == 1  # the final answer only
    main(["--limit", "4", "--block", "48", "--cutoffs", "0.1,0.9", "--taus", "0.9"])
    out = capsys.readouterr().out
    assert "on 4 modchain validation problems" in out
    assert out.count("\n| learned(") == 3 * len(variants_for(BUNDLED_ID, 48)) and "| threshold(tau=0.9)" in out
    assert out.count("\n| learned(policy=") == len(variants_for(BUNDLED_ID, 48))  # each card's own setting
    with pytest.raises(SystemExit, match="--limit 0; valid: a positive number of validation problems"):
        main(["--limit", "0"])


def test_same_seed_same_numbers(tmp_path):
    """Rerunning a grid from scratch with the same seed gives identical results (seeded samplers too)."""
    from results.grid import run_grid

    def once(out):
        g = Grid(tasks=["modchain"], blocks=[48], samplers=["random"], limit=12, out=out, seed=7,
                 only=[("random", {"k": 4})])
        (path,) = run_grid(g)
        return json.loads(path.read_text())["results"]["modchain"]

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    keys = ("exact_match,strict-match", "nfe,none", "tpf,none")
    assert [a[k] for k in keys] == [b[k] for k in keys]


def test_seed_noise_table_and_the_noise_verdict():
    from results.seeds import seed_table
    from results.report import learned_vs_heuristics

    mk = lambda c, acc, nfe, se=0.0: Row("t", "learned", (("cutoff", c),), 48, 48, acc, nfe, 1.0, 0.1, 1000,  # noqa: E731
                                         stderr=se)
    text = seed_table({"a": [mk(0.5, 0.98, 3.0), mk(0.9, 0.99, 20.0)], "b": [mk(0.5, 0.95, 2.8), mk(0.9, 0.99, 21.0)]})
    cells = lambda key: [c.strip() for c in next(x for x in text.splitlines() if key in x).split("|")[1:-1]]  # noqa: E731
    assert cells("cutoff=0.5") == ["t", "full diffusion (B = L = 48)", "learned(cutoff=0.5)", "98.0 @ 3.00",
                                   "95.0 @ 2.80", "3.0", "0.20"]
    assert cells("cutoff=0.9")[-2:] == ["0.0", "1.00"]
    assert "Largest accuracy range over the settings: 3.0 points." in text
    # a shipped policy's rows carry its name as a parameter: still one row per setting
    named = lambda c, acc, nfe: Row("t", "learned", (("cutoff", c), ("policy", "m-B48-a8")), 48, 48, acc, nfe,  # noqa: E731
                                    1.0, 0.1, 1000)
    assert seed_table({"m-B48-a8": [named(0.5, 0.98, 3.0), named(0.9, 0.99, 20.0)],
                       "b": [mk(0.5, 0.95, 2.8), mk(0.9, 0.99, 21.0)]}) == text.replace("`a`", "`m-B48-a8`")
    # the learned-vs-heuristic summary says whether the margin is beyond twice its standard error
    heur = Row("t", "threshold", (("tau", 0.9),), 48, 48, 0.95, 3.0, 1.0, 0.1, 1000, stderr=0.007)
    near = learned_vs_heuristics([heur, mk(0.5, 0.96, 3.0, 0.006)])
    far = learned_vs_heuristics([heur, mk(0.5, 0.99, 3.0, 0.003)])
    worse = learned_vs_heuristics([heur, mk(0.5, 0.80, 3.0, 0.013)])
    assert "+1.0 points; 2 standard errors = 1.8: within noise" in near
    assert "+4.0 points; 2 standard errors = 1.5: learned better, beyond noise" in far
    assert "-15.0 points; 2 standard errors = 3.0: learned worse, beyond noise" in worse
    # "within 1 point": the most accurate learned setting at no more NFE is at most 1 point below
    assert "1 of 1 within 1 point" in near and "0 of 1 within 1 point" in worse
    assert "0 of 1 heuristic settings matched, 1 of 1 within 1 point" in learned_vs_heuristics(
        [heur, mk(0.5, 0.94, 3.0)])


def test_seed_verdict_compares_every_policy_with_the_best_heuristic_at_the_reference_nfe():
    from results.seeds import seed_table

    mk = lambda c, acc, nfe: Row("t", "learned", (("cutoff", c),), 48, 48, acc, nfe, 1.0, 0.1, 1000)  # noqa: E731
    heur = [Row("t", "threshold", (("tau", 0.9),), 48, 48, 0.87, 3.8, 1.0, 0.1, 1000),
            Row("t", "factor", (("f", 1.0),), 48, 48, 0.88, 3.7, 1.0, 0.1, 1000),  # the best heuristic there
            Row("t", "threshold", (("tau", 0.99),), 48, 48, 0.99, 4.4, 1.0, 0.1, 1000)]  # over budget
    close = {"a": [mk(0.5, 0.92, 3.8), mk(0.9, 0.99, 3.9)], "b": [mk(0.5, 0.90, 3.8)], "c": [mk(0.5, 0.91, 3.7)]}
    text = seed_table(close, heur)
    assert "best heuristic factor(f=1.0) 88.0 %" in text
    assert "margins +4.0, +2.0, +3.0 points, mean +3.0; run-to-run range 2.0 points: the margin is larger" in text
    assert ("heuristic settings matched by each policy's sweep alone: 2, 1, 2 of 3; by every policy: "
            "threshold(tau=0.9); by some but not all: factor(f=1.0) (policy 3); threshold(tau=0.99) (policy 1)") in text
    noisy = {"a": [mk(0.5, 0.95, 3.8)], "b": [mk(0.5, 0.89, 3.8)]}
    assert "range 6.0 points: the margin is not larger" in seed_table(noisy, heur)
    assert "the margin is" not in seed_table(noisy)  # no heuristic runs: no verdict


def test_nfe_axis_ticks_wide_and_narrow_ranges():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from results.report import log_nfe_axis

    def labels(xs):
        fig, ax = plt.subplots()
        ax.plot(xs, [1] * len(xs))
        log_nfe_axis(ax)
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        out = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
        plt.close(fig)
        return out

    assert labels([2.2, 3.0, 12.0, 48.0]) == ["2", "3", "5", "10", "20", "50"]
    assert len(labels([2.2, 2.9])) == 3  # too narrow for two round ticks: three inside the range


def test_figures_draw_each_policy_thin_and_the_learned_front_bold(tmp_path, monkeypatch):
    import matplotlib.axes

    from results.report import Row, figures

    mk = lambda s, p, acc, nfe, b=48: Row("t", s, p, b, 48, acc, nfe, 1.0, 0.1, 10)  # noqa: E731
    rows = [mk("threshold", (("tau", 0.9),), 0.8, 4.0), mk("threshold", (("tau", 0.5),), 0.5, 3.0),
            mk("threshold", (("tau", 0.99),), 0.95, 6.0),
            mk("learned", (("cutoff", 0.5),), 0.9, 4.0), mk("learned", (("cutoff", 0.1),), 0.6, 3.5),
            mk("learned", (("cutoff", 0.5), ("policy", "p-a32")), 0.7, 3.0),
            mk("learned", (("cutoff", 0.9), ("policy", "p-a32")), 0.55, 3.6)]
    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append((a, k)) or real(ax, *a, **k))
    paths = figures(rows, tmp_path)
    assert [p.name for p in paths] == ["t_acc_vs_nfe.png", "t_acc_vs_block.png"] and all(p.stat().st_size for p in paths)
    thin = [a for a, k in drawn if k.get("label") == "learned: one policy's cutoff sweep"]
    front = [a for a, k in drawn if k.get("label") == "learned: best over the policies"]
    assert len(thin) == 2  # one per policy
    assert [list(front[0][0]), list(front[0][1])] == [[3.0, 4.0], [70.0, 90.0]]  # dominated points left out
    # the block figure: best accuracy within NFE L/4 = 12, then within tau 0.9's NFE (4.0) at each block
    block = [(list(a[0]), list(a[1])) for a, k in drawn if k.get("label") == "threshold" and list(a[0]) == [48]]
    assert block == [([48], [95.0]), ([48], [80.0])]


def test_targets_state_each_goal_met_or_missed_with_its_number():
    from results.report import targets

    def mk(s, p, b, acc, nfe):
        return Row("t", s, p, b, 48, acc, nfe, 1.0, 0.1, 1000)
    full = [mk("threshold", (("tau", 0.9),), 48, 0.873, 3.84), mk("threshold", (("tau", 0.99),), 48, 0.99, 4.42),
            mk("learned", (("cutoff", 0.5), ("mode", "greedy")), 48, 0.986, 3.99),
            mk("learned", (("cutoff", 0.9), ("mode", "greedy")), 48, 0.995, 4.4), mk("learned", (), 48, 0.98, 3.84)]
    semi = [mk("threshold", (("tau", 0.9),), 8, 0.99, 5.06), mk("learned", (), 8, 0.998, 5.0),
            mk("learned", (("policy", "cheap"),), 8, 0.9, 4.5)]
    text = targets(full + semi)
    assert "- full diffusion (B = L = 48): every heuristic setting matched by a learned one: met" in text
    assert ">= 99.5 % at <= 4.0 NFE: missed by 0.9 points (best: learned(cutoff=0.5, mode=greedy) 98.6 ± 0.0 % (1 SE) @ 3.99)" in text
    assert "as typed, learned: 98.0 % @ 3.84; best heuristic at no more NFE threshold(tau=0.9) 87.3 % @ 3.84: met" in text
    assert "as typed, learned(policy=cheap): 90.0 % @ 4.50; no heuristic setting spends so few NFE" in text
    assert "- B = 8: every heuristic setting matched by a learned one: met" in text
    semi.append(mk("threshold", (("tau", 0.7),), 8, 0.958, 4.4))
    assert "missed for 1 of 2 (threshold(tau=0.7) 95.8 % @ 4.40)" in targets(semi)
