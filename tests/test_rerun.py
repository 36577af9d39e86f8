"""Committed grid runs rerun alone: one setting, by itself in a fresh process, gives the numbers of its
run file under results/runs/ exactly (every metric but wall time).

    python -m pytest -q tests/test_rerun.py

The committed files came from one long process that ran the whole grid; a setting's result must not
depend on what ran before it. Cheap settings (a few seconds each on a quiet CPU, run side by side): bf16 threshold and
a shipped learned policy at full diffusion, and threshold with the prefix cache at block 8 (from the
testbed grid run with --cache prefix).
"""

import json
import os
import sys
from pathlib import Path

import pytest

from .background import finish, selected, start, stop

ROOT = Path(__file__).resolve().parents[1]
RERUN = [("threshold", {"tau": 0.5}, 48, "none"),
         ("learned", {"alpha": 16.0}, 48, "none"),  # the shipped alpha-conditioned policy, at one alpha of its sweep
         ("threshold", {"tau": 0.9}, 8, "prefix")]  # of `python -m results --preset testbed --cache prefix`
ONE_SETTING = """
import json, sys
from pathlib import Path
from results.grid import Grid, run_grid
sampler, params, block, cache, out = json.loads(sys.argv[1])
grid = Grid(tasks=["modchain"], blocks=[block], samplers=[sampler], only=[(sampler, params)],
            batch_size=64, out=Path(out), cache=cache)
print(run_grid(grid)[0])
"""


def _numbers(path: Path) -> dict:
    row = json.loads(path.read_text())["results"]["modchain"]
    return {k: v for k, v in row.items() if not k.startswith("wall_s")}


@pytest.fixture(scope="module")
def reruns(request, tmp_path_factory):
    """The selected settings' fresh processes, started together (one torch thread each: results do
    not depend on the thread count, and the processes share the cores); each test waits for its own."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = {}
    for item in selected(request, "test_a_committed_setting_rerun_alone_equals_its_run_file"):
        args = item.callspec.params
        setting = [args["sampler"], args["params"], args["block"], args["cache"]]
        out = tmp_path_factory.mktemp("rerun")
        procs[json.dumps(setting)] = (start([sys.executable, "-c", ONE_SETTING, json.dumps(setting + [str(out)])],
                                            out / "log", cwd=ROOT, env=env), out)
    yield procs
    for proc, _ in procs.values():
        stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("sampler,params,block,cache", RERUN, ids=lambda x: str(x))
def test_a_committed_setting_rerun_alone_equals_its_run_file(sampler, params, block, cache, reruns):
    proc, out = reruns[json.dumps([sampler, params, block, cache])]
    r = finish(proc, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    new = Path(r.stdout.strip().splitlines()[-1])
    committed = ROOT / "results" / new.relative_to(out)
    assert committed.exists(), f"no committed run file {committed.relative_to(ROOT)}"
    assert _numbers(new) == _numbers(committed)
