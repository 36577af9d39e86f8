"""MATH-style answer equivalence that agrees with lm-eval and never hangs.

    python -m lm_eval_dllm.math_check '2\\sqrt{2}' '\\sqrt{8}'      # prints True

    from lm_eval_dllm.math_check import is_equiv
    is_equiv(r"\\frac{1}{2}", "0.5")                                # True

The verdict is lm-eval's `exact_match` for minerva_math: both answers go through lm-eval's own
`normalize_final_answer`, then its `is_equiv` (sympy's parse_latex, then simplify(a - b) == 0).
Nothing is reimplemented, so this checker and lm-eval agree; the one deliberate difference is
that answers longer than MAX_CHARS are rejected without being looked at.

lm-eval bounds sympy with SIGALRM, which cannot interrupt one long C call (10**10**10 is a
single integer power) and works only in the main thread. Here sympy runs in a separate worker
process with an address-space limit; a comparison that overruns `timeout_s` kills the worker
and counts as not equivalent, and a replacement starts at once in the background. The cheap,
common cases stay in-process: equal strings after normalisation, and two plain integers.
The worker's start (~2 s, importing lm-eval and sympy) is not counted in `timeout_s`; call
`warm_up()` to pay it up front.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import re
import resource
import select
import subprocess
import sys
import threading
import time

from .utils import DLLMError

log = logging.getLogger(__name__)

MAX_CHARS = 4_000            # longer answers are rejected: lm-eval's normalisation is quadratic
WORKER_MEMORY_MB = 3_072     # importing lm-eval alone maps ~1.5 GiB of address space
STARTUP_TIMEOUT_S = 120.0
_INTEGER = re.compile(r"-?\d{1,40}")
_MODULE = __spec__.name if __spec__ else __name__  # not "__main__" under `python -m`


@functools.cache
def _lm_eval_math():
    from lm_eval.tasks.minerva_math import utils  # needs lm-eval[math]: sympy, math_verify, antlr4

    return utils


def normalize(answer: str) -> str:
    """lm-eval's normalisation of a final answer (what minerva_math stores as the gold)."""
    return _lm_eval_math().normalize_final_answer(answer)


def is_equiv(pred: str, ref: str, timeout_s: float = 2.0) -> bool:
    """Is `pred` the same answer as `ref`? Both are normalised; a timeout or error means False."""
    if len(pred) > MAX_CHARS or len(ref) > MAX_CHARS:
        return False
    a, b = normalize(pred), normalize(ref)
    if a and a == b:
        return True
    if not a or not b:  # lm-eval cannot parse an empty answer either
        return False
    if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):  # sympy parses these exactly
        return int(a) == int(b)
    return _WORKER.compare(a, b, timeout_s)


def warm_up() -> None:
    """Start the sympy worker now and wait until it is ready."""
    _WORKER.ensure_ready()


class _Worker:
    """One long-lived sympy process, fed JSON lines; killed and replaced when a comparison overruns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""

    def compare(self, a: str, b: str, timeout_s: float) -> bool:
        with self._lock:
            self._ensure_ready()
            try:
                self._proc.stdin.write(json.dumps([a, b]).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._read_line(timeout_s)
            except BrokenPipeError:  # it died between comparisons
                line = None
            if line in (b"0", b"1"):
                return line == b"1"
            log.debug("comparing %r with %r took over %.1fs (or crashed); restarting the worker",
                      a, b, timeout_s)
            self._stop()
            self._start()  # the replacement imports while the caller gets on with its work
            return False

    def ensure_ready(self) -> None:
        with self._lock:
            self._ensure_ready()

    def _ensure_ready(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if not self._ready:
            if self._read_line(STARTUP_TIMEOUT_S) != b"ready":
                self._stop()
                raise DLLMError(f"the sympy worker did not start; run `{sys.executable} -m {_MODULE} "
                                f"--worker` to see why (lm-eval's minerva_math needs lm-eval[math])")
            self._ready = True

    def _start(self) -> None:
        # Native thread pools would multiply the address space RLIMIT_AS counts.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MALLOC_ARENA_MAX": "2"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE, "--worker", "--memory-mb", str(WORKER_MEMORY_MB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)  # a Ctrl-C meant for us does not kill it mid-line
        self._ready, self._buf = False, b""

    def _read_line(self, timeout_s: float) -> bytes | None:
        """The worker's next line, or None if it takes longer than timeout_s or has died."""
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # killed by its memory limit, or crashed
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def forget(self) -> None:
        """In a forked child: the parent's worker and lock are not ours; start afresh when needed."""
        self.__init__()


_WORKER = _Worker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER.forget)


def _serve(memory_mb: int) -> None:
    """The worker: read [a, b] JSON lines on stdin, answer 1 or 0 per line on stdout."""
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed to stdout goes to stderr, not into the answers
    lm_eval_is_equiv = _lm_eval_math().is_equiv
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        a, b = json.loads(line)
        try:
            same = bool(lm_eval_is_equiv(a, b))
        except Exception:  # noqa: BLE001 -- MemoryError, RecursionError: not equivalent
            same = False
        answers.write("1\n" if same else "0\n")
        answers.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pred", nargs="?", help="the model's answer")
    p.add_argument("ref", nargs="?", help="the reference answer")
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-mb", type=int, default=WORKER_MEMORY_MB, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _serve(args.memory_mb)
    elif args.pred is None or args.ref is None:
        p.error("give PRED and REF")
    else:
        sys.stdout.write(f"{is_equiv(args.pred, args.ref, args.timeout_s)}\n")


if __name__ == "__main__":
    main()
