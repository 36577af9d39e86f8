"""The lm-eval model `dllm`: masked diffusion LMs with pluggable unmasking samplers.

    lm_eval --model dllm --model_args sampler=threshold,tau=0.9,block=8 --tasks modchain

Generation goes through the one decode loop (`decode.diffuse`). Per-sample NFE, tokens per
forward and wall time are kept and reach lm-eval's output: per task in the results JSON
(`results[task]["nfe,none"]`, `"tpf,none"`, `"positions_per_forward,none"`, `"wall_s,none"`
and `config.dllm`) and per sample
under `"dllm"` in what `--log_samples` writes (see `lm_eval_dllm._hook`).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import Collator
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from .cache import check_cache_support
from .config import DLLMConfig
from .generate import Generator, chat_prompt, resolve_shape
from .likelihood import elbo_loglikelihoods, rolling_windows, split_pair
from .loading import load, read_checkpoint, read_config, resolve_device, resolve_dtype, resolve_pretrained
from .models.diffusion_gemma import is_diffusion_gemma
from .tiny import BUNDLED_ID
from .parallel import DataParallel
from .report import SAMPLES_KEY
from .policy import PolicyLoader
from .samplers import make_sampler
from .tasks import BUNDLED_TASKS
from .text import PromptFitter, stop_strings
from .utils import DLLMError

log = logging.getLogger(__name__)

REAL_DLLM_HINT = "GSAI-ML/LLaDA-8B-Instruct"
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # lm-eval's EvaluateConfig.device default

def sample_seed(seed: int, context: str, occurrence: int = 0) -> int:
    """A request's random seed, from the run's `seed` and its context (plus `occurrence`: which repeat
    of the context, or which window of a rolling document), never from its batch position or order,
    so a batch gives each row its single-row draws. Loglikelihood requests of one question share the
    context and so their mask draws (common random numbers: a less noisy comparison of the choices)."""
    return (seed * 1_000_003 + zlib.crc32(context.encode()) * 7_919 + occurrence) % (2**63)


def _config_or_none(model_args: dict):
    """The checkpoint's config, or None where it cannot be read: __init__ then checks the arguments
    first and reports the checkpoint in its own words."""
    try:
        return read_config(resolve_pretrained(str(model_args["pretrained"])), model_args.get("revision"))
    except DLLMError:
        return None


class DLLM(DataParallel, LM):
    def __new__(cls, **model_args: Any):
        # issue 31 hook: a DiffusionGemma checkpoint (uniform noise) gets its own subclass (model_dgemma)
        if cls is DLLM and model_args.get("pretrained") and is_diffusion_gemma(_config_or_none(model_args)):
            from .model_dgemma import DiffusionGemmaLM  # a subclass of this class: a top-level import is a cycle
            cls = DiffusionGemmaLM
        return super().__new__(cls)

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self._warned: set[str] = set()
        # every setting is checked before the weights load (minutes for an 8B model); errors are
        # DLLMError, which lm-eval's CLI prints as one line (lm_eval_dllm._hook)
        self.cfg = DLLMConfig.from_model_args(model_args)
        resolve_dtype(self.cfg.dtype)
        device = resolve_device(self._join(self.cfg.device))  # launched: rank, world size, local device
        ck = read_checkpoint(self.cfg.pretrained_path, self.cfg.trust_remote_code, self.cfg.revision,
                             self.cfg.impl)
        self.spec = ck.spec
        self.cfg.check_context(self.spec.max_length)
        check_cache_support(self.cfg.cache, self.spec.cache, repr(self.cfg.pretrained_path))
        if self.cfg.gen_length is not None:  # validate block against gen_length now
            resolve_shape(self.spec, self.cfg.gen_length, self.cfg.block)
        self.sampler = make_sampler(self.cfg.sampler, self._sampler_args(self.cfg.gen_length))
        self.model_id = BUNDLED_ID if not self.cfg.pretrained else self.cfg.pretrained
        try:  # the policy for the model's default length: fail now, not mid-run (no such policy, bad file)
            L0, block0 = resolve_shape(self.spec, self.cfg.gen_length, self.cfg.block)
        except DLLMError:  # a block that fits only the task's max_gen_toks: checked per request
            L0 = None
        self.policies = PolicyLoader(self.model_id, device)
        if L0 is not None:
            self.policies.load(self.sampler, block0, L0)
        self.model, self.tokenizer, self.spec = load(
            self.cfg.pretrained_path, self.cfg.dtype, str(device),
            self.cfg.trust_remote_code, self.cfg.revision, checkpoint=ck)
        self._device = next(self.model.parameters()).device
        self.gen = Generator(self.model, self.tokenizer, self.spec, model_id=self.model_id,
                             device=self._device, max_length=self.cfg.max_length,
                             truncation=self.cfg.truncation, early_exit=self.cfg.early_exit,
                             cache=self.cfg.cache, refresh=self.cfg.refresh,
                             window=self.cfg.window, compat=self.cfg.compat, policies=self.policies)
        self._fit_ll = PromptFitter(self.gen.fit.limit, self.cfg.truncation, what="continuation")
        self.is_bundled = not self.cfg.pretrained
        self.stats: dict[str, list[dict]] = defaultdict(list)  # task -> per-sample stats
        self.sample_stats: dict[str, dict[int, list[dict]]] = {}  # task -> doc_id -> what --log_samples shows
        log.info("dllm: sampler %r, block %s, model %s", self.sampler, self.cfg.block,
                 self.cfg.pretrained_path)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if (extra.get("device") == LM_EVAL_DEFAULT_DEVICE and "device" not in arg_dict
                and not torch.cuda.is_available()):
            # lm-eval passes its default "cuda:0" even when --device was not given
            log.info("dllm: lm-eval's default device %s is not available here; using cpu "
                     "(pass --device or device= to choose)", LM_EVAL_DEFAULT_DEVICE)
            extra["device"] = "cpu"
        return cls(**(extra | dict(arg_dict)))  # model_args win over --batch_size / --device

    # ---------------------------------------------------------------- settings per request
    def _sampler_args(self, gen_length: int | None) -> dict:
        args = dict(self.cfg.sampler_args)
        if self.cfg.steps is not None and gen_length is not None:
            if gen_length % self.cfg.steps:
                raise DLLMError(f"steps={self.cfg.steps} does not divide gen_length={gen_length}; "
                                f"valid: a divisor of {gen_length}")
            args["k"] = gen_length // self.cfg.steps
        return args

    def _say_if_full(self, L: int, B: int) -> None:
        """Once per L: a block asked for >= L runs as full diffusion."""
        asked = self.cfg.block if self.cfg.block is not None else self.spec.default_block
        if B == L and asked != L and f"full{L}" not in self._warned:
            self._warned.add(f"full{L}")
            log.info("block=%s >= gen_length=%d: full diffusion", asked, L)

    def _temperature(self, gen_kwargs: dict) -> float:
        if self.cfg.temperature is not None:
            return self.cfg.temperature
        if gen_kwargs.get("do_sample") is False:
            return 0.0
        return float(gen_kwargs.get("temperature", 0.0) or 0.0)

    # ---------------------------------------------------------------- lm-eval interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """ELBO estimates (see `likelihood`): (log-likelihood, is_greedy) per (context, continuation)."""
        if not requests:
            return []
        self._warn_task_mismatch({r.task_name for r in requests})
        items = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, tgt = split_pair(self._tokenize, context, continuation)
            items.append((self._ll_context(ctx, tgt), tgt, sample_seed(self.cfg.seed, context)))
        res, wall = self._elbo(items, disable_tqdm, "dllm loglikelihood")
        self._record(requests, [{"ll_forwards": f, "target_tokens": len(t), "wall_s": wall}
                                for (_, f), (_, t, _) in zip(res, items)])
        return [ll_greedy for ll_greedy, _ in res]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's log-likelihood: the sum of ELBO estimates over `likelihood.rolling_windows`
        of the model's context (max_length; no limit when the model declares none)."""
        if not requests:
            return []
        self._warn_task_mismatch({r.task_name for r in requests})
        limit = self.cfg.max_length or self.spec.max_length
        items, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            wins = rolling_windows(ids, limit or len(ids) + 1, self._prefix_id())
            for w, (ctx, tgt) in enumerate(wins):
                items.append((ctx, tgt, sample_seed(self.cfg.seed, req.args[0], w)))
                owner.append(i)
        res, wall = self._elbo(items, disable_tqdm, "dllm loglikelihood_rolling")
        totals = [0.0] * len(requests)
        stats = [{"ll_forwards": 0, "target_tokens": 0, "windows": 0} for _ in requests]
        for i, ((ll, _), f), (_, tgt, _) in zip(owner, res, items):
            totals[i] += ll
            stats[i]["ll_forwards"] += f
            stats[i]["target_tokens"] += len(tgt)
            stats[i]["windows"] += 1
        n_win = [s["windows"] for s in stats]
        self._record(requests, [s | {"wall_s": wall * n} for s, n in zip(stats, n_win)])
        return totals

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.gen.chat)["input_ids"]

    def _prefix_id(self) -> int:
        # the context of a continuation that has none (as lm-eval's HF model: BOS, else EOS)
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else (self.spec.stop_ids or (self.spec.pad_id,))[0]

    def _ll_context(self, ctx: list[int], tgt: list[int]) -> list[int]:
        return self._fit_ll(ctx, len(tgt)) or [self._prefix_id()]

    def _elbo(self, items, disable_tqdm: bool, desc: str):
        """[((ll, is_greedy), forwards)] for (ctx, tgt, seed) items, and the wall seconds per item."""
        pbar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc=desc)
        t0 = time.perf_counter()
        out = elbo_loglikelihoods(self.gen.forward, items, self.spec, self.cfg.mc_num, self.cfg.mc_batch,
                                  self.cfg.batch_size, device=self._device, on_done=pbar.update)
        wall = (time.perf_counter() - t0) / max(len(items), 1)
        pbar.close()
        return [((ll, g), f) for ll, g, f in out], wall

    def _record(self, requests, stats: list[dict]) -> None:
        """Keep each request's statistics (stats[i] is requests[i]'s): per task for the summary, and
        per document for the logged samples, where a new run of a document replaces an earlier one's."""
        for req in requests:
            self.sample_stats.get(req.task_name, {}).pop(req.doc_id, None)
        stats = [{"task": req.task_name, "doc_id": req.doc_id} | st for req, st in zip(requests, stats)]
        for st in self._gather_stats(requests, stats):  # every rank's on rank 0, padding copies left out
            self.stats[st["task"]].append(st)
            self.sample_stats.setdefault(st["task"], {}).setdefault(st["doc_id"], []).append(st)
        if self.rank == 0:
            self._log_summary()

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if not getattr(self.tokenizer, "chat_template", None):
            raise DLLMError(f"--apply_chat_template given but the tokenizer of "
                             f"{self.cfg.pretrained_path!r} has no chat template; valid: a chat model "
                             f"such as {REAL_DLLM_HINT}, or drop --apply_chat_template")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.gen.chat = True  # the template carries its own special tokens
        return chat_prompt(self.tokenizer, chat_history, add_generation_prompt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        self._warn_task_mismatch({r.task_name for r in requests})
        seen: dict[str, int] = defaultdict(int)
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1])
            items.append((context, gen_kwargs, i, seen[context]))
            seen[context] += 1
        collator = Collator(items, sort_fn=lambda x: (-len(x[0]), x[2]), group_by="gen_kwargs",
                            group_fn=lambda x: x[1])
        results: list[tuple[str, dict]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="dllm generate")
        for chunk in collator.get_batched(n=self.cfg.batch_size):
            results.extend(self._generate_batch(chunk))
            pbar.update(len(chunk))
            nfe = [s["nfe"] for _, s in results]
            pbar.set_postfix(nfe=f"{sum(nfe) / len(nfe):.1f}")
        pbar.close()
        ordered = collator.get_original(results)
        self._record(requests, [st for _, st in ordered])
        return [text for text, _ in ordered]

    def _generate_batch(self, chunk) -> list[tuple[str, dict]]:
        contexts, gen_kwargs = [c[0] for c in chunk], chunk[0][1]
        L, block = self.gen.resolve(self.cfg.gen_length, self.cfg.block, gen_kwargs.get("max_gen_toks"))
        self._say_if_full(L, block)
        sampler = (self.sampler if self.cfg.steps is None
                   else make_sampler(self.cfg.sampler, self._sampler_args(L)))
        out = self.gen.generate(contexts, sampler, gen_length=L, block=block,
                                seeds=[sample_seed(self.cfg.seed, c[0], c[3]) for c in chunk],
                                temperature=self._temperature(gen_kwargs),
                                until=stop_strings(gen_kwargs, self.tokenizer, self.spec))
        return list(zip(out.texts, out.stats))

    # ---------------------------------------------------------------- reporting
    def _warn_task_mismatch(self, tasks: set) -> None:
        if not self.is_bundled:
            return
        for t in sorted(tasks - set(BUNDLED_TASKS) - self._warned):
            self._warned.add(t)
            log.warning("the bundled tiny model was trained only on %s, not on task %r: expect "
                        "near-zero accuracy; pass a real dLLM, e.g. --model_args pretrained=%s",
                        ", ".join(BUNDLED_TASKS), t, REAL_DLLM_HINT)

    def task_summary(self) -> dict[str, dict]:
        out = {}
        for task, sts in self.stats.items():
            n = len(sts)
            s = {"n": n, "wall_s_per_sample": sum(st["wall_s"] for st in sts) / n}
            if "nfe" in sts[0]:  # generation
                nfe = sum(st["nfe"] for st in sts)
                s |= {"mean_nfe": nfe / n, "tpf": sum(st["tokens"] for st in sts) / max(nfe, 1),
                      "positions_per_forward": sum(st["positions"] for st in sts) / max(nfe, 1)}
            else:  # loglikelihood: forwards per request
                s["mean_ll_forwards"] = sum(st["ll_forwards"] for st in sts) / n
            out[task] = s
        return out

    def _log_summary(self) -> None:
        for task, s in self.task_summary().items():
            if "mean_nfe" in s:
                log.info("dllm %s: %d samples, mean NFE %.2f, tokens/forward %.2f, positions/forward "
                         "%.1f, %.3f s/sample", task, s["n"], s["mean_nfe"], s["tpf"],
                         s["positions_per_forward"], s["wall_s_per_sample"])
            else:
                log.info("dllm %s: %d requests, %.1f forwards/request, %.4f s/request",
                         task, s["n"], s["mean_ll_forwards"], s["wall_s_per_sample"])

    def get_model_info(self) -> dict:
        return {"dllm": {
            "pretrained": self.cfg.pretrained_path,
            "family": self.spec.family,
            "impl": self.cfg.impl,
            "model_class": type(self.model).__name__,  # NativeDLLM, or the class transformers built
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),  # what auto resolved to
            "sampler": self.cfg.sampler,
            "sampler_config": {k: v for k, v in vars(self.sampler.config).items()},
            # what a sampler resolved per (block, L) from what was not given (learned: the card's
            # recommended mode/temperature/cutoff or the paper's defaults), and from where
            "sampler_resolved": [{"block": b, "gen_length": n} | st for (b, n), st in
                                 sorted(getattr(self.sampler, "resolved", {}).items())],
            "block": self.cfg.block if self.cfg.block is not None else self.spec.default_block,
            "gen_length": self.cfg.gen_length,
            "cache": self.cfg.cache, "refresh": self.cfg.refresh, "window": self.cfg.window,
            "compat": self.cfg.compat,
            "seed": self.cfg.seed,
            "mc_num": self.cfg.mc_num,
            "mc_batch": self.cfg.mc_batch,
            "per_task": self.task_summary(),
        }, SAMPLES_KEY: self.sample_stats}
