"""Test subprocesses started together, waited for when a test needs their result.

Most of a subprocess's time here is single-threaded (seconds of imports, then a tiny model): two of
them started at once take the time of one on a 2-core machine. Their output goes to files, not
pipes: a process that fills a pipe nobody reads yet would stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Popen(cmd, **kw) with stdout to LOG.out and stderr to LOG.err."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kw)
    proc.log = log
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kill it if it still runs (a test that failed, or was not selected, before waiting for it)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """What subprocess.run(cmd, capture_output=True, text=True, timeout=timeout) returns."""
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, Path(f"{proc.log}.out").read_text(),
                                       Path(f"{proc.log}.err").read_text())


def selected(request, test: str) -> list:
    """The selected items of this session that are (parametrizations of) the function `test`."""
    return [it for it in request.session.items if getattr(it, "originalname", None) == test]


class Early:
    """The subprocesses of a module's slow tests, started as the module begins (those whose test is
    selected), so that they run while its other tests do; each test waits for its own. Use it from a
    module-scoped autouse fixture: `early.start(key, cmd)` with `early.out(key)` as the output folder,
    the key being the test's name (or, with `test=` that name, one per parametrization)."""

    def __init__(self, request, folder: Path):
        self.request, self.folder = request, folder
        self.procs: dict[str, subprocess.Popen] = {}

    def out(self, key: str) -> Path:
        return self.folder / key

    def start(self, key: str, cmd: list[str], test: str = "", **kw) -> None:
        if any(it.module is self.request.module for it in selected(self.request, test or key)):
            self.procs[key] = start(cmd, self.out(key) / "log", **kw)

    def result(self, key: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return finish(self.procs[key], timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)


class OracleRuns:
    """`python -m <module> <key> <flags> <folder>` per key (`tests/native_oracle.py`,
    `tests/moe_oracle.py`), all running while the tests wait. One process per model gives every
    report a test module needs of it (logits and decode), instead of one process per test."""

    def __init__(self, module: str, folder: Path, timeout: float):
        self.module, self.folder, self.timeout = module, folder, timeout
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, key: str, *flags: str) -> None:
        out = self.folder / key
        self.procs[key] = start([sys.executable, "-m", self.module, key, *flags, str(out)], out / "oracle", cwd=ROOT)

    def report(self, key: str) -> dict:
        r = finish(self.procs[key], self.timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)
