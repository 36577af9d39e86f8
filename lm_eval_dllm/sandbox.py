"""Run untrusted, model-written Python in a contained subprocess.

    from lm_eval_dllm.sandbox import run_python
    result = run_python("print(sum(range(10)))", timeout_s=2)
    result.passed, result.stdout          # (True, '45\\n')

What contains a hostile program is the operating system, not Python:
- a fresh interpreter (`python -I -B`) in its own session and process group; the whole group
  is SIGKILLed at the wall-clock deadline, when the output passes its cap, and after the
  program exits (so children it left behind die too);
- rlimits set in the child before exec: address space (memory), CPU seconds (a backstop to the
  wall clock), file size, open files, no core files, and processes. On Linux RLIMIT_NPROC
  counts every task (thread) of the *user*, not of the program, so it is set to the user's
  current count plus EXTRA_PROCESSES, computed per run from /proc;
- a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards (also after a
  timeout); a minimal environment (no proxies, tokens or credentials);
- where it works (probed once per interpreter, without privileges): `unshare --user --net
  --pid`, so the program has no network (a fresh namespace whose loopback is down) and every
  process it starts, even one that left the process group with setsid(), dies with it;
- as root, the program runs as `nobody`, because the kernel does not apply RLIMIT_NPROC to
  root. That needs an interpreter `nobody` can execute; if it cannot (e.g. a venv under a 0700
  /root), the program runs as root, a warning is logged and forks are bounded only by the
  deadline (and the guard).

A Python-level guard runs before the program (guard=True, the default): it refuses sockets,
process creation and signals (os.system/fork/exec*/spawn*/kill/setsid, subprocess,
multiprocessing), ctypes, and file writes, renames and deletions outside the temporary
directory. It is defence in depth, NOT a security boundary: a determined program can reach
the raw `_io`/`posix` functions again. Only the OS mechanisms above contain loops, fork bombs,
memory and output; files outside the temporary directory are protected by the OS only when
the program runs as a user that cannot write them. Linux only.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

NOBODY = 65534                 # uid and gid a program runs as when we are root
EXTRA_PROCESSES = 32           # tasks (processes and threads) a program may add to its user's count
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 16 << 20      # largest file a program may write
MEMORY_EXIT = 121              # the prelude's exit code for an uncaught MemoryError
TMP_PREFIX = "lm_eval_dllm-sandbox-"
UNSHARE_ARGS = ("--user", "--net", "--pid", "--fork", "--kill-child", "--")

# Executed by `python -I -B -c _PRELUDE main.py GUARD MEMORY_EXIT`: installs the guard, then runs
# main.py as __main__. Standard library only; it is a string because it runs in the child.
_PRELUDE = r'''
import os, sys, types
_path, _guard, _memory_exit = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")

def _install_guard(root):
    import builtins, io, posix, shutil, socket, subprocess, _posixsubprocess, _socket
    root, realpath, readlink = os.path.realpath(root), os.path.realpath, os.readlink

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # a descriptor: judge the file it is open on
            path = readlink(f"/proc/self/fd/{path}")
            if not path.startswith("/"):  # a pipe, socket or anonymous file
                return True
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = realpath(path)
        return path == root or path.startswith(root + os.sep)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {name}() is disabled")
        return refused

    def confine(fn, params):  # params: positional names; "_" is not a path to check
        def confined(*args, **kwargs):
            for i, name in enumerate(params):
                path = args[i] if i < len(args) else kwargs.get(name)
                dir_fd = kwargs.get("dir_fd" if name == "path" else f"{name}_dir_fd")
                if name != "_" and path is not None and not inside(path, dir_fd):
                    raise PermissionError(f"sandbox: {fn.__name__}() outside {root}: {path!r}")
            return fn(*args, **kwargs)
        return confined

    def opener(fn, writes):
        def guarded_open(file, *args, **kwargs):
            if writes(args, kwargs) and not inside(file, kwargs.get("dir_fd")):
                raise PermissionError(f"sandbox: writing outside {root}: {file!r}")
            return fn(file, *args, **kwargs)
        return guarded_open

    def mode_writes(args, kwargs):
        return any(c in (args[0] if args else kwargs.get("mode", "r")) for c in "wax+")

    def flags_write(args, kwargs):
        flags = args[0] if args else kwargs.get("flags", 0)
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))

    patches = {"open": opener(os.open, flags_write)}
    for params, names in [(("path",), "remove unlink rmdir mkdir mkfifo mknod truncate chmod "
                                       "chown lchown utime setxattr removexattr"),
                          (("src", "dst"), "rename replace link"), (("_", "dst"), "symlink")]:
        patches.update({n: confine(getattr(os, n), params) for n in names.split() if hasattr(os, n)})
    for name in dir(os):
        if name.startswith(("exec", "spawn", "posix_spawn")) or name in (
                "system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid",
                "setpgrp", "chroot"):
            patches[name] = refuse(name)
    for module in (os, posix):
        for name, fn in patches.items():
            if hasattr(module, name):
                setattr(module, name, fn)

    builtins.open = io.open = opener(io.open, mode_writes)
    subprocess.Popen = refuse("subprocess.Popen")
    _posixsubprocess.fork_exec = refuse("fork_exec")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: sockets are disabled")
    socket.socket = _socket.socket = NoSocket
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None  # import fails: no calling libc directly

if _guard:
    _install_guard(os.getcwd())
_main = types.ModuleType("__main__")
_main.__file__, _main.__builtins__ = _path, __builtins__
sys.modules["__main__"], sys.argv = _main, [_path]
try:
    exec(_code, _main.__dict__)
except MemoryError:
    try:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        os._exit(_memory_exit)
'''


@dataclass(frozen=True)
class SandboxResult:
    status: str          # passed | failed | timeout | memory | output_limit
    returncode: int      # negative: killed by that signal (-9 after timeout or output_limit)
    stdout: str          # the first max_output_bytes of each stream, decoded
    stderr: str
    seconds: float       # wall time, interpreter start included

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """How programs run with a given interpreter on this machine (probed once)."""
    python: str
    uid: int | None                 # the uid programs run as; None: ours
    unshare: tuple[str, ...]        # command prefix for fresh namespaces; () where unavailable

    @property
    def namespaces(self) -> bool:
        return bool(self.unshare)

    @property
    def nproc_enforced(self) -> bool:
        """False when programs run as root, to whom the kernel does not apply RLIMIT_NPROC."""
        return (os.geteuid() if self.uid is None else self.uid) != 0


def run_python(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 64_000, guard: bool = True,
               python: str | None = None) -> SandboxResult:
    """Run `program` as __main__ in a contained interpreter (`python`, default: ours).

    guard=False leaves only the OS containment (used by tests to check it on its own).
    """
    iso = isolation(python)
    # The program's directory is a child of one we own (0711: others may enter, not change it),
    # so the program can empty its own directory but never remove or replace that entry with a
    # link: cleanup only ever walks what lies under our own folder.
    parent = tempfile.mkdtemp(prefix=TMP_PREFIX)
    try:
        os.chmod(parent, 0o711)
        tmp = os.path.join(parent, "work")
        os.mkdir(tmp, 0o700)
        main = os.path.join(tmp, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(main, 0o644)  # readable by the program's user whatever our umask
        if iso.uid is not None:
            os.chown(tmp, iso.uid, iso.uid)
        argv = [*iso.unshare, iso.python, "-I", "-B", "-c", _PRELUDE, main, "1" if guard else "0",
                str(MEMORY_EXIT)]
        return _run(argv, iso, tmp, timeout_s, memory_mb, max_output_bytes)
    finally:
        _remove_tree(parent)


def runs_to_the_end(program: str, *, timeout_s: float, memory_mb: int) -> bool:
    """Does `program` (e.g. code + its tests) pass and reach its last line?

    Exit status 0 alone is not enough: code that exits early (sys.exit(0), os._exit(0)) has status
    0 before the tests after it ran, so a random marker printed last must be in the output.
    """
    marker = secrets.token_hex(16)
    res = run_python(f"{program}\nprint({marker!r})\n", timeout_s=timeout_s, memory_mb=memory_mb)
    return res.passed and marker in res.stdout


def isolation(python: str | None = None) -> Isolation:
    """Which user and namespaces programs get with `python` (default: ours); probed once each."""
    return _isolation(python or sys.executable)


@functools.lru_cache(maxsize=None)
def _isolation(python: str) -> Isolation:
    uid = NOBODY if os.geteuid() == 0 and _starts((), python, NOBODY) else None
    unshare = shutil.which("unshare")
    prefix = (unshare, *UNSHARE_ARGS) if unshare else ()
    prefix = prefix if prefix and _starts(prefix, python, uid) else ()
    iso = Isolation(python, uid, prefix)
    log.info("sandbox for %s: uid %s, namespaces %s", python, uid, iso.namespaces)
    if not iso.nproc_enforced:
        log.warning("sandbox programs run as root (uid %d cannot execute %s): RLIMIT_NPROC does not "
                    "apply to root, so forks are bounded only by the deadline and the guard",
                    NOBODY, python)
    if not iso.namespaces:
        log.warning("sandbox: `unshare %s` does not work here; the network is blocked by the guard only",
                    " ".join(UNSHARE_ARGS[:-1]))
    return iso


def _starts(prefix: tuple[str, ...], python: str, uid: int | None) -> bool:
    try:
        return subprocess.run([*prefix, python, "-I", "-c", "pass"], cwd="/", env=_env("/"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30, **_as_user(uid)).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _as_user(uid: int | None) -> dict:
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


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


def _limits(timeout_s: float, memory_mb: int, uid: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard), clamped to our hard limits, which an unprivileged child cannot raise."""
    cpu = math.ceil(timeout_s) + 1
    wanted = [(resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
              (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
              (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
              (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
              (resource.RLIMIT_NPROC, *[_tasks_of(uid) + EXTRA_PROCESSES] * 2),
              (resource.RLIMIT_CORE, 0, 0)]
    out = []
    for res, soft, hard in wanted:
        cap = resource.getrlimit(res)[1]
        hard = hard if cap == resource.RLIM_INFINITY else min(hard, cap)
        out.append((res, min(soft, hard), hard))
    return out


def _run(argv: list[str], iso: Isolation, tmp: str, timeout_s: float, memory_mb: int,
         cap: int) -> SandboxResult:
    limits = _limits(timeout_s, memory_mb, os.geteuid() if iso.uid is None else iso.uid)

    def set_limits() -> None:  # runs in the child between fork and exec: no imports, no locks
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))

    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=tmp, env=_env(tmp), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=set_limits, **_as_user(iso.uid))
    out, err = bytearray(), bytearray()
    try:
        status = _pump(proc, out, err, start + timeout_s, cap)
    finally:
        _kill_group(proc.pid)  # the leader is not reaped yet, so its group id is still ours
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    rc = proc.returncode
    if status is None:
        status = ("passed" if rc == 0 else "memory" if rc == MEMORY_EXIT
                  else "timeout" if rc == -signal.SIGXCPU else "failed")
    return SandboxResult(status, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                         time.monotonic() - start)


def _pump(proc: subprocess.Popen, out: bytearray, err: bytearray, deadline: float,
          cap: int) -> str | None:
    """Read both pipes until they close and the leader exits.

    Returns "timeout" or "output_limit" when cut short, else None."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
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
    """rmtree, after giving back the permissions a program may have taken (chmod 000 on a dir).

    Never follows a symbolic link: directories are re-opened with O_NOFOLLOW and fchmod-ed.
    """
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path, followlinks=False):
        for d in [dirpath] + [os.path.join(dirpath, n) for n in dirnames]:
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:  # a link, or gone
                continue
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("sandbox: could not remove %s", path)
