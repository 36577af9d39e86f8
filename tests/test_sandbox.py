"""The sandbox's mechanics: limits, statuses, cleanup, processes. Each call returns promptly.

    nice -n 19 python -m pytest tests/test_sandbox.py tests/test_sandbox_hostile.py -q

Tests named *_os switch the Python guard off, to check the OS containment on its own.
Hostile programs that try to escape are in test_sandbox_hostile.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

import pytest

from lm_eval_dllm import sandbox
from lm_eval_dllm.sandbox import run_python

pytestmark = pytest.mark.skipif(not sandbox.isolation().sandboxed,
                                reason=f"no sandbox here: {sandbox.isolation().reason}")


def _leftovers() -> set[str]:
    """Our run folders in the temporary directory (each run must remove its own)."""
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith(sandbox.TMP_PREFIX)}


def _survivors(marker: str) -> list[int]:
    """Live processes whose command line carries `marker` (zombies have an empty one)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def _gone(marker: str, within_s: float = 2.0) -> bool:
    """SIGKILL is asynchronous: allow the kernel a moment to finish the kills."""
    deadline = time.monotonic() + within_s
    while _survivors(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _python_with_nproc() -> str:
    """An interpreter whose programs RLIMIT_NPROC applies to (as root: one `nobody` can run)."""
    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if exe and sandbox.isolation(exe).nproc_enforced:
            return exe
    pytest.skip("programs would run as root, to whom the kernel does not apply RLIMIT_NPROC")


def _still_works() -> None:
    """The test process and the sandbox are unaffected by what ran before."""
    assert run_python("print('ok')", timeout_s=5).stdout == "ok\n"


def test_normal_program_passes_with_its_output():
    r = run_python("import os, sys\nprint(sum(range(10)))\nprint(os.getpid(), sys.flags.isolated)")
    assert r.passed and r.status == "passed" and r.returncode == 0 and r.stderr == ""
    total, line = r.stdout.splitlines()
    pid, isolated = line.split()
    assert total == "45" and isolated == "1" and int(pid) != os.getpid()


def test_failures_are_reported():
    r = run_python("assert 1 + 1 == 3")
    assert not r.passed and r.status == "failed" and r.returncode == 1
    assert "AssertionError" in r.stderr
    assert run_python("def f(:\n").status == "failed"  # a syntax error


def test_runs_in_fresh_temp_dir_with_minimal_env_which_is_removed(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    before = _leftovers()
    r = run_python("import os, json\nprint(json.dumps([os.getcwd(), dict(os.environ)]))\n"
                   "open('scratch.txt', 'w').write('x')")
    assert r.passed and r.finished, r.stderr
    cwd, env = json.loads(r.stdout)
    assert cwd == sandbox.SANDBOX_DIR and env["HOME"] == env["TMPDIR"] == cwd
    assert "HTTPS_PROXY" not in env and "SECRET_TOKEN" not in env
    assert _leftovers() <= before


def test_a_link_planted_in_place_of_the_temp_dir_is_not_followed(tmp_path):
    """The program removes its own directory and puts a link to outside in its place: cleanup
    must neither follow it (chmod/delete outside) nor crash."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    os.chmod(victim / "sub", 0o755)
    r = run_python(f"import os, shutil\nd = os.getcwd()\nshutil.rmtree(d)\nos.symlink({str(victim)!r}, d)\n",
                   guard=False)
    assert r.status in ("passed", "failed")
    assert (victim / "sub").is_dir() and (victim / "sub").stat().st_mode & 0o777 == 0o755


def test_resource_limits_are_set_before_the_program_runs():
    r = run_python("import resource as r\n"
                   "for n in ('AS', 'CPU', 'FSIZE', 'NOFILE', 'NPROC', 'CORE'):\n"
                   "    print(n, *r.getrlimit(getattr(r, 'RLIMIT_' + n)))", timeout_s=2, memory_mb=300)
    assert r.passed, r.stderr
    lim = {name: (int(soft), int(hard)) for name, soft, hard in map(str.split, r.stdout.splitlines())}
    assert lim["AS"] == (300 << 20, 300 << 20)
    assert lim["CPU"][0] == 3 and lim["CPU"][1] <= 4
    assert lim["FSIZE"][1] <= sandbox.MAX_FILE_BYTES
    assert lim["NOFILE"][1] <= sandbox.MAX_OPEN_FILES
    assert 0 < lim["NPROC"][0] == lim["NPROC"][1] < 100_000
    assert lim["CORE"] == (0, 0)


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed and r.returncode == -9
    assert 1.0 <= r.seconds < 2.0


def test_timeout_also_removes_the_temp_dir():
    before = _leftovers()
    r = run_python("import os, sys, time\nprint(os.getcwd(), flush=True)\ntime.sleep(60)", timeout_s=0.5)
    assert r.status == "timeout" and not r.finished
    assert _leftovers() <= before


def test_memory_limit():
    r = run_python("x = bytearray(2 << 30)", memory_mb=256)
    assert r.status == "memory" and not r.passed and "MemoryError" in r.stderr
    _still_works()


def test_huge_output_is_capped_and_cut_short():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)", timeout_s=10,
                   max_output_bytes=10_000)
    assert r.status == "output_limit" and not r.passed
    assert len(r.stdout) == 10_000 and r.seconds < 2.0


def test_huge_files_are_refused():
    r = run_python(f"open('big.bin', 'wb').write(b'x' * {2 * sandbox.MAX_FILE_BYTES})")
    assert r.status == "failed" and "File too large" in r.stderr


def test_fork_bomb_is_refused_by_the_guard():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=1.0)
    assert r.status == "failed" and "fork() is disabled" in r.stderr
    _still_works()


def test_fork_bomb_is_contained_by_rlimit_nproc_os():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=1.0, guard=False,
                   python=_python_with_nproc())
    assert not r.passed and r.seconds < 3.0
    assert "Resource temporarily unavailable" in r.stderr  # fork() hit RLIMIT_NPROC
    assert _gone(sandbox.TMP_PREFIX)  # every fork has the program's path on its command line
    _still_works()


def _spawns_orphan(marker: str, setsid: bool = False) -> str:
    """A program whose child outlives it: the child sleeps with `marker` on its command line."""
    return ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'],\n"
            f"                 start_new_session={setsid})\n"
            "print('spawned', flush=True)\n")


def test_child_processes_are_refused_by_the_guard():
    r = run_python(_spawns_orphan("unused"))
    assert r.status == "failed" and "subprocess.Popen() is disabled" in r.stderr


@pytest.fixture(params=["sandboxed", "unsandboxed_allowed"])
def isolation_mode(request, monkeypatch):
    """Also run without bubblewrap (explicitly allowed), so the process-group kill is tested alone."""
    if request.param == "unsandboxed_allowed":
        probed = sandbox.isolation
        monkeypatch.setattr(sandbox, "isolation",
                            lambda python=None: dataclasses.replace(probed(python), bwrap=()))
        monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    return request.param


def test_child_that_outlives_the_parent_is_killed_os(isolation_mode):
    marker = f"orphan-{uuid.uuid4().hex}"
    r = run_python(_spawns_orphan(marker), timeout_s=5, guard=False)
    # The parent itself exited 0, so the run passes; what matters is that its child is gone.
    assert r.stdout == "spawned\n" and r.seconds < 3.0
    assert _gone(marker)


def test_child_that_left_the_process_group_is_killed_os():
    marker = f"escapee-{uuid.uuid4().hex}"
    r = run_python(_spawns_orphan(marker, setsid=True), timeout_s=5, guard=False)
    assert r.stdout == "spawned\n" and r.seconds < 3.0
    assert _gone(marker)  # the pid namespace died with the program


def test_timeout_kills_grandchildren_too_os(isolation_mode):
    marker = f"grandchild-{uuid.uuid4().hex}"
    program = _spawns_orphan(marker) + "import time\ntime.sleep(60)\n"
    r = run_python(program, timeout_s=1.0, guard=False)
    assert r.status == "timeout" and r.seconds < 2.0
    assert _gone(marker)


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def _connects(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_sockets_are_refused_by_the_guard(listener):
    r = run_python(_connects(listener.getsockname()[1]), timeout_s=3)
    assert r.status == "failed" and "sockets are disabled" in r.stderr
    assert not _accepted(listener)


def test_no_network_in_the_namespace_os(listener):
    r = run_python(_connects(listener.getsockname()[1]), timeout_s=3, guard=False)
    assert r.status == "failed" and not _accepted(listener)


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    target = tmp_path / "written.txt"
    for program in (f"open({str(target)!r}, 'w').write('pwned')",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                    f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('pwned')"):
        r = run_python(program)  # refused by the guard, or (/tmp is the sandbox's own) not there
        assert r.status == "failed" and ("PermissionError" in r.stderr or "No such file" in r.stderr), program
        assert not target.exists()


def test_deleting_outside_the_temp_dir_is_refused(tmp_path):
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    for program in (f"import os\nos.remove({str(victim)!r})",
                    f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
                    f"import shutil\nshutil.rmtree({str(victim.parent)!r})",
                    f"import pathlib\npathlib.Path({str(victim)!r}).unlink()"):
        r = run_python(program)  # refused by the guard, or the path is not even visible
        assert r.status == "failed" and ("PermissionError" in r.stderr or "No such file" in r.stderr), program
        assert victim.read_text() == "precious"


def test_files_inside_the_temp_dir_are_fine():
    r = run_python("import os, shutil, tempfile\n"
                   "os.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('x')\n"
                   "os.rename('a/b/f.txt', 'a/g.txt')\nfd, p = tempfile.mkstemp()\nos.close(fd)\n"
                   "os.remove(p)\nshutil.rmtree('a')\nprint(os.listdir('.'))")
    assert r.passed, r.stderr
    assert r.stdout == "['main.py']\n"


def test_temp_dir_is_removed_even_when_the_program_locks_it():
    before = _leftovers()
    r = run_python("import os\nos.makedirs('d/e')\nopen('d/e/f', 'w').close()\n"
                   "os.chmod('d/e', 0)\nos.chmod('d', 0)\nprint(os.getcwd())")
    assert r.passed, r.stderr
    assert _leftovers() <= before
