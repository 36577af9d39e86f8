"""The bidirectional Llama-style transformer that LLaDA and Dream both are, written once.

    python -m pytest -q tests/test_native_models.py      # compared with the official code

LLaDA-8B and Dream-7B differ only in settings (biases, where RoPE runs, tied embeddings, ...),
which `ArchConfig` holds, and in the names of their weights, which each family's module maps.
Every block is: x + attn(norm(x)), then x + down(act(gate(norm(x))) * up(norm(x))). Attention is
bidirectional (no causal mask) through PyTorch SDPA, with padded keys masked out. The MoE families
(LLaDA-MoE, LLaDA2) add settings: per-head RMSNorm of queries and keys, RoPE on part of each head,
a fused q/k/v projection, and a sparse MLP (`MoE`: routed experts plus an optional shared one)
in place of the dense one.

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
ROUTERS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoE:
    """A sparse MLP: each token runs `top_k` of `n_experts` gated MLPs, weighted by the router.

    softmax (OLMoE, LLaDA-MoE): weights are the top-k of softmax(router logits) (+ expert_bias),
    not renormalised. sigmoid (LLaDA2): scores sigmoid(logits) in float32; experts are chosen by
    score + expert_bias among the `topk_group` best of `n_group` groups (a group's worth: its two
    best scores); weights are the chosen scores renormalised (top_k > 1) times `scale`."""
    n_experts: int
    top_k: int
    d_expert: int
    d_shared: int = 0  # hidden size of the shared expert every token runs; 0: none
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    expert_bias: bool = False  # a stored (E,) bias added to the routing scores


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
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (weights of size Dh)
    rotary_dim: int = 0  # RoPE on the first rotary_dim dims of each head; 0: all of them
    fused_qkv: bool = False  # one projection `qkv` whose output is [q heads, k heads, v heads]
    moe: MoE | None = None  # a sparse MLP in every layer not listed in dense_layers
    dense_layers: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim


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
    """x (B, H, T, Dh): pairs (i, i + R/2) of the first R = cos.shape[-1] dims rotated by the
    position's angle; the rest pass unchanged."""
    R = cos.shape[-1]
    xr, rest = x[..., :R], x[..., R:]
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases (an expert)."""

    def __init__(self, d: int, d_ff: int, act: str):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ACTIVATIONS[self.act](self.gate(x)) * self.up(x))


class SparseMLP(nn.Module):
    """The `MoE` MLP (see its docstring); tokens run only their chosen experts."""

    def __init__(self, d: int, m: MoE, act: str):
        super().__init__()
        self.m = m
        self.router = nn.Linear(d, m.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d, m.d_expert, act) for _ in range(m.n_experts))
        self.shared = MLP(d, m.d_shared, act) if m.d_shared else None
        if m.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(m.n_experts))
        else:
            self.expert_bias = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, D) -> chosen experts (N, k) and their weights (N, k)."""
        m = self.m
        if m.router == "softmax":
            w = F.softmax(self.router(h), dim=1, dtype=torch.float)  # (N, E)
            if self.expert_bias is not None:
                w = w + self.expert_bias
            w, idx = torch.topk(w, m.top_k, dim=-1)
            return idx, w.to(h.dtype)
        scores = torch.sigmoid(F.linear(h.float(), self.router.weight.float()))  # (N, E)
        biased = scores + self.expert_bias if self.expert_bias is not None else scores
        groups = biased.view(len(h), m.n_group, -1).topk(2, dim=-1)[0].sum(-1)  # (N, G)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(m.topk_group, dim=-1)[1], 1)
        keep = keep.bool()[..., None].expand(-1, -1, m.n_experts // m.n_group).reshape(len(h), -1)
        idx = biased.masked_fill(~keep, float("-inf")).topk(m.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if m.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * m.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = x.reshape(-1, D)  # (N, D)
        idx, w = self.route(h)
        out = torch.zeros(h.shape, dtype=w.dtype, device=h.device)  # (N, D)
        for e in idx.unique().tolist():  # only the experts some token chose
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.experts[e](h[tok]).to(w.dtype) * w[tok, slot, None])
        out = out.to(x.dtype).view(B, T, D)
        return out + self.shared(x) if self.shared is not None else out


class Block(nn.Module):
    def __init__(self, c: ArchConfig, sparse: bool = False):
        super().__init__()
        self.c = c
        dkv = c.n_kv_heads * c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        if c.fused_qkv:
            self.qkv = nn.Linear(c.d_model, c.d_model + 2 * dkv, bias=c.qkv_bias)
        else:
            self.q = nn.Linear(c.d_model, c.d_model, bias=c.qkv_bias)
            self.k = nn.Linear(c.d_model, dkv, bias=c.qkv_bias)
            self.v = nn.Linear(c.d_model, dkv, bias=c.qkv_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps, False)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps, False)
        self.o = nn.Linear(c.d_model, c.d_model, bias=c.out_bias)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        if sparse:
            self.moe = SparseMLP(c.d_model, c.moe, c.act)
        else:
            self.gate = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
            self.up = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
            self.down = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, Dh), k, v (B, Hkv, T, Dh) of the normed input h (B, T, D)."""
        c = self.c
        B, T, _ = h.shape
        if c.fused_qkv:
            q, k, v = self.qkv(h).view(B, T, -1, c.head_dim).split(
                [c.n_heads, c.n_kv_heads, c.n_kv_heads], dim=2)
        else:
            q, k, v = (p(h).view(B, T, -1, c.head_dim) for p in (self.q, self.k, self.v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(h)
        return self.down(ACTIVATIONS[self.c.act](self.gate(h)) * self.up(h))

    def forward(self, x, cos, sin, key_mask, past: KV | None) -> tuple[torch.Tensor, KV]:
        c = self.c
        B, T, _ = x.shape
        q, k, v = self.project(self.attn_norm(x))
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
        return x + self.mlp(self.mlp_norm(x)), kv


class NativeDLLM(nn.Module):
    """A masked diffusion LM of the LLaDA / Dream architecture; logits as the family emits them
    (Dream's are shifted one position, which the FamilySpec says)."""

    def __init__(self, c: ArchConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, c.moe is not None and i not in c.dense_layers)
                                    for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps, c.norm_bias)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, past_kv: list[KV] | None = None,
                return_kv: bool = False, block: int = 0,
                out_from: int = 0) -> tuple[torch.Tensor, list[KV] | None]:
        """ids, positions (B, T); attn (B, Tpast + T), 1 for real keys, 0 for padding.
        block > 0: block-diagonal-causal attention (LLaDA2), a span position sees the span's keys
        of its own and earlier blocks of `block` positions (counted from position 0), and every
        real past key (a cache hands in finished earlier blocks only).
        Returns logits (B, T - out_from, V) of the span's columns from out_from (the output layer
        is the costliest: 126k floats per position for LLaDA) and, with return_kv, each layer's
        (keys, values) of the span."""
        c = self.config
        if positions is None:  # counted from each row's first real token: left padding is harmless
            positions = (attn.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:] if attn is not None \
                else torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        key_mask = None  # (B, 1, 1 or T, Tk) bool; None lets SDPA take its fastest kernel
        if attn is not None and not bool(attn.all()):
            key_mask = attn.bool()[:, None, None, :]
        if block:
            n_past = past_kv[0][0].shape[2] if past_kv else 0
            blk = positions // block  # (B, T)
            own = blk[:, None, None, :] <= blk[:, None, :, None]  # (B, 1, T, T) key block <= query's
            within = torch.cat([own.new_ones(own.shape[:3] + (n_past,)), own], dim=-1)  # (B, 1, T, Tk)
            key_mask = within if key_mask is None else within & key_mask
        cos, sin = rope_tables(positions, c.rope_dim, c.rope_theta)
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
