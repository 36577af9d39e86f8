"""A deterministic crash point for the kill/resume tests.

    LM_EVAL_DLLM_KILL_AT_STEP=3 python -m train.grpo ...     # SIGKILLs itself at the end of step 3

A trainer calls `end_of_step(step)` once a step is finished: its log line and, when due, its resume
state are written. With the variable naming that step, the process kills itself there with SIGKILL
(no cleanup, no flush: what a pre-empted job sees), so a test kills a run at a known step instead
of polling its files and racing the next write.
"""

from __future__ import annotations

import os
import signal

ENV = "LM_EVAL_DLLM_KILL_AT_STEP"


def end_of_step(step: int) -> None:
    if os.environ.get(ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
