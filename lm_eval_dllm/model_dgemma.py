"""The lm-eval model `dllm` on a DiffusionGemma checkpoint (`DLLM(pretrained=...)` builds this class).

    lm_eval --model dllm --model_args pretrained=google/diffusiongemma-26B-A4B-it --tasks gsm8k
    lm_eval --model dllm --model_args pretrained=...,sampler=threshold,tau=0.5 --tasks gsm8k

With no sampler= it decodes exactly as the checkpoint's own `generate()` (its generation_config.json);
a sampler of `generate_dgemma.MEANINGFUL` (or your module:Class) becomes its acceptance rule.
NFE = decoder passes per sample (what `generate()` divides by for `tokens_per_forward`, reported
as `tpf`); encoder passes are not counted. Everything else (requests, batching, chat template,
statistics in the results JSON and logged samples) is `DLLM`'s.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from .config import DLLMConfig
from .generate_dgemma import DiffusionGemmaGenerator, FamilyRule, check_sampler, resolve_canvas
from .loading import load, read_checkpoint, resolve_device, resolve_dtype
from .model import DLLM
from .policy import PolicyLoader
from .samplers import make_sampler
from .text import PromptFitter
from .utils import DLLMError

log = logging.getLogger(__name__)

# model_args of masked decoding that mean nothing here: (key, why)
NOT_HERE = {"steps": "the step count is the checkpoint's max_denoising_steps",
            "temperature": "tokens are sampled under the checkpoint's t_max..t_min schedule",
            "cache": "the encoder's key/value cache is the family's own, always on",
            "early_exit": "generate() always ends a sample at the canvas that holds its EOS"}


class DiffusionGemmaLM(DLLM):
    def __init__(self, **model_args: Any) -> None:
        super(DLLM, self).__init__()  # LM's and DataParallel's own set-up; DLLM's is for masked families
        self._warned: set[str] = set()
        self.cfg = DLLMConfig.from_model_args(model_args)
        for key, why in NOT_HERE.items():  # given with other than the default: refused, not ignored
            if getattr(self.cfg, key) != getattr(DLLMConfig, key):
                raise DLLMError(f"{key}={getattr(self.cfg, key)} does not apply to DiffusionGemma ({why}); "
                                f"valid: leave {key} unset")
        given = "sampler" in model_args
        if given:
            check_sampler(self.cfg.sampler)
        resolve_dtype(self.cfg.dtype)
        device = resolve_device(self._join(self.cfg.device))
        ck = read_checkpoint(self.cfg.pretrained_path, self.cfg.trust_remote_code, self.cfg.revision)
        self.spec, self.model_id, self.is_bundled = ck.spec, self.cfg.pretrained, False
        canvas = ck.config.canvas_length
        L0, block0 = resolve_canvas(canvas, self.cfg.gen_length, self.cfg.block)
        self.sampler = make_sampler(self.cfg.sampler, self.cfg.sampler_args) if given else None
        self.policies = PolicyLoader(self.model_id, device)
        if self.sampler is not None:  # fail before the weights load
            self.policies.load(self.sampler, block0, L0)
        self.model, self.tokenizer, self.spec = load(self.cfg.pretrained_path, self.cfg.dtype, str(device),
                                                     self.cfg.trust_remote_code, self.cfg.revision, checkpoint=ck)
        self._device = next(self.model.parameters()).device
        gc, _ = self.model._prepare_generation_config(None)
        self.sampler = self.sampler or FamilyRule(gc.sampler_config.entropy_bound)
        self.gen = DiffusionGemmaGenerator(self.model, self.tokenizer, self.spec, model_id=self.model_id,
                                           device=self._device, max_length=self.cfg.max_length,
                                           truncation=self.cfg.truncation, policies=self.policies)
        self._fit_ll = PromptFitter(self.gen.fit.limit, self.cfg.truncation, what="continuation")
        self.stats: dict[str, list[dict]] = defaultdict(list)
        self.sample_stats = {}
        log.info("dllm: DiffusionGemma, acceptance %r, canvas %d, %d denoising steps at most, model %s",
                 self.sampler, canvas, gc.max_denoising_steps, self.cfg.pretrained_path)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        gc, _ = self.model._prepare_generation_config(None)
        info["dllm"] |= {"sampler": self.sampler.name, "block": self.model.config.canvas_length,
                         "generation_config": {k: getattr(gc, k) for k in (
                             "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                             "confidence_threshold")} | {"entropy_bound": gc.sampler_config.entropy_bound}}
        return info
