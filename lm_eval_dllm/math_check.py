"""MATH-style answer checking that agrees with lm-eval and never hangs.

    python -m lm_eval_dllm.math_check '2\\sqrt{2}' '\\sqrt{8}'      # prints True

    from lm_eval_dllm.math_check import is_equiv, score_minerva
    is_equiv(r"\\frac{1}{2}", "0.5")                                # True
    score_minerva(doc, completion)      # lm-eval's minerva_math process_results, time-bounded

The verdict is lm-eval's `exact_match` for minerva_math: both answers go through lm-eval's own
`normalize_final_answer`, then its `is_equiv` (sympy's parse_latex, then simplify(a - b) == 0).
Nothing is reimplemented, so this checker and lm-eval agree; the one deliberate difference is
that answers longer than MAX_CHARS are rejected without being looked at. `score_minerva` runs
lm-eval's whole minerva_math `process_results` (answer extraction, sympy `is_equiv`, math_verify)
in the same worker, so a completion scores exactly what lm-eval would give it, or 0 on every
metric if scoring it takes longer than its time limit; the `*_dllm` MATH tasks score with it.

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
MAX_COMPLETION_CHARS = 50_000  # longer completions score 0 without being parsed
SCORE_TIMEOUT_S = 10.0       # whole process_results: lm-eval allows 5 s to is_equiv alone
MINERVA_METRICS = ("exact_match", "math_verify")
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
    return bool(_WORKER.call(["equiv", a, b], timeout_s))


def score_minerva(doc: dict, completion: str, timeout_s: float | None = None) -> dict[str, int]:
    """lm-eval's minerva_math `process_results(doc, [completion])`, or 0 on every metric if it
    takes longer than timeout_s (default SCORE_TIMEOUT_S), fails, or the completion is longer
    than MAX_COMPLETION_CHARS."""
    timeout_s = SCORE_TIMEOUT_S if timeout_s is None else timeout_s
    zero = dict.fromkeys(MINERVA_METRICS, 0)
    if len(completion) > MAX_COMPLETION_CHARS:
        return zero
    out = _WORKER.call(["minerva", {k: v for k, v in doc.items() if isinstance(v, (str, int, float))},
                        completion], timeout_s)
    return out if isinstance(out, dict) else zero


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

    def call(self, request: list, timeout_s: float):
        """The worker's JSON answer to `request`, or None if it overran timeout_s or crashed."""
        with self._lock:
            self._ensure_ready()
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._read_line(timeout_s)
            except BrokenPipeError:  # it died between requests
                line = None
            if line is not None:
                return json.loads(line)
            log.debug("%s took over %.1fs (or crashed); restarting the worker", request[0], timeout_s)
            self._stop()
            self._start()  # the replacement imports while the caller gets on with its work
            return None

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
    """The worker: one JSON request per line on stdin, one JSON answer per line on stdout.

    ["equiv", a, b] -> true/false (lm-eval's is_equiv of two normalised answers);
    ["minerva", doc, completion] -> lm-eval's minerva_math process_results(doc, [completion]).
    """
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed to stdout goes to stderr, not into the answers
    utils = _lm_eval_math()
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        kind, *args = json.loads(line)
        try:
            if kind == "equiv":
                out = bool(utils.is_equiv(*args))
            else:
                doc, completion = args
                out = {k: int(v) for k, v in utils.process_results(doc, [completion]).items()}
        except Exception:  # noqa: BLE001 -- MemoryError, RecursionError, parse errors: wrong
            out = False if kind == "equiv" else dict.fromkeys(MINERVA_METRICS, 0)
        answers.write(json.dumps(out) + "\n")
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
