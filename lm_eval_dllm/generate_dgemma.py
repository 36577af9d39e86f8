"""Contexts in, texts and statistics out, for DiffusionGemma: `Generator`'s interface on its `generate()`.

    gen = DiffusionGemmaGenerator(model, tokenizer, spec, model_id=..., device="cpu")
    L, B = gen.resolve(gen_length=None, block=None, max_gen_toks=64)   # B is the canvas
    out = gen.generate(contexts, None, gen_length=L, block=B, seeds=[...])   # None: the family's rule

The lm-eval model and GRPO call it as they call `Generator` (lm_eval_dllm.generate). One
`generate()` call decodes the batch; its random draws come from torch's global generator, seeded
with the batch's first seed inside `torch.random.fork_rng` (the caller's stream is left as it
was), so a row's output depends on its batch as in `generate()` itself; batch_size=1 makes every
sample reproducible alone. The per-row generators of the seeds serve our samplers' own draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from .generate import Generated, Generator
from .models.diffusion_gemma import Acceptance, AcceptanceConfig
from .samplers import sampler_class
from .samplers.base import Sampler
from .text import completion_text
from .utils import DLLMError

# our samplers whose rule means something on a uniform-noise canvas: a per-position score against a
# bound, re-decided every step. The top-k ones (confidence, margin, entropy: k from a step budget of
# masked decoding, where commits accumulate) and random keep a fixed count of an ever re-noised canvas.
MEANINGFUL = ("eb", "threshold", "factor", "learned")


def check_sampler(name: str) -> None:
    """One line for one of our samplers that does not fit the family (one of yours is taken as it is)."""
    if sampler_class(name).__module__.startswith("lm_eval_dllm.") and name not in MEANINGFUL:
        raise DLLMError(f"sampler={name!r} does not apply to DiffusionGemma (uniform noise: every step keeps "
                        f"some positions and re-noises the rest); valid: {', '.join(MEANINGFUL)}, module:Class, "
                        f"or no sampler= for the family's own entropy-bound rule")


def check_acceptance(sampler: Sampler, record_top: int = 0, record_hidden: bool = False) -> None:
    """One line for a rule the acceptance step cannot serve: a policy of the paper's networks (they read
    top-p probabilities or hidden states and decode steps of the masked loop) or a mode that may keep nothing."""
    if max(getattr(sampler, "top_probs", lambda: 0)(), record_top) or record_hidden or \
            getattr(sampler, "reads_hidden", lambda: False)():
        raise DLLMError("a policy of arch dit_confidence or dit_hidden does not apply to DiffusionGemma (its "
                        "inputs are the masked decode loop's); valid: a policy of arch features")
    if getattr(sampler, "may_commit_nothing", lambda: False)():
        raise DLLMError("mode=bernoulli may keep nothing in a step, which a DiffusionGemma canvas cannot "
                        "take; valid: mode=sample, greedy, pl (the paper's bernoulli-argmax, dpls)")


def resolve_canvas(canvas: int, gen_length: int | None, block: int | None,
                   max_gen_toks: int | None = None) -> tuple[int, int]:
    """(L, canvas): L from gen_length, else the task's max_gen_toks, else one canvas; the block is the
    checkpoint's canvas_length (generate() runs ceil(L / canvas) canvases)."""
    if block is not None and block != canvas:
        raise DLLMError(f"block={block}: DiffusionGemma decodes canvases of the checkpoint's "
                        f"canvas_length; valid: block={canvas} or no block")
    L = gen_length if gen_length is not None else max_gen_toks if max_gen_toks is not None else canvas
    if int(L) <= 0:
        raise DLLMError(f"gen_length={L} must be a positive integer; valid: 1, 2, ...")
    return int(L), canvas


