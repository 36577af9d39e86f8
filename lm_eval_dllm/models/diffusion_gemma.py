"""DiffusionGemma: uniform-noise block diffusion, decoded by transformers' own `generate()`.

    lm_eval --model dllm --model_args pretrained=google/diffusiongemma-26B-A4B-it --tasks gsm8k
    python -m lm_eval_dllm.models.diffusion_gemma /tmp/tiny-dgemma    # a tiny random checkpoint

transformers ships the family (`DiffusionGemmaForBlockDiffusion`): a causal encoder writes the key/value
cache, a bidirectional decoder denoises a canvas of `canvas_length` tokens that starts as random tokens;
each step samples a canvas under a temperature schedule, keeps the positions its sampler accepts and
re-noises the rest; a canvas stops early once its argmax is stable and its entropy low. We run that
`generate()` unchanged (no copy of it), through two hooks of a subclass:

- `_prepare_sampler` returns an `Acceptance`: transformers' own entropy-bound sampler (canvas
  initialisation and re-noising stay the family's) whose `accept_canvas` asks one of our samplers
  which positions to keep, when one is given; with none it is transformers' rule, so the default
  decode is exactly `generate()`'s, random draws included.
- `_denoising_step` / `_finalize_canvas` tell it which rows are still denoising, so it counts NFE per
  row as `generate()` counts decoder passes for `tokens_per_forward`, and records the steps GRPO replays.

What a sampler sees (`StepState`): for every canvas position, conf = probability of the sampled token,
margin and entropy of the temperature-scaled distribution; `masked` = positions holding noise (not kept
last step); `eligible` = the whole canvas (any position may be kept or re-noised).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    Gemma4VisionConfig,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
)

from ..decode import StepRecord, _check_action
from ..samplers.base import Action, Sampler, StepState
from ..spec import FamilySpec
from ..tiny.tokenizer import build_char_tokenizer

MODEL_TYPE = "diffusion_gemma"
TURN_END = "<end_of_turn>"  # Gemma's end of a chat turn


def is_diffusion_gemma(config) -> bool:
    """config.json as a dict, or a transformers config."""
    mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return str(mt or "").lower() == MODEL_TYPE


def generation_config(path: str, revision: str | None = None) -> DiffusionGemmaGenerationConfig:
    """The checkpoint's generation_config.json (transformers' defaults fill what it leaves unset)."""
    try:
        return DiffusionGemmaGenerationConfig.from_pretrained(path, revision=revision)
    except OSError:  # none shipped: generate() uses its defaults
        return DiffusionGemmaGenerationConfig()


def family_spec(config, tokenizer, generation_config) -> FamilySpec:
    """Stop, pad and length facts from the checkpoint. Uniform noise has no mask token: mask_id is -1,
    which is no token id, and default_block is the canvas."""
    text = config.get_text_config()
    stops = [generation_config.eos_token_id, text.eos_token_id, tokenizer.eos_token_id]
    flat = [int(s) for v in stops if v is not None for s in (v if isinstance(v, (list, tuple)) else [v])]
    turn = tokenizer.get_vocab().get(TURN_END)
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else text.pad_token_id
    return FamilySpec(family=MODEL_TYPE, mask_id=-1, stop_ids=tuple(dict.fromkeys(flat + ([turn] if turn else []))),
                      pad_id=int(pad if pad is not None else tokenizer.pad_token_id), shifted=False, suppress_ids=(),
                      max_length=text.max_position_embeddings, default_gen_length=config.canvas_length,
                      default_block=config.canvas_length)


@dataclass
class StepRecords:
    """What an `Acceptance` measured in one `generate()` call."""

    nfe: torch.Tensor  # (B,) decoder passes each row counted (as generate's tokens_per_forward does)
    steps: list = field(default_factory=list)  # StepRecord per step (record=True)


class Acceptance(EntropyBoundSampler):
    """transformers' entropy-bound sampler with our sampler as its acceptance rule (None: its own)."""

    def __init__(self, rule: Sampler | None, config: EntropyBoundSamplerConfig, canvas_length: int,
                 vocab_size: int, max_denoising_steps: int, generators: list[torch.Generator],
                 record: bool = False):
        super().__init__(config, canvas_length, vocab_size, max_denoising_steps)
        self.rule, self.generators, self.record = rule, generators, record
        self.max_steps = max_denoising_steps
        self.finished_sequences: torch.Tensor | None = None  # rows done before this canvas
        self.active: torch.Tensor | None = None  # (B,) rows whose decoder pass this step counts
        self.canvas = 0
        self.out = StepRecords(nfe=torch.zeros(len(generators), dtype=torch.long))

    def begin_step(self, finished_denoising: torch.Tensor) -> None:
        done = finished_denoising if self.finished_sequences is None else finished_denoising | self.finished_sequences
        self.active = ~done
        self.out.nfe += self.active.long().cpu()

    def end_canvas(self, finished_sequences: torch.Tensor) -> None:
        self.finished_sequences = finished_sequences.clone()
        self.canvas += 1
        self.accepted_token_mask = None

    def accept_canvas(self, current_canvas, denoiser_canvas, logits, cur_step):
        if self.rule is None:
            return super().accept_canvas(current_canvas, denoiser_canvas, logits, cur_step)
        state = step_state(denoiser_canvas, logits, self.accepted_token_mask, self.generators)
        action = Action.of(self.rule.select(state))
        _check_action(self.rule, action.commit, state.eligible)  # the sampler contract, as in the masked decode loop
        if self.record:
            self._record(state, action, int(cur_step))
        self.accepted_token_mask = action.commit
        return torch.where(action.commit, denoiser_canvas, current_canvas)

    def _record(self, state: StepState, action: Action, cur_step: int) -> None:
        rows = self.active.nonzero().squeeze(-1)  # finished rows' steps are discarded by generate
        if rows.numel() == 0:
            return
        pick = lambda t: t[rows].cpu()  # noqa: E731
        self.out.steps.append(StepRecord(
            rows=rows.cpu(), conf=pick(state.conf), margin=pick(state.margin), entropy=pick(state.entropy),
            masked=pick(state.masked), eligible=pick(state.eligible), action=pick(action.commit),
            block=self.canvas, num_blocks=self.canvas + 1, step=self.max_steps - cur_step,
            rank=None if action.rank is None else pick(action.rank)))


