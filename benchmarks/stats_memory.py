"""Peak memory of the proposal statistics (x0, conf, margin, entropy): one pass vs chunks, one run.

    python -m benchmarks.stats_memory              # LLaDA's vocabulary, L = 256, 8 rows; writes results/stats_memory.md
    python -m benchmarks.stats_memory --rows 2 --no-write
    python -m benchmarks.stats_memory --device cuda   # writes results/stats_memory_cuda.md

Random logits of LLaDA's shape (V = 126,464, the mask token suppressed) go through the statistics
as `decode.propose` computed them in one pass over the whole (rows, L, V) batch (kept here,
`propose_reference`, as the reference) and as it computes them now, chunked. Each run is a fresh
subprocess so one's allocations cannot hide in another's: on CPU the peak is the process's
resident-set high-water mark (reset through /proc/self/clear_refs after the logits exist) minus
the resident set before the call; on CUDA it is torch's peak allocated minus what was allocated
before. The table gives both peaks, their ratio, and the largest difference between the two
implementations' statistics (bitwise equality is asserted by tests/test_decode.py).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from lm_eval_dllm.decode import propose
from lm_eval_dllm.utils import atomic_write

LLADA_VOCAB, LLADA_MASK = 126_464, 126_336
OUT = Path(__file__).resolve().parent.parent / "results" / "stats_memory.md"


def propose_reference(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]):
    """decode.propose before chunking (one pass over the whole batch): the oracle for the new one."""
    if temperature > 0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)  # (b, L, V)
    p = logp.exp()
    if temperature > 0:
        u = torch.stack([torch.rand(logits.shape[1:], generator=g, device=g.device)
                         for g in generators]).to(logits.device)
        x0 = (logp - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)  # (b, L)
    else:
        x0 = logits.argmax(-1)  # (b, L)
    conf = p.gather(-1, x0[..., None]).squeeze(-1)  # (b, L)
    top2 = p.topk(2, dim=-1).values  # (b, L, 2)
    margin = top2[..., 0] - top2[..., 1]
    entropy = torch.special.entr(p).sum(-1)  # (b, L)
    return x0, conf, margin, entropy


def random_logits(rows: int, length: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    """(rows, length, vocab) float32 logits peaked like a model's, the mask token at -inf."""
    g = torch.Generator(device=device).manual_seed(seed)
    lg = torch.randn((rows, length, vocab), generator=g, device=device) * 3  # (b, L, V)
    lg[..., min(LLADA_MASK, vocab - 1)] = float("-inf")
    return lg


def _kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child(impl: str, temperature: float, a: argparse.Namespace, out: str) -> None:
    """Run one implementation once in this (fresh) process; save its statistics and peak bytes."""
    torch.set_num_threads(a.threads)
    lg = random_logits(a.rows, a.length, a.vocab, a.device)
    gens = [torch.Generator(device=a.device).manual_seed(i) for i in range(a.rows)]
    fn = propose_reference if impl == "one pass" else propose
    if a.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stats = fn(lg, temperature, gens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _kib("VmRSS")
        stats = fn(lg, temperature, gens)
        peak = (_kib("VmHWM") - before) * 1024
    torch.save({"stats": [s.cpu() for s in stats], "peak": peak}, out)


def measure(impl: str, temperature: float, a: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{impl.replace(' ', '_')}_{temperature}.pt"
    cmd = [sys.executable, "-m", "benchmarks.stats_memory", "--child", impl, str(temperature), str(out),
           "--rows", str(a.rows), "--length", str(a.length), "--vocab", str(a.vocab),
           "--device", a.device, "--threads", str(a.threads)]
    subprocess.run(cmd, check=True)
    return torch.load(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="gen length L")
    p.add_argument("--vocab", type=int, default=LLADA_VOCAB)
    p.add_argument("--temperatures", default="0,1", help="comma-separated; 0 is greedy")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not write {OUT.name}")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "TEMPERATURE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a.child[0], float(a.child[1]), a, a.child[2])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in (float(x) for x in a.temperatures.split(",")):
            old, new = (measure(impl, t, a, Path(tmp)) for impl in ("one pass", "chunked"))
            diff = max((o.double() - n.double()).abs().max().item() for o, n in zip(old["stats"], new["stats"]))
            rows.append([f"{t:g}", f"{old['peak'] / 2**20:,.0f}", f"{new['peak'] / 2**20:,.0f}",
                         f"{old['peak'] / max(new['peak'], 1):.1f}", f"{diff:g}"])
    logits_mib = a.rows * a.length * a.vocab * 4 / 2**20
    table = tabulate(rows, ["temperature", "peak MiB one pass", "peak MiB chunked", "one pass / chunked",
                            "largest |difference| (x0, conf, margin, entropy)"], tablefmt="github")
    text = (f"`python -m benchmarks.stats_memory` on {a.device}: random float32 logits of {a.rows} rows x "
            f"L = {a.length} x V = {a.vocab:,} ({logits_mib:,.0f} MiB, not counted), peak extra memory "
            f"of the statistics:\n\n{table}\n")
    print(text)
    if not a.no_write:
        atomic_write(OUT if a.device == "cpu" else OUT.with_stem(f"{OUT.stem}_{a.device}"), lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
