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

`arch=dit_hidden` is the paper's `DiTHiddenStatePolicy` (`DiTHiddenNet`): the dLLM's last hidden states
(after its final norm) instead of the probabilities, through one extra LLaDA block shaped like the
dLLM's own (`dllm_arch`: width, heads, feed-forward, RoPE base, ...; the paper builds it from the
LLaDA config), with scale-and-shift adaLN before the block and after it (no modulation inside the
block, whose code is LLaDA's). Same conditioning, same smart_init (the adaLN linears zeroed).

Both networks condition on one vector per position (`Conditioned.condition`): mask-bit embedding +
time MLP, plus, where a caller passes it, `extra`, a (*B, h) embedding of a per-row setting summed in
the same way: an alpha-conditioned policy (`policy.DiTPolicy` with alpha_range) passes its alpha embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.transformer import ACTIVATIONS, ArchConfig, RMSNorm, rope_tables
from .models.transformer import rotate as rotate_half_pairs
from .utils import DLLMError


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


class Conditioned(nn.Module):
    """What both paper networks share: the adaLN conditioning (`time_mlp`, `mask_embedding`, the
    paper's names) and its one vector per position."""

    def _conditioning(self, hidden: int, time_embed_dim: int, time_period: float) -> None:
        self.hidden, self.time_embed_dim, self.time_period = hidden, time_embed_dim, time_period
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.mask_embedding = nn.Embedding(2, hidden)

    def condition(self, m: torch.Tensor, timestep: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(*B, L, h) adaLN conditioning: mask-bit embedding + time MLP, + `extra` (*B, h) when given:
        an embedding of another per-row setting, broadcast over the positions as the time is."""
        mask = self.mask_embedding(m.int())  # (*B, L, h)
        time = time_embedding(timestep, self.time_embed_dim, self.time_period).to(mask.dtype)  # (*B, 1, e)
        cond = mask + self.time_mlp(time.expand(*m.shape, -1))
        return cond if extra is None else cond + extra.to(cond.dtype).unsqueeze(-2)


class DiTConfidenceNet(Conditioned):
    """m (*B, L) 1 = masked, c (*B, L, top_p) probabilities, timestep (*B, 1) -> (*B, L) logits."""

    def __init__(self, hidden: int = 128, ff: int = 512, heads: int = 2, layers: int = 1, top_p: int = 1,
                 time_embed_dim: int = 128, time_period: float = 1.0, smart_init: float | None = -2.0,
                 dropout: float = 0.0):
        super().__init__()
        self._conditioning(hidden, time_embed_dim, time_period)
        self.confidence_proj = nn.Linear(top_p, hidden)
        self.transformer_blocks = nn.ModuleList(RoPEDiTBlock(hidden, ff, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, 1)
        if smart_init is not None:
            with torch.no_grad():
                for blk in self.transformer_blocks:
                    blk.ada_conditioning.weight.zero_()
                    blk.ada_conditioning.bias.zero_()
                self.output_proj.bias.fill_(smart_init)

    def forward(self, m: torch.Tensor, c: torch.Tensor, timestep: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        *B, L, _ = c.shape
        cond = self.condition(m, timestep, extra).reshape(-1, L, self.hidden)
        x = self.confidence_proj(c.to(self.confidence_proj.weight.dtype)).reshape(-1, L, self.hidden)
        for blk in self.transformer_blocks:
            x = blk(x, cond)
        return self.output_proj(self.final_norm(x)).squeeze(-1).view(*B, L)


# dit_hidden: the settings of the dLLM that shape its extra block (transformer.ArchConfig's names)
DLLM_ARCH_KEYS = ("d_model", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "norm_eps", "qkv_bias", "out_bias",
                  "mlp_bias", "norm_bias", "act", "rope_fp32")


def block_arch(dllm_arch: dict) -> ArchConfig:
    """The extra block's ArchConfig from a policy's `dllm_arch`; a missing, unknown or unusable entry
    is a one-line error."""
    missing = [k for k in DLLM_ARCH_KEYS if k not in dllm_arch]
    unknown = sorted(set(dllm_arch) - set(DLLM_ARCH_KEYS))
    if missing or unknown:
        raise DLLMError(f"policy dllm_arch {'lacks ' + repr(missing[0]) if missing else 'has ' + repr(unknown[0])}; "
                        f"valid: the entries {', '.join(DLLM_ARCH_KEYS)}")
    a = ArchConfig(vocab_size=0, n_layers=1, **dllm_arch)
    sizes = (a.d_model, a.n_heads, a.n_kv_heads, a.d_ff)
    if (any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes)
            or a.d_model % a.n_heads or a.n_heads % a.n_kv_heads or a.head_dim % 2):
        raise DLLMError(f"policy dllm_arch d_model={a.d_model!r}, n_heads={a.n_heads!r}, n_kv_heads={a.n_kv_heads!r}, "
                        f"d_ff={a.d_ff!r}; valid: whole numbers >= 1, n_kv_heads dividing n_heads dividing d_model "
                        f"into heads of even width")
    if a.act not in ACTIVATIONS:
        raise DLLMError(f"policy dllm_arch act={a.act!r}; valid: {', '.join(ACTIVATIONS)}")
    return a


class LLaDABlock(nn.Module):
    """One LLaDA ("llama") block, as the paper's DiTHiddenStatePolicy builds it from the dLLM's config
    (`LLaDABlock.build`), with LLaDA's parameter names: RMSNorm, bidirectional attention with RoPE
    over the policy's n positions (0 .. n - 1; no mask, as there), SwiGLU feed-forward. Its numerics
    are our LLaDA's (models/transformer.py, tested against the official code)."""

    def __init__(self, c: ArchConfig):
        super().__init__()
        self.c = c
        d, dkv = c.d_model, c.n_kv_heads * c.head_dim
        self.attn_norm = RMSNorm(d, c.norm_eps, c.norm_bias)
        self.q_proj = nn.Linear(d, d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, dkv, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, dkv, bias=c.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=c.out_bias)
        self.ff_norm = RMSNorm(d, c.norm_eps, c.norm_bias)
        self.ff_proj = nn.Linear(d, c.d_ff, bias=c.mlp_bias)  # the gate
        self.up_proj = nn.Linear(d, c.d_ff, bias=c.mlp_bias)
        self.ff_out = nn.Linear(c.d_ff, d, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, -1, c.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope_tables(torch.arange(T, device=x.device)[None], c.head_dim, c.rope_theta)
        if c.rope_fp32:
            q, k = (rotate_half_pairs(t.float(), cos, sin).to(t.dtype) for t in (q, k))
        else:
            q, k = (rotate_half_pairs(t, cos.to(t.dtype), sin.to(t.dtype)) for t in (q, k))
        if c.n_kv_heads != c.n_heads:
            k, v = (t.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, D))
        h = self.ff_norm(x)
        return x + self.ff_out(ACTIVATIONS[c.act](self.ff_proj(h)) * self.up_proj(h))


class DiTHiddenNet(Conditioned):
    """m (*B, L) 1 = masked, hidden_states (*B, L, D) the dLLM's last, timestep (*B, 1) -> (*B, L) logits:
    per block, scale-and-shift adaLN of a LayerNorm then the block; the same once more after the last
    block; one logit per position (the paper's DiTHiddenStatePolicy, its names)."""

    def __init__(self, arch: ArchConfig, layers: int = 1, time_embed_dim: int = 128, time_period: float = 1.0,
                 smart_init: float | None = -2.0):
        super().__init__()
        h = arch.d_model
        self._conditioning(h, time_embed_dim, time_period)
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(layers + 1))
        self.ada_linears = nn.ModuleList(nn.Linear(h, 2 * h) for _ in range(layers + 1))
        self.transformer_blocks = nn.ModuleList(LLaDABlock(arch) for _ in range(layers))
        self.output_proj = nn.Linear(h, 1)
        if smart_init is not None:
            with torch.no_grad():
                for lin in self.ada_linears:
                    lin.weight.zero_()
                    lin.bias.zero_()
                self.output_proj.bias.fill_(smart_init)

    def forward(self, m: torch.Tensor, hidden_states: torch.Tensor, timestep: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        *B, L, D = hidden_states.shape
        if D != self.hidden:
            raise DLLMError(f"policy arch dit_hidden was made for a dLLM of hidden size {self.hidden}, given "
                            f"hidden states of size {D}; valid: the model it was made (or trained) for")
        cond = self.condition(m, timestep, extra).reshape(-1, L, self.hidden)
        x = hidden_states.to(self.output_proj.weight.dtype).reshape(-1, L, D)
        for i, blk in enumerate(self.transformer_blocks):
            scale, shift = self.ada_linears[i](cond).chunk(2, dim=-1)
            x = blk(self.norms[i](x) * (1 + scale) + shift)
        scale, shift = self.ada_linears[-1](cond).chunk(2, dim=-1)
        x = self.norms[-1](x) * (1 + scale) + shift
        return self.output_proj(x).squeeze(-1).view(*B, L)


def dllm_arch_of(model) -> dict:
    """The `dllm_arch` of a loaded dLLM that exposes its hidden states: a native model's own settings,
    or, for the bundled model (LayerNorm, GELU, biases: no LLaDA block), an LLaDA block of its width,
    heads and feed-forward size with LLaDA's defaults for the rest."""
    from .models import NativeDLLM  # here, not at the top: the models import nothing of the policies
    from .tiny import TinyDLLMModel

    if isinstance(model, NativeDLLM):
        return {k: getattr(model.config, k) for k in DLLM_ARCH_KEYS}
    if isinstance(model, TinyDLLMModel):
        return tiny_arch(model.config.to_dict())
    raise DLLMError(f"policy arch dit_hidden reads the dLLM's hidden states, which {type(model).__name__} does "
                    f"not expose here; valid: a native model (impl=native) or the bundled model")


def tiny_arch(cfg: dict) -> dict:
    """The bundled architecture's config.json -> the dllm_arch of its extra block (see dllm_arch_of)."""
    d = int(cfg.get("d_model", 192))
    return {"d_model": d, "n_heads": int(cfg.get("n_heads", 4)), "n_kv_heads": int(cfg.get("n_heads", 4)),
            "d_ff": int(cfg.get("d_ff", 4 * d)), "rope_theta": float(cfg.get("rope_theta", 10000.0)),
            "norm_eps": 1e-5, "qkv_bias": False, "out_bias": False, "mlp_bias": False, "norm_bias": False,
            "act": "silu", "rope_fp32": True}


def dllm_arch_of_config(cfg: dict) -> dict:
    """The `dllm_arch` of a checkpoint's config.json (a native family's, or the bundled model's)."""
    from .models import native_family
    from .tiny import TinyDLLMConfig

    if str(cfg.get("model_type", "")).lower() == TinyDLLMConfig.model_type:
        return tiny_arch(cfg)
    fam = native_family(cfg)
    if fam is None:
        raise DLLMError(f"a dLLM config of model_type {cfg.get('model_type')!r} has no native implementation "
                        f"here, so its hidden states and block shape are unknown; valid: a LLaDA (or other "
                        f"native family's) config.json, or the bundled model's")
    a = fam.arch_config(cfg)
    return {k: getattr(a, k) for k in DLLM_ARCH_KEYS}
