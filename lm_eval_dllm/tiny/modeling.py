"""A small bidirectional transformer trained with the masked-diffusion objective.

It is a plain transformers `PreTrainedModel`, so it loads with `AutoModel.from_pretrained`
through the path any remote-code dLLM takes; `forward(input_ids, attention_mask)` returns
logits aligned with positions (logit at i predicts token i), as LLaDA's do.

Positions are counted from each row's first real token (cumsum of the attention mask), so a
left-padded row sees the same positions as the same row alone: batch result = single-row result.
Positions are learned absolute embeddings by default; `pos_encoding="rope"` switches to rotary
embeddings and `"both"` uses both (rotary attention on top of absolute embeddings). The bundled
model uses both: the rotary part learns position-relative lookups (the operands a result depends
on sit at fixed offsets before it) much faster than absolute embeddings alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


POS_ENCODINGS = ("absolute", "rope", "both")
KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, T, Dh) keys (after RoPE) and values of one block


@dataclass
class TinyDLLMOutput(MaskedLMOutput):
    kv: list[KV] | None = None  # return_kv=True: each block's keys/values of the span


class TinyDLLMConfig(PretrainedConfig):
    model_type = "tiny_dllm"

    def __init__(
        self,
        vocab_size: int = 128,
        d_model: int = 192,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 768,
        max_position: int = 256,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        init_std: float = 0.02,
        rope_theta: float = 10000.0,
        pos_encoding: str = "absolute",  # absolute (learned embeddings) | rope (rotary) | both
        dllm_gen_length: int = 48,
        dllm_block: int = 8,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.max_position = max_position
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        self.rope_theta = rope_theta
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding={pos_encoding!r}; valid: {', '.join(POS_ENCODINGS)}")
        self.pos_encoding = pos_encoding
        # defaults the `dllm` lm-eval model reads when model_args and the task set none
        self.dllm_gen_length = dllm_gen_length
        self.dllm_block = dllm_block
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim; x (B, H, T, Dh), cos/sin (B, 1, T, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over the unmasked keys; q, k, v (B, H, T, Dh), key_mask (B, 1, 1, T)."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    s = s.masked_fill(~key_mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The same function, fused where that is faster. Under bf16 on CPU PyTorch's fused kernel
    (flash attention) is several times slower than the written-out form at these sizes, most of
    all in its backward, which made it the largest single cost of a pretraining step."""
    if q.is_cpu and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        return explicit_attention(q, k, v, key_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


class Block(nn.Module):
    def __init__(self, cfg: TinyDLLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, cos, sin,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kv = (k, v)
        if past is not None:  # keys/values of other positions, in the order `key_mask` describes
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, Tk, Dh)
        a = attention(q, k, v, key_mask)  # bidirectional
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ff(self.ln2(x)), kv


class TinyDLLMModel(PreTrainedModel):
    config_class = TinyDLLMConfig
    base_model_prefix = "tiny_dllm"
    _no_split_modules = ["Block"]

    def __init__(self, config: TinyDLLMConfig):
        super().__init__(config)
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding in ("absolute", "both"):
            self.pos = nn.Embedding(config.max_position, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def inv_freq(self, device) -> torch.Tensor:
        # computed, not a buffer: from_pretrained leaves non-persistent buffers uninitialised
        dh = self.config.d_model // self.config.n_heads
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float32, device=device) / dh))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_kv: list[KV] | None = None,
        return_kv: bool = False,
        out_from: int = 0,
        **kwargs,
    ) -> TinyDLLMOutput:
        """attention_mask (B, Tpast + T) covers past_kv's positions, then the span's (as
        lm_eval_dllm.models.transformer's forward; the KV cache of lm_eval_dllm.cache uses both).
        Logits of the span's columns from out_from only."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if position_ids is None:  # (B, T) counted from each row's first real token
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        if int(position_ids.max()) >= self.config.max_position:
            raise ValueError(
                f"sequence needs position {int(position_ids.max())} but this model has "
                f"max_position={self.config.max_position}"
            )
        x = self.tok(input_ids)  # (B, T, D)
        if self.config.pos_encoding in ("absolute", "both"):
            x = x + self.pos(position_ids)
        if self.config.pos_encoding == "absolute":
            position_ids = torch.zeros_like(position_ids)  # RoPE at angle 0 is the identity
        ang = position_ids.float()[:, None, :, None] * self.inv_freq(x.device)  # (B, 1, T, Dh/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, Tpast + T)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, key_mask, cos, sin, None if past_kv is None else past_kv[i])
            if return_kv:
                kvs.append(kv)
        return TinyDLLMOutput(logits=self.head(self.ln_f(x[:, out_from:])), kv=kvs if return_kv else None)  # (B, T - out_from, V)
