"""The bidirectional Llama-style transformer that LLaDA and Dream both are, written once.

    python -m pytest -q tests/test_native_models.py      # compared with the official code

LLaDA-8B and Dream-7B differ only in settings (biases, where RoPE runs, tied embeddings, ...),
which `ArchConfig` holds, and in the names of their weights, which `llada.py` and `dream.py` map.
Every block is: x + attn(norm(x)), then x + down(act(gate(norm(x))) * up(norm(x))). Attention is
bidirectional (no causal mask) through PyTorch SDPA, with padded keys masked out.

`forward(ids, attn, positions, past_kv=None, return_kv=False)` runs a span of positions. A cache
can plug in without a rewrite: with return_kv it also returns each layer's (keys, values) of the
span (after RoPE, so they are valid wherever they are reused), and past_kv hands such keys/values
of other positions back in; they are attended to along with the span's own, in the order
[past, span] that `attn` (B, Tpast + T) describes. No cache is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (B, Hkv, T, Dh) keys and values of one layer
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int  # rows of the embedding and of the output layer
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    d_ff: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    out_bias: bool  # attention output projection
    mlp_bias: bool
    norm_bias: bool
    act: str = "silu"
    tie_embeddings: bool = False  # the output layer is the embedding matrix
    rope_fp32: bool = True  # rotate q, k in float32 (LLaDA) or in the model dtype (Dream)
    emb_scale: float = 1.0  # multiplies the embeddings
    logit_scale: float = 1.0  # multiplies the logits

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, scaled in the model dtype: what both official models do
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = self.weight * y
        return y + self.bias if self.bias is not None else y


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, Dh) in float32 for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)  # (Dh/2,)
    ang = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, T, Dh): halves rotate together
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): pairs (i, i + Dh/2) rotated by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c: ArchConfig):
        super().__init__()
        self.c = c
        dkv = c.n_kv_heads * c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        self.q = nn.Linear(c.d_model, c.d_model, bias=c.qkv_bias)
        self.k = nn.Linear(c.d_model, dkv, bias=c.qkv_bias)
        self.v = nn.Linear(c.d_model, dkv, bias=c.qkv_bias)
        self.o = nn.Linear(c.d_model, c.d_model, bias=c.out_bias)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        self.gate = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.up = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x, cos, sin, key_mask, past: KV | None) -> tuple[torch.Tensor, KV]:
        c = self.c
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if c.rope_fp32:
            q, k = rotate(q.float(), cos, sin).to(q.dtype), rotate(k.float(), cos, sin).to(k.dtype)
        else:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, Tk, Dh)
        if c.n_kv_heads != c.n_heads:
            rep = c.n_heads // c.n_kv_heads  # query head i reads key/value head i // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        x = x + self.o(a.transpose(1, 2).reshape(B, T, c.d_model))
        h = self.mlp_norm(x)
        return x + self.down(ACTIVATIONS[c.act](self.gate(h)) * self.up(h)), kv


class NativeDLLM(nn.Module):
    """A masked diffusion LM of the LLaDA / Dream architecture; logits as the family emits them
    (Dream's are shifted one position, which the FamilySpec says)."""

    def __init__(self, c: ArchConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, past_kv: list[KV] | None = None,
                return_kv: bool = False, out_from: int = 0) -> tuple[torch.Tensor, list[KV] | None]:
        """ids, positions (B, T); attn (B, Tpast + T), 1 for real keys, 0 for padding.
        Returns logits (B, T - out_from, V) of the span's columns from out_from (the output layer
        is the costliest: 126k floats per position for LLaDA) and, with return_kv, each layer's
        (keys, values) of the span."""
        c = self.config
        if positions is None:  # counted from each row's first real token: left padding is harmless
            positions = (attn.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:] if attn is not None \
                else torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        key_mask = None  # (B, 1, 1, Tk) bool; None lets SDPA take its fastest kernel
        if attn is not None and not bool(attn.all()):
            key_mask = attn.bool()[:, None, None, :]
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        x = self.embed(ids)  # (B, T, D)
        if c.emb_scale != 1.0:
            x = x * c.emb_scale
        kvs: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, key_mask, None if past_kv is None else past_kv[i])
            if return_kv:
                kvs.append(kv)
        x = self.norm(x[:, out_from:])
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)  # (B, T, V)
        if c.logit_scale != 1.0:
            logits = logits * c.logit_scale
        return logits, (kvs if return_kv else None)
