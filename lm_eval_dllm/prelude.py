"""What runs first in a sandboxed interpreter, before the program (`lm_eval_dllm.sandbox`).

Executed as `python -I -B -c PRELUDE main.py GUARD MEMORY_EXIT UID DONE_FD TRUSTED_FD VERDICT_FD`:
drops to UID (if >= 0), installs the guard, runs main.py as __main__, then prints the secret read
from DONE_FD. With TRUSTED_FD >= 0 it first forks: the program runs in the child, which then answers
calls, and the parent (not dumpable) reads the tests from TRUSTED_FD, runs them with those calls
and writes its verdict to VERDICT_FD; the child closes both before any of the program runs.
Standard library only; it is a string because it runs in the sandboxed interpreter.
"""

PRELUDE = r'''
import os, sys, types
_path, _guard = sys.argv[1], sys.argv[2] == "1"
_memory_exit, _uid, _done_fd, _trusted_fd, _verdict_fd = map(int, sys.argv[3:8])
if _uid >= 0:  # root started the sandbox: become an unprivileged user before any untrusted code
    os.setgroups([])
    os.setgid(_uid)
    os.setuid(_uid)  # from uid 0 this also clears every capability (bwrap set no_new_privs)
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

def _judge(req_w, rep_r):
    # Trusted: runs the tests, read only now, with each call of the program's functions sent to
    # the child and its answer parsed as a literal; only this process holds the verdict's pipe.
    import ast
    src = bytearray()
    while chunk := os.read(_trusted_fd, 1 << 16):
        src += chunk
    reqs, reps = os.fdopen(req_w, "w", buffering=1), os.fdopen(rep_r, "r", errors="replace")

    def proxy(name):
        def call(*args, **kwargs):
            line = repr((name, args, kwargs))
            if "\n" in line or ast.literal_eval(line) != (name, args, kwargs):
                raise TypeError("arguments that are not plain data")
            reqs.write(line + "\n")
            kind, value = ast.literal_eval(reps.readline())
            if kind != "ok":
                raise RuntimeError(f"the call raised {value}")
            return value
        return call
    try:
        exec(compile(bytes(src).decode(), "<tests>", "exec"), {"__name__": "__tests__", "_proxy": proxy})
        verdict = b"pass\n"
    except BaseException:  # a failed assert, an answer that is not plain data, a dead child
        verdict = b"fail\n"
    sys.stdout.flush()
    os.write(_verdict_fd, verdict)
    os._exit(0)


def _serve(ns, req_r, rep_w):
    # The child, after the program ran: answer each call with repr(("ok", value)) on one line.
    import ast
    reps = os.fdopen(rep_w, "w", buffering=1)
    for line in os.fdopen(req_r, "r"):
        try:
            name, args, kwargs = ast.literal_eval(line)
            out = repr(("ok", ns[name](*args, **kwargs)))
        except BaseException as e:
            out = repr(("raise", type(e).__name__))
        reps.write(out.replace("\n", " ") + "\n")
    sys.stdout.flush()
    os._exit(0)


if _trusted_fd >= 0:  # tests given: they run in this process, the program in a child
    try:  # not dumpable: the child (same uid) can neither trace it nor open its /proc files
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass  # as root the uid change above made it non-dumpable already
    _req_r, _req_w = os.pipe()
    _rep_r, _rep_w = os.pipe()
    if os.fork():
        os.close(_req_r), os.close(_rep_w)
        _judge(_req_w, _rep_r)
    for _fd in (_trusted_fd, _verdict_fd, _req_w, _rep_r):
        os.close(_fd)
if _guard:
    _install_guard(os.getcwd())
_main = types.ModuleType("__main__")
_main.__file__, _main.__builtins__ = _path, __builtins__
sys.modules["__main__"], sys.argv = _main, [_path]
try:
    exec(_code, _main.__dict__)
    if _trusted_fd >= 0:
        _serve(_main.__dict__, _req_r, _rep_w)
    # The program returned normally: only now read the per-run secret the parent put in the pipe
    # and print it. It is in no file, argument, variable or constant the program could read.
    _secret = os.read(_done_fd, 64)
    sys.stdout.flush()
    os.write(1, b"\n" + _secret + b"\n")
except MemoryError:
    try:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        os._exit(_memory_exit)
'''
