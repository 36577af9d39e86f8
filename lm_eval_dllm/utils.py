"""Small shared helpers: atomic writes and one-line user errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class DLLMError(ValueError):
    """A user-facing error: one line naming the bad value and the valid choices."""


def _read_umask() -> int:
    mask = os.umask(0)  # at import, before any thread of ours exists
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp over path, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def check_safetensors(path: str | Path, remedy: str = "re-download or re-save it") -> None:
    """One-line DLLMError naming `path` unless it is a whole safetensors file: a readable header
    and every tensor's bytes present (a kill or a full disk leaves a truncated one)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, its header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DLLMError(f"{path} is not a whole safetensors file ({e}); valid: {remedy}") from None