class FamilyRule:
    """The family's own acceptance rule (transformers' entropy bound), where a run names its sampler."""

    name = "diffusion_gemma"

    def __init__(self, entropy_bound: float):
        self.config = EntropyBoundSamplerConfig(entropy_bound=entropy_bound)

    def wanted_policy(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"FamilyRule(entropy_bound={self.config.entropy_bound})"


def refuse_loglikelihood(*_args, **_kwargs):
    raise DLLMError("loglikelihood is not supported for DiffusionGemma (a uniform-noise model has no "
                    "masked-token ELBO here); valid: generation tasks (generate_until)")


class DiffusionGemmaGenerator(Generator):
    """`Generator` for DiffusionGemma: transformers' `generate()` with our sampler as its acceptance rule."""

    def __init__(self, model, tokenizer, spec, **kwargs):
        super().__init__(model, tokenizer, spec, **kwargs)
        self.model = model
        self.forward = refuse_loglikelihood  # no logits of a masked canvas to score

    def resolve(self, gen_length: int | None, block: int | None, max_gen_toks: int | None = None) -> tuple[int, int]:
        return resolve_canvas(self.model.config.canvas_length, gen_length, block, max_gen_toks)

    def generate(self, contexts: list[str], sampler: Sampler | None, *, gen_length: int, block: int,
                 seeds: list[int], temperature: float = 0.0, until: list[str] | None = None,
                 record: bool = False, record_top: int = 0, record_hidden: bool = False) -> Generated:
        """`temperature` is unused: the family samples under its own schedule (t_max to t_min)."""
        sampler = None if isinstance(sampler, FamilyRule) else sampler
        if sampler is not None:
            self.attach_policy(sampler, block, gen_length)
            check_acceptance(sampler, record_top, record_hidden)
        prompts = [self.encode(c, gen_length) for c in contexts]
        t0 = time.perf_counter()
        out = decode(self.model, prompts, sampler, gen_length=gen_length, seeds=seeds, pad_id=self.spec.pad_id,
                     device=self.device, record=record)
        wall = (time.perf_counter() - t0) / len(contexts)
        texts, stats = [], []
        for i, toks in enumerate(out.tokens.tolist()):
            texts.append(completion_text(toks, self.tokenizer, self.spec, until))
            nfe = int(out.nfe[i])
            stats.append({"nfe": nfe, "tokens": int(out.valid[i]), "tpf": float(out.tpf[i]),
                          "positions": nfe * block, "positions_per_forward": float(block), "wall_s": wall,
                          "gen_length": gen_length, "block": block})
        return Generated(texts, stats, out.steps)


@dataclass
class CanvasOutput:
    tokens: torch.Tensor  # (B, n_canvases * canvas) what generate() appended to the prompts (pad after a stop)
    tpf: torch.Tensor  # (B,) generate()'s tokens_per_forward
    nfe: torch.Tensor  # (B,) decoder passes per row, the denominator of tpf
    valid: torch.Tensor  # (B,) non-pad generated tokens, its numerator
    steps: list | None  # StepRecords (record=True)


def decode(model, prompts: list[list[int]], sampler: Sampler | None, *, gen_length: int, seeds: list[int],
           pad_id: int, device: torch.device, record: bool = False) -> CanvasOutput:
    """One `generate()` call over left-padded prompts, `sampler` (None: the family's rule) accepting."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    gc, _ = model._prepare_generation_config(None)  # the checkpoint's settings over transformers' defaults
    bound = gc.sampler_config.entropy_bound
    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    gens = [torch.Generator(device=gen_dev).manual_seed(int(s)) for s in seeds]
    acc = Acceptance(sampler, EntropyBoundSamplerConfig(entropy_bound=bound), model.config.canvas_length,
                     model.config.text_config.vocab_size, gc.max_denoising_steps, gens, record=record)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seeds[0]))
        # a checkpoint with a static cache compiles generate()'s pieces, the acceptance step among them
        # (and keeps the first call's compiled one); our sampler's step runs uncompiled
        out = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=gen_length,
                             sampler_config=AcceptanceConfig(entropy_bound=bound, acceptance=acc),
                             **({"disable_compile": True} if sampler is not None else {}))
    new = out.sequences[:, P:].cpu()
    valid = (new != gc.pad_token_id).sum(-1) if gc.pad_token_id is not None else torch.full((len(new),), new.shape[1])
    return CanvasOutput(new, out.tokens_per_forward.cpu(), acc.out.nfe, valid, acc.out.steps if record else None)
