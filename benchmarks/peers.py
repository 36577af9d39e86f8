"""Side by side with Fast-dLLM: our decode loop and its `generate`, `generate_with_prefix_cache` and
`generate_with_dual_cache`, on the same model and prompts, measured in one run.

    python -m benchmarks.peers                          # writes results/peers.md (24 min on 2 quiet cores)
    python -m benchmarks.peers --prompts 1 --batch 2    # shorter
    python -m benchmarks.peers --prompts 1 --batch 2 --no-write
    python -m benchmarks.peers --tiny --no-write        # a tiny model, every row, seconds (tests/test_peers.py)

Needs Fast-dLLM's code at ../shared/reference/fast-dllm (run as a reference, loaded and patched for
transformers 5 by tests/fast_dllm_oracle.py; nothing of it is copied here).

Model: a random LLaDA (the official config.json and weight names) with the real vocabulary 126,464,
d_model 256, 2 layers: 66 M parameters, nearly all of them the embedding and the output layer. Its
output layer is scaled x4 (testing.build_tiny_checkpoint's logit_scale) so that threshold 0.9
commits about 3.5 tokens per forward; the plain random init commits about one (NFE ~ L), which
makes the run 3x longer and costs each forward the same. Prompts: random token ids, not text, of
900, 890, 880, ... tokens (a 5-shot GSM8K prompt's length; the batched rows are left-padded).
L = 256, block 32, threshold tau = 0.9, greedy, float32: both implementations' logits then agree to
float32 rounding, so tokens can be compared (bf16 rounds the two differently ordered computations
apart). Ours runs with compat=fast-dllm (no early exit, the no-op forward: Fast-dLLM's tokens and
NFE), except the window row (compat=none: Fast-dLLM has no `window`).

Rows: Fast-dLLM's three functions at batch 1 (they take one prompt) over the first --prompts
prompts; ours at batch 1 over the same prompts, cache=dual,window=32 (window = block) at batch 1,
and ours batched: one batch of --batch prompts, the first --prompts of them the same. Each row runs
in a fresh process (its own load, --threads torch threads): wall = the median over --repeats of
the row's total decode time; peak memory = the resident-set high-water mark during the decodes
minus the resident set before them (VmHWM after resetting it: benchmarks.projection's method).
"same tokens" compares each shared prompt's generated tokens and NFE with Fast-dLLM's matching
function. Random weights have no task accuracy: identical tokens is what "the same accuracy" means.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tabulate import tabulate

from lm_eval_dllm.decode import diffuse, model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.testing import build_tiny_checkpoint
from lm_eval_dllm.utils import atomic_write
from tests.fast_dllm_oracle import FAST_DLLM, load_fast_dllm  # the reference, run as it is

from .stats_memory import _kib

log = logging.getLogger("benchmarks.peers")
OUT = Path(__file__).resolve().parent.parent / "results" / "peers.md"
FUNCTIONS = {"none": "generate", "prefix": "generate_with_prefix_cache", "dual": "generate_with_dual_cache"}
TAU = 0.9


@dataclass(frozen=True)
class Size:
    """The model and decode sizes of a run."""

    d_model: int
    prompt: int  # the first prompt's length; prompt i has 10 * i tokens fewer
    length: int  # L
    block: int
    logit_scale: float
    vocab: int = 126464  # LLaDA's; a smaller one moves the specials to its top (the tiny run)
    id_high: int = 126000  # prompt ids are drawn below it: no special token (mask 126336, EOS 126081)


FULL = Size(d_model=256, prompt=900, length=256, block=32, logit_scale=4.0)
TINY = Size(d_model=32, prompt=40, length=64, block=32, logit_scale=5.0, vocab=1024, id_high=1000)


@dataclass(frozen=True)
class Row:
    impl: str  # "Fast-dLLM" or "ours"
    cache: str
    batched: bool = False
    window: bool = False  # cache=dual,window=block, compat=none

    @property
    def name(self) -> str:
        if self.impl == "Fast-dLLM":
            return f"Fast-dLLM {FUNCTIONS[self.cache]}"
        return f"ours cache={self.cache}" + (",window=B" if self.window else "")


ROWS = (*(Row("Fast-dLLM", c) for c in FUNCTIONS), *(Row("ours", c) for c in FUNCTIONS),
        Row("ours", "dual", window=True), *(Row("ours", c, batched=True) for c in FUNCTIONS))


def checkpoint(out: Path, size: Size) -> Path:
    specials = {} if size.vocab == FULL.vocab else {
        "vocab_size": size.vocab, "embedding_size": size.vocab, "mask_token_id": size.vocab - 2,
        "eos_token_id": size.vocab - 3, "pad_token_id": size.vocab - 3}
    return build_tiny_checkpoint(out, "llada", d_model=size.d_model, n_layers=2, n_heads=4,
                                 logit_scale=size.logit_scale, **specials)


def parameters(ckpt: Path) -> int:
    """The checkpoint's parameter count, read from its weight file's header."""
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def prompts(size: Size, n: int) -> list[list[int]]:
    return [torch.randint(0, size.id_high, (size.prompt - 10 * i,), generator=torch.Generator().manual_seed(i))
            .tolist() for i in range(n)]


def runner(row: Row, ckpt: str, size: Size, tmp: Path):
    """A function decoding a list of prompts with `row`'s implementation -> (tokens, NFE) per prompt."""
    L, B = size.length, size.block
    if row.impl == "Fast-dLLM":
        fd = load_fast_dllm(tmp)
        ref = fd.LLaDAModelLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        mask_id = json.loads((Path(ckpt) / "config.json").read_text())["mask_token_id"]
        fn = getattr(fd, FUNCTIONS[row.cache])

        def one(p: list[int]) -> tuple[list[int], int]:
            x, nfe = fn(ref, torch.tensor([p]), steps=L, gen_length=L, block_length=B, threshold=TAU,
                        mask_id=mask_id)
            return x[0, len(p):].tolist(), int(nfe)

        return lambda ps: [one(p) for p in ps]
    model, _, spec = load(ckpt, dtype="float32", device="cpu")
    sampler = make_sampler("threshold", {"tau": TAU})

    def ours(ps: list[list[int]]) -> list[tuple[list[int], int]]:
        d = diffuse(model_forward(model, spec, row.cache, window=B if row.window else 0), ps, spec, sampler,
                    L, B, compat="none" if row.window else "fast-dllm")
        return list(zip(d.tokens.tolist(), d.nfe.tolist()))

    return ours if row.batched else lambda ps: [r for p in ps for r in ours([p])]


