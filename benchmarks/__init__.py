"""Benchmarks on the bundled model that print ratios or counts measured in one run.

The pieces the `python -m benchmarks.<name>` scripts share: the command line (--limit,
--batch-size, --no-write), the modchain problems of a split, setting labels, one `lm_eval` run and
writing the Markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from lm_eval_dllm.compat import Compat
from lm_eval_dllm.generate import Generator
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_ID
from lm_eval_dllm.utils import atomic_write


def parser(doc: str, out: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="test problems (default: all 1,000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {out.name}")
    return p


def load_docs(prog: str, limit: int | None, split: str = "test") -> list[dict]:
    """A modchain split (the test split unless told), the first `limit` problems (a positive number) or all."""
    if limit is not None and limit < 1:
        raise SystemExit(f"{prog}: error: --limit {limit}; valid: a positive number of {split} problems")
    return modchain.load_split(split)[:limit]


def decode_setting(model, tok, spec, docs: list[dict], name: str, params: dict, block: int,
                   batch_size: int, cache: str = "none", window: int = 0,
                   stats: list[dict] | None = None, refresh: int = 0,
                   compat: str | Compat = "none") -> tuple[list[str], int]:
    """(texts, total NFE) of one sampler setting on the bundled model, its policy found for the
    block; `stats`, if given, receives the per-sample statistics."""
    gen = Generator(model, tok, spec, model_id=BUNDLED_ID, device="cpu", cache=cache, refresh=refresh,
                    window=window, compat=compat)
    return modchain.decode(gen, docs, make_sampler(name, params), block, batch_size, stats)


def label(name: str, params: dict) -> str:
    return f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"


def finish(text: str, out: Path, args: argparse.Namespace) -> None:
    """Print the table; write it to `out` only for the full split and without --no-write."""
    print(text)
    if not args.no_write and args.limit is None:
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))


def run_lm_eval(prog: str, task: str, model_args: str, limit: int | None, out_dir: str, env: dict,
                cwd: str | None = None, log_samples: bool = False) -> dict:
    """One offline `python -m lm_eval` run on CPU (os.environ updated by `env`, in `cwd`); its results
    JSON (with log_samples, the samples file lies beside it)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args", model_args, "--tasks", task,
           "--device", "cpu", "--output_path", out_dir] + (["--log_samples"] if log_samples else [])
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} | env
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"{prog}: error: lm_eval failed ({model_args}):\n{r.stderr[-2000:]}")
    (path,) = glob.glob(os.path.join(out_dir, "*", "results_*.json"))
    with open(path) as f:
        return json.load(f)
