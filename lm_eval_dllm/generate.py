"""Contexts in, completion texts and per-sample statistics out: the one path around the decode loop.

    gen = Generator(model, tokenizer, spec, model_id=..., device="cpu")
    L, B = gen.resolve(gen_length=None, block=None, max_gen_toks=64)  # model_args > task > model
    out = gen.generate(contexts, sampler, gen_length=L, block=B, seeds=[...], until=["\\n\\n"])
    out.texts, out.stats                          # stats: nfe, tokens, tpf, positions_per_forward, ...

The lm-eval model, GRPO rollouts and validation, pretraining's check and the benchmarks all call
it, so they tokenize, apply the chat template, fit the context (max_length, truncation), resolve
(L, block), bind the sampler, decode and cut at stop tokens and strings the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .compat import Compat
from .decode import StepRecord, check_block, diffuse, model_forward
from .policy import PolicyLoader
from .samplers.base import Sampler
from .spec import FamilySpec
from .text import PromptFitter, completion_text


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template as lm-eval applies it (a last assistant turn is continued)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=not add_generation_prompt)


def resolve_shape(spec: FamilySpec, gen_length: int | None, block: int | None,
                  max_gen_toks: int | None = None) -> tuple[int, int]:
    """(L, block), the one rule: L from gen_length, else the task's max_gen_toks, else the model's
    default; block from `block`, else the model's default; B >= L is full diffusion, else B divides L."""
    if gen_length is None:
        gen_length = int(max_gen_toks) if max_gen_toks is not None else spec.default_gen_length
    return gen_length, check_block(spec.default_block if block is None else block, gen_length)


@dataclass
class Generated:
    texts: list[str]  # what the task scores: cut at the first stop token, then at its stop strings
    stats: list[dict]  # per sample: nfe, tokens, tpf, positions_per_forward, wall_s, gen_length, block
    trajectory: list[StepRecord] | None  # record=True: what the policy gradient replays


class Generator:
    """One model and tokenizer, set up once; `generate` decodes one batch of contexts."""

    def __init__(self, model, tokenizer, spec: FamilySpec, *, model_id: str, device,
                 max_length: int | None = None, truncation: str = "left", early_exit: bool = True,
                 chat: bool = False, cache: str = "none", refresh: int = 0, window: int = 0,
                 compat: str | Compat = "none", policies: PolicyLoader | None = None):
        self.forward = model_forward(model, spec, cache, refresh, window)  # the decode loop's strategy
        self.tokenizer, self.spec, self.model_id = tokenizer, spec, model_id
        self.device = torch.device(device)
        self.early_exit, self.compat = early_exit, compat
        self.chat = chat  # contexts carry the chat template's own special tokens: add none
        self.fit = PromptFitter(max_length or spec.max_length, truncation)
        self.policies = policies or PolicyLoader(model_id, self.device)  # the caller's, to share what it loaded

    def resolve(self, gen_length: int | None, block: int | None,
                max_gen_toks: int | None = None) -> tuple[int, int]:
        return resolve_shape(self.spec, gen_length, block, max_gen_toks)

    def attach_policy(self, sampler: Sampler, block: int, gen_length: int) -> None:
        """Hand the sampler the policy it wants for this (block, L), loaded once."""
        policy = self.policies.load(sampler, block, gen_length)
        if policy is not None:
            sampler.attach(policy, block, gen_length)

    def encode(self, context: str, gen_length: int) -> list[int]:
        ids = self.tokenizer(context, add_special_tokens=not self.chat)["input_ids"]
        return self.fit(ids, gen_length)

    def generate(self, contexts: list[str], sampler: Sampler, *, gen_length: int, block: int,
                 seeds: list[int], temperature: float = 0.0, until: list[str] | None = None,
                 record: bool = False, record_top: int = 0, record_hidden: bool = False) -> Generated:
        self.attach_policy(sampler, block, gen_length)
        prompts = [self.encode(c, gen_length) for c in contexts]
        t0 = time.perf_counter()
        out = diffuse(self.forward, prompts, self.spec, sampler, gen_length, block,
                      temperature=temperature, seeds=seeds, early_exit=self.early_exit,
                      record=record, device=self.device, record_top=record_top, compat=self.compat,
                      record_hidden=record_hidden)
        wall = (time.perf_counter() - t0) / len(contexts)
        texts, stats = [], []
        for i, toks in enumerate(out.tokens.tolist()):
            texts.append(completion_text(toks, self.tokenizer, self.spec, until))
            nfe, committed, computed = int(out.nfe[i]), int(out.committed[i]), int(out.positions[i])
            stats.append({"nfe": nfe, "tokens": committed, "tpf": committed / max(nfe, 1),
                          "positions": computed, "positions_per_forward": computed / max(nfe, 1),
                          "wall_s": wall, "gen_length": gen_length, "block": block})
        return Generated(texts, stats, out.trajectory)