def measure(index: int, a: argparse.Namespace, ckpt: str) -> dict:
    """Decode row `index`'s prompts --repeats times in this process: wall, peak, tokens, NFE."""
    row, size = ROWS[index], TINY if a.tiny else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    ps = prompts(size, a.batch if row.batched else a.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        run = runner(row, ckpt, size, Path(tmp))
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before, walls = _kib("VmRSS"), []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = run(ps)
            walls.append(time.perf_counter() - t0)
        peak = (_kib("VmHWM") - before) * 1024
    torch.set_num_threads(threads)
    return {"wall": statistics.median(walls), "peak": peak, "tokens": [t for t, _ in out],
            "nfe": [n for _, n in out]}


def run_rows(a: argparse.Namespace, ckpt: str) -> list[dict]:
    """Every row's measurement, each in a fresh process (in this one with --tiny)."""
    runs = []
    for i, row in enumerate(ROWS):
        log.info("%s%s", row.name, f", batch {a.batch}" if row.batched else "")
        if a.tiny:
            runs.append(measure(i, a, ckpt))
            continue
        cmd = [sys.executable, "-m", "benchmarks.peers", "--child", str(i), ckpt, "--prompts", str(a.prompts),
               "--batch", str(a.batch), "--repeats", str(a.repeats), "--threads", str(a.threads)]
        r = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def agreement(run: dict, ref: dict) -> str:
    """How many shared prompts have Fast-dLLM's tokens, and its NFE."""
    n = min(len(run["tokens"]), len(ref["tokens"]))
    toks = sum(run["tokens"][i] == ref["tokens"][i] for i in range(n))
    nfe = sum(run["nfe"][i] == ref["nfe"][i] for i in range(n))
    return f"{'yes' if toks == n else 'no'}: tokens {toks}/{n}, NFE {nfe}/{n}"


def table(runs: list[dict], a: argparse.Namespace, size: Size) -> tuple[str, dict]:
    """The markdown table, and tokens/s per row name (ours only where its tokens are Fast-dLLM's)."""
    ref = {r.cache: run for r, run in zip(ROWS, runs) if r.impl == "Fast-dLLM"}
    rows, speed = [], {}
    for row, run in zip(ROWS, runs):
        n, fd = len(run["tokens"]), ref[row.cache]
        tps = n * size.length / run["wall"]
        fd_tps = len(fd["tokens"]) * size.length / fd["wall"]
        same = "(reference)" if row.impl == "Fast-dLLM" else agreement(run, fd)
        if not same.startswith("no"):
            speed[(row.name, a.batch if row.batched else 1)] = tps
        rows.append([row.name, a.batch if row.batched else 1, n, f"{run['wall']:.1f}",
                     f"{statistics.mean(run['nfe']):.1f}", f"{tps:.2f}", f"{run['peak'] / 2**20:,.0f}",
                     f"{tps / fd_tps:.2f}", f"{run['peak'] / max(fd['peak'], 1):.2f}", same])
    head = ["row", "batch", "prompts", "wall s", "NFE / prompt", "tokens/s", "peak MiB", "tokens/s / Fast-dLLM's",
            "peak / Fast-dLLM's", "same tokens and NFE as Fast-dLLM"]
    return tabulate(rows, head, tablefmt="github", disable_numparse=True), speed


def summary(speed: dict) -> str:
    """Our best row against Fast-dLLM's best, and each cache mode at batch 1."""
    fd = {k: v for k, v in speed.items() if k[0].startswith("Fast-dLLM")}
    ours = {k: v for k, v in speed.items() if k not in fd}
    (bo, bn), (fo, fn) = max(ours.items(), key=lambda kv: kv[1]), max(fd.items(), key=lambda kv: kv[1])
    lines = [f"- Our best row with Fast-dLLM's tokens, {bo[0]} at batch {bo[1]} ({bn:.2f} tokens/s), against "
             f"Fast-dLLM's best, {fo[0]} ({fn:.2f} tokens/s): **{bn / fn:.2f}x**."]
    for cache, fun in FUNCTIONS.items():
        o, f = speed.get((f"ours cache={cache}", 1)), speed[(f"Fast-dLLM {fun}", 1)]
        lines.append(f"- Batch 1, cache={cache}: ours / Fast-dLLM's {fun} = "
                     + (f"**{o / f:.2f}x** tokens/s." if o else "n/a (tokens differ)."))
    return "\n".join(lines)


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def report(runs: list[dict], a: argparse.Namespace, loads: tuple[str, str], command: str, minutes: float,
           params: int) -> str:
    size = TINY if a.tiny else FULL
    tab, speed = table(runs, a, size)
    where = "all rows in one process (--tiny)" if a.tiny else "each row in a fresh process"
    return (f"`{command}` ({minutes:.0f} min)\n\nMachine: {machine()}; {a.threads} torch thread(s) per row. "
            f"Load average (1 min) at the start {loads[0]}, at the end {loads[1]} (where it exceeds the "
            f"cores, other jobs shared the CPU: compare ratios, not seconds).\n\n"
            f"LLaDA architecture, random weights, vocabulary {size.vocab:,}, d_model {size.d_model}, 2 layers: "
            f"{params / 1e6:.1f} M parameters; prompts of random token ids, {size.prompt} tokens and 10 fewer "
            f"per further prompt; L = {size.length}, block {size.block}, threshold tau = {TAU}, float32; ours "
            f"with compat=fast-dllm except the window row (window = B = {size.block}, compat=none). Batch-1 "
            f"rows decode the first {a.prompts} prompt(s) one at a time, batched rows {a.batch} in one batch; "
            f"wall = median of {a.repeats} repeat(s) of the row's total; peak = resident-set growth during the "
            f"decodes, {where}. Random weights have no task accuracy: same tokens is the same accuracy. "
            f"Ratios are to Fast-dLLM's function of the same cache mode (dual for the window row).\n\n"
            f"{summary(speed)}\n\n{tab}\n")


def main(argv: list[str] | None = None) -> str | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2, help="prompts of the batch-1 rows")
    p.add_argument("--batch", type=int, default=4, help="prompts in the batched rows' one batch")
    p.add_argument("--repeats", type=int, default=1, help="decodes of each row's prompts; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each row")
    p.add_argument("--tiny", action="store_true", help="a tiny model (vocabulary 1,024), rows in this process")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    p.add_argument("--child", nargs=2, metavar=("ROW", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(int(a.child[0]), a, a.child[1])))
        return None
    for key in ("prompts", "batch", "repeats", "threads"):
        if getattr(a, key) < 1:
            p.error(f"--{key}={getattr(a, key)}; valid: 1, 2, ...")
    if not (FAST_DLLM / "generate.py").exists():
        p.error(f"no Fast-dLLM code at {FAST_DLLM}; valid: a checkout with ../shared/reference/fast-dllm")
    start, t0 = Path("/proc/loadavg").read_text().split()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(Path(tmp) / "llada", TINY if a.tiny else FULL)
        params, runs = parameters(ckpt), run_rows(a, str(ckpt))
    command = " ".join(["python -m benchmarks.peers", *(argv if argv is not None else sys.argv[1:])])
    text = report(runs, a, (start, Path("/proc/loadavg").read_text().split()[0]), command,
                  (time.perf_counter() - t0) / 60, params)
    print(text)
    if not a.no_write:
        atomic_write(OUT, lambda t: Path(t).write_text(text))
    return text


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
