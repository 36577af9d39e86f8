"""The files of a training run in OUT, checked and repaired on resume (train.grpo uses these).

    python -m train.grpo ... --out runs/x --resume     # keeps the log whole, removes partial saves
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from lm_eval_dllm.utils import DLLMError, atomic_write

log = logging.getLogger("train.grpo")


def check_writable(out: Path) -> None:
    """--out, or the folder it would be made in, must be a folder we can write to: checked before
    the weights load, not at the first save."""
    up = out
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise DLLMError(f"--out {str(out)!r} lies under {str(up)!r}, which is a file; valid: a folder path")
    try:
        with tempfile.TemporaryFile(dir=up):
            pass
    except OSError as e:
        raise DLLMError(f"--out {str(out)!r} cannot be written ({e.strerror or type(e).__name__} in {up}); "
                        f"valid: a folder you can write to") from None


def keep_log_until(path: Path, step: int) -> None:
    """After a resume at `step`, the log holds each step up to it exactly once. Nothing is deleted:
    lines of later steps (logged after the checkpoint, run again now) go to log.jsonl.rerun, and
    damaged lines (half a line written at a kill) to log.jsonl.bad, each named in a warning."""
    if not path.exists():
        return
    kept, aside = [], {".bad": [], ".rerun": []}
    for n, ln in enumerate(path.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        try:
            later = json.loads(ln)["step"] > step
        except (ValueError, KeyError, TypeError, IndexError):
            aside[".bad"].append((n, ln))
            continue
        if later:
            aside[".rerun"].append((n, ln))
        else:
            kept.append(ln)
    for suffix, lines in aside.items():
        if lines:
            with open(path.with_name(path.name + suffix), "a") as f:
                f.write("".join(ln + "\n" for _, ln in lines))
            log.warning("%s: line%s %s %s, kept in %s", path, "s" * (len(lines) > 1),
                        ", ".join(str(n) for n, _ in lines),
                        "damaged" if suffix == ".bad" else f"of steps after {step} (run again)",
                        path.with_name(path.name + suffix))
    if any(aside.values()):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


def remove_partial_saves(out: Path) -> list[Path]:
    """Temporary files of a save a kill interrupted (atomic_write's `.<name>.*.tmp`): removed on
    resume, where the finished files they were to replace are still whole."""
    folders = [out, out / "last", out / "best", *sorted((out / "validated").glob("step-*"))]
    partial = [p for d in folders if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    for p in partial:
        p.unlink()
        log.info("removed %s, left by an interrupted save", p)
    return partial