def step_state(denoiser_canvas: torch.Tensor, logits: torch.Tensor, kept: torch.Tensor | None,
               generators: list[torch.Generator]) -> StepState:
    """Per-position statistics of one denoising step. logits: (B, C, V) temperature-scaled."""
    p = torch.softmax(logits.float(), dim=-1)  # (B, C, V)
    conf = p.gather(-1, denoiser_canvas[..., None]).squeeze(-1)  # (B, C) the sampled token's probability
    top2 = p.topk(2, dim=-1).values
    entropy = torch.special.entr(p).sum(-1)
    every = torch.ones_like(conf, dtype=torch.bool)
    masked = every if kept is None else ~kept  # noise: not kept last step (all of it at a canvas start)
    return StepState(conf=conf, margin=top2[..., 0] - top2[..., 1], entropy=entropy, masked=masked,
                     eligible=every, generators=generators, x0=denoiser_canvas)


@dataclass
class AcceptanceConfig(EntropyBoundSamplerConfig):
    """Rides in the generation config's `sampler_config` (which `generate()` validates as an
    EntropyBoundSamplerConfig) to hand our `Acceptance` to `_prepare_sampler`."""

    acceptance: Acceptance | None = None

    def __deepcopy__(self, memo):  # the generation config is deep-copied; the acceptance is this call's
        return self

    def to_dict(self):  # what a saved generation config holds: transformers' own sampler config
        return EntropyBoundSamplerConfig(entropy_bound=self.entropy_bound).to_dict()


