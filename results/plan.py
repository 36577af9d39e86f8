"""What a grid will run and at most what it costs, before the hours of device time.

    python -m results --preset paper --pretrained GSAI-ML/LLaDA-8B-Instruct --dry-run

Per task: its few-shot count, its documents (--limit, or the task's whole evaluation split), the
prompt length in the model's tokens after left truncation (mean over the first 16 prompts), the
grid's runs and how many are on disk. The estimate comes from a short timing probe of the given
model: a warm-up and three timed forward passes of --batch-size rows at each task's canvas length
(prompt + L), times each missing run's documents and its NFE bound. The bound is exact for the
fixed-k samplers without early exit ((L / B) * ceil(B / k)) and L for the adaptive ones (threshold,
learned, ...), which usually need far fewer: the total is an upper bound, and a `--limit 20` run's
`run_seconds` scaled to the full split is the closer guess.
"""

from __future__ import annotations

import math
import time

import torch
from tabulate import tabulate

from lm_eval_dllm.decode import model_forward
from lm_eval_dllm.loading import load
from lm_eval_dllm.reward import TaskScorer
from lm_eval_dllm.text import PromptFitter
from lm_eval_dllm.tiny import BUNDLED_DIR

from .grid import Grid, Setting

PROBE_PROMPTS = 16  # prompts whose mean length sets a task's canvas


def nfe_bound(s: Setting, L: int) -> int:
    """The most forward passes one sample of this setting can take at generation length L."""
    B = min(s.block, L)
    k = dict(s.params).get("k")
    return (L // B) * math.ceil(B / int(k)) if k else L


def probe(forward, vocab: int, rows: int, length: int, device) -> float:
    """Seconds per row of one forward pass over a (rows, length) canvas: the median of three."""
    ids = torch.randint(0, vocab, (rows, length), device=device)  # (b, T); content does not change the cost
    attn = torch.ones_like(ids)
    times = []
    for i in range(4):  # the first is a warm-up (allocations, kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward(ids, attn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[1] / rows


def plan(grid: Grid) -> str:
    """The dry run's report: per task what will run, and the probe's upper bound of the cost."""
    settings = grid.settings()  # fails here, before loading anything, e.g. `learned` without a policy
    from lm_eval.tasks import TaskManager  # lm-eval's task index: seconds to build, so once

    model, tok, spec = load(grid.pretrained or str(BUNDLED_DIR), grid.dtype, grid.extra.get("device"))
    device = next(model.parameters()).device
    forward = model_forward(model, spec)
    vocab = getattr(model.config, "vocab_size", None) or len(tok)
    fit = PromptFitter(spec.max_length)
    tm = TaskManager()
    rows, notes, total_s, n_runs, n_todo = [], [], 0.0, 0, 0
    for task in grid.tasks:
        missing = [s for s in settings if not grid.path(task, s).exists()]
        n_runs += len(settings)
        n_todo += len(missing)
        try:
            sc = TaskScorer(task, num_fewshot=grid.fewshot.get(task), task_manager=tm)
            split = "test" if sc.task.has_test_docs() else "validation"
            docs = sc.docs(split)
        except Exception as e:  # noqa: BLE001 (a dry run reports what the real run would fail on)
            notes.append(f"- {task}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         f"not in the estimate")
            rows.append([task, grid.fewshot.get(task, "task's"), "?", "?", len(settings),
                         len(settings) - len(missing), len(missing), "?", "?"])
            continue
        L = grid.gen_length or int(sc.gen_kwargs.get("max_gen_toks") or spec.default_gen_length)
        n = len(docs) if grid.limit is None else min(grid.limit, len(docs))
        lens = [len(fit(tok(sc.prompt(d, i).context)["input_ids"], L)) for i, d in enumerate(docs[:PROBE_PROMPTS])]
        P = round(sum(lens) / len(lens))
        per_row = probe(forward, vocab, grid.batch_size, P + L, device)
        nfe = sum(nfe_bound(s, L) for s in missing) * n
        secs = nfe * per_row
        total_s += secs
        rows.append([task, sc.num_fewshot, n, P, len(settings), len(settings) - len(missing), len(missing),
                     f"{nfe:,}", f"{secs / 3600:.2f}"])
        notes.append(f"- {task}: {1000 * per_row:.2f} ms per row-forward at {P} + {L} tokens, batch {grid.batch_size}")
    table = tabulate(rows, ["task", "few-shot", "documents", "prompt tokens", "runs", "on disk", "to run",
                            "forwards at most (rows)", "hours at most"], tablefmt="github", disable_numparse=True)
    blocks = ", ".join(str(b) for b in grid.blocks)
    return (f"Plan: {grid.pretrained or 'the bundled model'} ({grid.dtype}) on {device}, blocks {blocks}, "
            f"L = {grid.gen_length or 'each task’s'}, {len({(s.sampler, s.params) for s in settings})} "
            f"sampler settings per block; runs under {grid.out / 'runs'}.\n\n{table}\n\n"
            + "\n".join(notes)
            + f"\n\n{n_runs} runs, {n_todo} to run: at most {total_s / 3600:.2f} device hours (divided "
            f"among the processes of an `accelerate launch`; adaptive samplers usually need far fewer forwards "
            f"than their bound).\n")
