"""One memory bound for a whole process tree: a memory cgroup per sandboxed run, where one can be made.

    group = MemoryGroup.create(512 << 20)     # None where no cgroup is writable (not root, no delegation)
    ...  start the process, calling group.join() between fork and exec ...
    group.oom_killed(); group.remove()

The limit covers every process the program starts (forks inherit the cgroup), their page cache and
tmpfs pages (the sandbox's own directory is a tmpfs: what it writes is memory too), and no swap.
When the total would pass it, the kernel's OOM killer kills a process of the group, nothing outside.
cgroup v2 is used where its memory controller is available to us, else cgroup v1's (both are found
through /proc/self/cgroup and /proc/self/mounts; a new group is made under our own).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import secrets
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

PREFIX = "lm_eval_dllm-"


@dataclass(frozen=True)
class MemoryGroup:
    path: str           # the cgroup's directory
    version: int        # 1 or 2
    procs_fd: int       # cgroup.procs, opened by us: join() only writes to it

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryGroup | None:
        """A fresh group limited to limit_bytes (memory and swap together); None where none can be made."""
        for version, parent in _parents():
            path = os.path.join(parent, PREFIX + secrets.token_hex(6))
            try:
                os.mkdir(path)
            except OSError:
                continue
            try:
                limits = (("memory.max", limit_bytes), ("memory.swap.max", 0)) if version == 2 else (
                    ("memory.limit_in_bytes", limit_bytes), ("memory.memsw.limit_in_bytes", limit_bytes))
                for name, value in limits:
                    if name in ("memory.max", "memory.limit_in_bytes") or os.path.exists(
                            os.path.join(path, name)):
                        _write(os.path.join(path, name), str(value))
                fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                return cls(path, version, fd)
            except OSError:
                _rmdir(path)
        return None

    def join(self) -> None:
        """Move the calling process into the group (call it in the child before exec: no locks)."""
        os.write(self.procs_fd, b"0")

    def oom_killed(self) -> bool:
        """Did the kernel kill a process of the group for passing the limit?"""
        name, key = ("memory.events", "oom_kill") if self.version == 2 else ("memory.oom_control", "oom_kill")
        try:
            with open(os.path.join(self.path, name)) as f:
                fields = dict(line.split() for line in f if len(line.split()) == 2)
            return int(fields.get(key, 0)) > 0
        except (OSError, ValueError):
            return False

    def remove(self, within_s: float = 2.0) -> None:
        """Close and remove the group once its last process has gone (SIGKILL is asynchronous).
        Never raises."""
        try:
            os.close(self.procs_fd)
        except OSError:
            pass
        _rmdir(self.path, within_s)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _rmdir(path: str, within_s: float = 0.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("sandbox: could not remove cgroup %s: %s", path, e)
                return
        time.sleep(0.01)


@functools.lru_cache(maxsize=1)
def _parents() -> tuple[tuple[int, str], ...]:
    """(version, directory of our own memory cgroup) for each hierarchy that has a memory controller."""
    try:
        with open("/proc/self/cgroup") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ()
    found = []
    for _, controllers, rel in own:
        if controllers == "":  # cgroup v2: usable if its memory controller is enabled for children
            for m in mounts:
                parent = m[1] + rel.rstrip("/") if m[2] == "cgroup2" else None
                if parent and _v2_has_memory(parent):
                    found.append((2, parent))
        elif "memory" in controllers.split(","):
            found += [(1, m[1] + rel.rstrip("/")) for m in mounts
                      if m[2] == "cgroup" and "memory" in m[3].split(",")]
    return tuple(sorted(found))[::-1]  # v2 first


def _v2_has_memory(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.subtree_control")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False
