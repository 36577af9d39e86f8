"""The paper's policy network, `DiTConfidencePolicy` (apple/ml-rl-dllm), as `arch=dit_confidence`.

    python -m pytest tests/test_paper_policy.py -q     # logits equal the paper's module (fp32)

Per position of the policy's context (the current block, or the whole generated region with
`full_context`): the dLLM's top-`top_p` token probabilities go through one linear embedding; a
RoPE transformer block whose two adaLN modulations (scale, shift, gate each, as DiT's Figure 3) are
conditioned per position on an embedding of the mask bit plus an MLP of a sinusoidal embedding of
the time, steps taken / L; a final LayerNorm and one logit per position. `smart_init` zeroes the
adaLN modulations (identity) and sets the output bias ("slow start").

The parameter and buffer names are the paper's, so its checkpoints load by name
(`policies.import_paper`). Written from the paper's description and its code's behaviour, which
tests compare against; two of its numeric choices are kept on purpose so its checkpoints give its
logits: the time embedding is rounded to bfloat16, and at the default period 1 every frequency is 1
(the embedding is cos t and sin t, each repeated).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t: torch.Tensor, dim: int, period: float) -> torch.Tensor:
    """t (..., 1) -> (..., 1, dim): cosines then sines of t * period**(-i / (dim // 2)), rounded
    to bfloat16 as the paper's code does (then back to float32), zero-padded when dim is odd."""
    half = dim // 2
    log_period = torch.log(torch.tensor(period, dtype=torch.float32, device=t.device))
    freq = torch.exp(-log_period * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[..., None] * freq  # (..., 1, half)
    emb = torch.cat([ang.cos(), ang.sin()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(torch.bfloat16).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on pairs (even, odd) of the head dimension; the rotated halves are
    laid out [first; second]. x (b, L, heads, d), cos/sin (L, 1, d/2)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, even * sin + odd * cos], dim=-1)


class RoPEDiTBlock(nn.Module):
    """Pre-norm attention and GELU feed-forward, each modulated by adaLN from `cond` (b, L, h)."""

    def __init__(self, h: int, ff: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))
        d = h // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        self.linear1 = nn.Linear(h, ff)
        self.linear2 = nn.Linear(ff, h)
        self.ada_conditioning = nn.Linear(h, 6 * h)  # scale, shift, gate for attention and feed-forward
        self.norm1 = nn.LayerNorm(h)
        self.norm2 = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, L, h = x.shape
        g1, s1, a1, g2, s2, a2 = self.ada_conditioning(cond).chunk(6, dim=-1)  # each (b, L, h)
        drop = self.dropout if self.training else 0.0
        y = self.norm1(x) * (1 + g1) + s1
        ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq[None]  # (L, d/2)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (L, 1, d/2)
        q, k, v = (p(y).view(b, L, self.heads, h // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=drop)
        a = self.out_proj(a.transpose(1, 2).reshape(b, L, h)) * (1 + a1)
        x = x + F.dropout(a, drop, self.training)
        y = self.norm2(x) * (1 + g2) + s2
        y = self.linear2(F.dropout(F.gelu(self.linear1(y)), drop, self.training)) * (1 + a2)
        return x + F.dropout(y, drop, self.training)


class DiTConfidenceNet(nn.Module):
    """m (*B, L) 1 = masked, c (*B, L, top_p) probabilities, timestep (*B, 1) -> (*B, L) logits."""

    def __init__(self, hidden: int = 128, ff: int = 512, heads: int = 2, layers: int = 1, top_p: int = 1,
                 time_embed_dim: int = 128, time_period: float = 1.0, smart_init: float | None = -2.0,
                 dropout: float = 0.0):
        super().__init__()
        self.hidden, self.time_embed_dim, self.time_period = hidden, time_embed_dim, time_period
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.confidence_proj = nn.Linear(top_p, hidden)
        self.mask_embedding = nn.Embedding(2, hidden)
        self.transformer_blocks = nn.ModuleList(RoPEDiTBlock(hidden, ff, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, 1)
        if smart_init is not None:
            with torch.no_grad():
                for blk in self.transformer_blocks:
                    blk.ada_conditioning.weight.zero_()
                    blk.ada_conditioning.bias.zero_()
                self.output_proj.bias.fill_(smart_init)

    def condition(self, m: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """(*B, L, h) adaLN conditioning: mask-bit embedding + time MLP. Another per-row scalar (an
        embedding of a target) would be summed in here, as time is."""
        mask = self.mask_embedding(m.int())  # (*B, L, h)
        time = time_embedding(timestep, self.time_embed_dim, self.time_period).to(mask.dtype)  # (*B, 1, e)
        return mask + self.time_mlp(time.expand(*m.shape, -1))

    def forward(self, m: torch.Tensor, c: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        *B, L, _ = c.shape
        cond = self.condition(m, timestep).reshape(-1, L, self.hidden)
        x = self.confidence_proj(c.to(self.confidence_proj.weight.dtype)).reshape(-1, L, self.hidden)
        for blk in self.transformer_blocks:
            x = blk(x, cond)
        return self.output_proj(self.final_norm(x)).squeeze(-1).view(*B, L)