class DLLMDiffusionGemma(DiffusionGemmaForBlockDiffusion):
    """transformers' class with the hooks that plug an `Acceptance` into its `generate()`."""

    def _prepare_sampler(self, generation_config):
        cfg = generation_config.sampler_config
        if isinstance(cfg, AcceptanceConfig) and cfg.acceptance is not None:
            return cfg.acceptance
        return super()._prepare_sampler(generation_config)

    def _denoising_step(self, **kwargs):
        if isinstance(kwargs["sampler"], Acceptance):
            kwargs["sampler"].begin_step(kwargs["finished_denoising"])
        return super()._denoising_step(**kwargs)

    @staticmethod
    def _finalize_canvas(input_ids, finished_sequences, generation_config, **kwargs):
        ids, finished = DiffusionGemmaForBlockDiffusion._finalize_canvas(
            input_ids, finished_sequences, generation_config, **kwargs)
        cfg = generation_config.sampler_config
        if isinstance(cfg, AcceptanceConfig) and cfg.acceptance is not None:
            cfg.acceptance.end_canvas(finished)
        return ids, finished


def load(path: str, dtype, device: torch.device, revision: str | None = None) -> DLLMDiffusionGemma:
    """The checkpoint (one file or shards) in `dtype` on `device`; a GPU gets the weights directly."""
    where = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = DLLMDiffusionGemma.from_pretrained(path, dtype=dtype, revision=revision, **where)
    return model.to(device).eval()


# a Gemma-style chat template over the tiny tokenizer's special tokens
TINY_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
             "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_tiny_checkpoint(out: str | Path, seed: int = 0, canvas_length: int = 16, hidden: int = 32,
                          max_denoising_steps: int = 8, shards: int = 1, logit_scale: float = 100.0,
                          dtype: torch.dtype = torch.float32, **generation) -> Path:
    """A random DiffusionGemma (MoE text model, tiny vision tower) with a character tokenizer; seconds on
    a CPU. The tied embedding / output layer is scaled by `logit_scale` (random logits are near-uniform),
    and generation_config.json is transformers' defaults but for `max_denoising_steps`, no stability
    requirement and a confidence threshold of 0.3 nats (`generation` overrides), so that on random weights
    rows stop denoising at different steps and some end early at an EOS. shards > 1: about that many
    weight files and an index, as published checkpoints come."""
    out = Path(out)
    specials = {"pad_token": ("<pad>", None), "eos_token": ("<eos>", None), "bos_token": ("<bos>", None),
                "unk_token": ("<unk>", None), "turn_start": ("<start_of_turn>", None),
                "turn_end": (TURN_END, None), "image": ("<image>", None), "boi": ("<start_of_image>", None),
                "eoi": ("<end_of_image>", None)}
    tok = build_char_tokenizer(specials, chat_template=TINY_CHAT)
    v = tok.get_vocab()
    text = DiffusionGemmaTextConfig(
        vocab_size=max(v.values()) + 1, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, global_head_dim=hidden // 2,
        num_experts=4, top_k_experts=2, moe_intermediate_size=hidden, sliding_window=2 * canvas_length,
        max_position_embeddings=1024, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    config = DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  canvas_length=canvas_length, image_token_id=v["<image>"],
                                  boi_token_id=v["<start_of_image>"], eoi_token_id=v["<end_of_image>"])
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)  # tied: the encoder's and decoder's embeddings too
    settings = {"max_denoising_steps": max_denoising_steps, "stability_threshold": 0, "confidence_threshold": 0.3}
    model.generation_config = DiffusionGemmaGenerationConfig(
        **(DiffusionGemmaGenerationConfig._get_default_generation_params() | settings | generation),
        eos_token_id=[tok.eos_token_id, v[TURN_END]], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=max(total // shards + 1, 1) if shards > 1 else "50GB")
    tok.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random DiffusionGemma checkpoint.")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_checkpoint(a.out, a.seed))


if __name__ == "__main__":
    main()
