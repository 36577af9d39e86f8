"""Data-parallel evaluation: the `dllm` model under `accelerate launch` (or torchrun).

    accelerate launch --multi_gpu --num_processes 8 -m lm_eval --model dllm \
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct --tasks gsm8k --output_path out --log_samples

lm-eval does the sharding once a model reports `rank` and `world_size`: document i goes to rank
i % world_size, each rank's requests are padded with copies of its last request so every rank
runs as many, and the evaluator gathers metrics and logged samples on rank 0. What is left to the
model is in `DataParallel`: joining the process group, its rank (the global process index, so it
holds across nodes), its local device, lm-eval's collective primitives, and gathering the
per-sample measurements (NFE, tokens per forward, wall time) on rank 0 without the padding copies,
so the results JSON and the logged samples count every sample exactly once.

Without a launcher (WORLD_SIZE unset or 1) none of this runs and the model behaves as before.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from datetime import timedelta

import torch

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether a launcher (accelerate launch --multi_gpu, torchrun) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def padding(requests) -> list[bool]:
    """For each request, whether it is a copy lm-eval appended only to even out the ranks.

    The evaluator passes each request `repeats` times (the same object), then pads a rank with
    further references to its last request; so an occurrence beyond a request's `repeats` is padding.
    """
    seen: Counter = Counter()
    out = []
    for r in requests:
        seen[id(r)] += 1
        out.append(seen[id(r)] > getattr(r, "repeats", 1))
    return out


class DataParallel:
    """lm-eval's distributed hooks (rank, world_size, all_gather, gather_object, barrier) for an LM."""

    accelerator = None  # set when launched

    def _join(self, device: str | None) -> str | None:
        """Join the process group when launched; returns the device to load the model on."""
        if not launched():
            return device
        # accelerate is imported only here: a single-process run never pays for it
        from accelerate import Accelerator, InitProcessGroupKwargs

        # On a machine without GPUs, or asked for the CPU, the group must be told so (gloo);
        # otherwise accelerate sees no GPU backend and leaves every process on its own as rank 0
        cpu = (device is not None and device.startswith("cpu")) or not torch.cuda.is_available()
        # ranks wait at the evaluator's barriers while the slowest finishes its share: hours on
        # a large task, past the default 10-30 minute collective timeout
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        local = "cpu" if cpu else str(self.accelerator.device)  # cuda:<local process index>
        if device is not None and device != local:
            log.info("dllm rank %d: device %s replaced by this process's own, %s", self._rank, device, local)
        log.info("dllm: rank %d of %d on %s", self._rank, self._world_size, local)
        return local

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.accelerator is None:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _gather_stats(self, requests, stats: list[dict]) -> list[dict]:
        """The per-sample stats to record here: this rank's, padding left out; on rank 0 of a
        launched run, every rank's (each with its `rank`), in (task, doc_id) order."""
        own = [st for st, pad in zip(stats, padding(requests)) if not pad]
        if self.accelerator is None:
            return own
        own = [st | {"rank": self._rank} for st in own]  # which process decoded it
        parts = self.gather_object(own)
        if self._rank != 0:
            return own
        return sorted(itertools.chain.from_iterable(parts), key=lambda s: (s["task"], s["doc_id"]))
