"""The unmasking policy network: one transformer block over per-position features of the canvas.

Input per position (all L generated positions, so the policy sees the whole canvas): the features
named in `PolicyConfig.features` — mask bit, in-current-block bit, the dLLM's top-1 confidence,
top-1 minus top-2 margin, entropy, relative position, and `left`: the share of the L generated
positions to its left that are still masked (0 when everything before it is committed; it lets the
policy hold a token back until what it depends on is known, which one attention layer over mask bits
and positions learns only slowly); and, not in the default set, its local forms over the NEAR
positions just before it: `near`, the share of them still masked, and `near_conf`, the lowest
confidence among those still masked (1 when none is). Conditioning on the diffusion time t (the
fraction still masked) through adaLN, as in DiT. Output: one logit per position; the action is a
Bernoulli per eligible (masked, in-block) position. The output bias starts at -2 ("slow start":
few commits per step until training finds it pays to commit more).

That is `arch=features`, the default. `arch=dit_confidence` is the paper's own network
(`policy_dit.py`) with its own inputs: the top-`top_p` token probabilities and the mask bit of the
current block (the whole generated region with `full_context`), time = decode steps taken / L.
`arch=dit_hidden` is the paper's other network: the same, but it reads the dLLM's last hidden states
(StepState.hidden) through one extra LLaDA block shaped like the dLLM (`dllm_arch`).
With `alpha_range` (train.grpo --alpha-range) any arch also takes the reward's NFE-discount exponent
alpha as an input, embedded into the same adaLN conditioning as the time (`AlphaEmbed`): one policy
for the whole accuracy-speed curve, the point on it chosen at evaluation (`sampler=learned,alpha=A`).
Every arch answers `inputs(step)` (a StepState, or a stack of StepRecords: the tensors its forward
takes) and `forward(*inputs) -> (b, L)` logits over the generated region.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import policies

from .plackett_luce import pl_logprob
from .policy_dit import DiTConfidenceNet, DiTHiddenNet, block_arch
from .utils import DLLMError, atomic_write, atomic_write_json, check_safetensors

log = logging.getLogger(__name__)

DEFAULT_FEATURES = ("mask", "eligible", "conf", "margin", "entropy", "pos", "left")
ALL_FEATURES = DEFAULT_FEATURES + ("near", "near_conf")
NEAR = 8  # the window of `near` and `near_conf`: the generated positions just before a position
SAMPLINGS = ("bernoulli", "pl")
ARCHS = ("features", "dit_confidence", "dit_hidden")
DIT_ARCHS = ("dit_confidence", "dit_hidden")  # the paper's: inputs of the current block or all, time = steps / L


@dataclass
class PolicyConfig:
    features: tuple = DEFAULT_FEATURES
    hidden: int = 128
    ff: int = 512
    heads: int = 2
    layers: int = 1
    init_bias: float = -2.0
    # start: "slow" = the paper's output bias init_bias; "threshold" = a linear skip path that starts
    # as Fast-dLLM's threshold rule at init_tau (commit p ~ sigmoid(init_sharpness * (conf - tau))),
    # so that early rollouts are already mostly correct and GRPO has reward differences to learn from
    init: str = "slow"
    init_tau: float = 0.9
    init_sharpness: float = 20.0
    # with feature near_conf, the threshold start holds a token back while what sits just before it is
    # masked and unsure: commit p ~ sigmoid(init_sharpness * (conf - tau + init_near_conf * (near_conf - 1)));
    # alpha-conditioned, the term fades to nothing at the top of alpha_range (UnmaskPolicy.start_near_conf)
    init_near_conf: float = 0.0
    # the block gate (arch features; 0: none): where the policy would commit every eligible position, the
    # block ends with this step as it decides; else it commits only where also conf >= gate_hi, since the
    # block takes another forward anyway and what it holds back then costs none (UnmaskPolicy.gated)
    gate_hi: float = 0.0
    # the linear skip path's output is multiplied by this fixed gain, so its weights live on the
    # features' own scale and Adam (whose step is ~lr per weight, whatever the weight's size) moves
    # every feature's contribution at the same rate; 1.0 = no gain (policies written before it)
    skip_gain: float = 1.0
    # how training sampled actions from the logits: "bernoulli" (one coin per position) or "pl"
    # (Plackett-Luce: a forced first pick, then picks in order until a STOP item of utility
    # stop_logit); it sets the policy's default evaluation mode
    sampling: str = "bernoulli"
    stop_logit: float = 0.0
    # the network: "features" (ours, above) or "dit_confidence" (the paper's; policy_dit.py), which
    # reads the top_p most likely tokens' probabilities, of the current block unless full_context
    # (the paper's default), with its time embedding's width and period, smart_init the output
    # bias it starts with (None: PyTorch's init), and dropout in training; or "dit_hidden" (the
    # paper's other), which reads the dLLM's last hidden states through `layers` LLaDA blocks shaped
    # by dllm_arch (policy_dit.DLLM_ARCH_KEYS: the dLLM's width, heads, ...; its hidden, heads and ff
    # are the dLLM's, set from it; empty only until the model is known, e.g. when flags are checked)
    arch: str = "features"
    top_p: int = 1
    full_context: bool = True
    time_embed_dim: int = 128
    time_period: float = 1.0
    smart_init: float | None = -2.0
    dropout: float = 0.0
    dllm_arch: dict = field(default_factory=dict)
    # alpha-conditioned (train.grpo --alpha-range): [lo, hi], the NFE-discount exponents it was trained
    # over; the policy then takes alpha as an input (`alpha_code`, embedded into the adaLN conditioning
    # as the time is, and for arch features also scaling a second linear path from the features, whose
    # bias starts at alpha_shift: a larger alpha starts as a lower threshold). None: one alpha, no input
    alpha_range: list | None = None
    alpha_shift: float = 0.15
    # what it was trained for; used to pick a policy and to warn on mismatched use
    base_model: str = ""
    task: str = ""
    block: int = 0
    gen_length: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.features = tuple(self.features)
        self._check_numbers()
        bad = [f for f in self.features if f not in ALL_FEATURES]
        if bad:
            raise DLLMError(f"unknown policy feature {bad[0]!r}; valid: {', '.join(ALL_FEATURES)}")
        if self.init not in ("slow", "threshold"):
            raise DLLMError(f"policy init {self.init!r}; valid: slow, threshold")
        if not self.skip_gain > 0:
            raise DLLMError(f"policy skip_gain={self.skip_gain}; valid: a number > 0")
        if self.sampling not in SAMPLINGS:
            raise DLLMError(f"policy sampling {self.sampling!r}; valid: {', '.join(SAMPLINGS)}")
        if self.arch not in ARCHS:
            raise DLLMError(f"policy arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.arch == "dit_hidden" and self.dllm_arch:
            a = block_arch(self.dllm_arch)
            self.hidden, self.heads, self.ff = a.d_model, a.n_heads, a.d_ff
        elif self.dllm_arch:
            raise DLLMError(f"policy dllm_arch given for arch {self.arch!r}; valid: arch dit_hidden, or no dllm_arch")
        if self.top_p < 1 or self.time_embed_dim < 1:
            raise DLLMError(f"policy top_p={self.top_p}, time_embed_dim={self.time_embed_dim}; "
                            f"valid: whole numbers >= 1")
        if self.init == "threshold" and self.arch in DIT_ARCHS:
            raise DLLMError(f"policy init 'threshold' with arch {self.arch!r}; valid: init slow (the paper's "
                            f"networks start from smart_init) or arch features")
        if self.alpha_range is not None:
            r = self.alpha_range
            ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r)
            if not ok or not 0 < r[0] < r[1]:
                raise DLLMError(f"policy alpha_range={r!r}; valid: [lo, hi] with 0 < lo < hi, or null")
            self.alpha_range = [float(r[0]), float(r[1])]
        if self.init == "threshold" and "conf" not in self.features:
            raise DLLMError("policy init 'threshold' needs the 'conf' feature; valid: add conf to features")

    def _check_numbers(self) -> None:
        """Sizes are positive whole numbers (heads dividing hidden), the rest finite: a hand-edited
        or damaged card fails here, in one line, before any weights are read."""
        for name in ("hidden", "ff", "heads", "layers", "block", "gen_length"):
            v, lo = getattr(self, name), 0 if name in ("block", "gen_length") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise DLLMError(f"policy {name}={v!r}; valid: a whole number >= {lo}")
        if self.hidden % self.heads:
            raise DLLMError(f"policy heads={self.heads} does not divide hidden={self.hidden}; valid: a "
                            f"divisor of {self.hidden}")
        for name in ("init_bias", "init_tau", "init_sharpness", "skip_gain", "stop_logit", "time_period", "dropout",
                     "alpha_shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DLLMError(f"policy {name}={v!r}; valid: a finite number")
        if self.smart_init is not None and (isinstance(self.smart_init, bool) or not isinstance(
                self.smart_init, (int, float)) or not math.isfinite(self.smart_init)):
            raise DLLMError(f"policy smart_init={self.smart_init!r}; valid: a finite number, or null")
        if not 0 < self.init_tau <= 1:
            raise DLLMError(f"policy init_tau={self.init_tau}; valid: a number in (0, 1]")
        if isinstance(self.init_near_conf, bool) or not isinstance(self.init_near_conf, (int, float)) or not (
                0 <= self.init_near_conf < math.inf):
            raise DLLMError(f"policy init_near_conf={self.init_near_conf!r}; valid: a finite number >= 0")
        if self.init_near_conf and (self.arch != "features" or "near_conf" not in self.features):
            raise DLLMError(f"policy init_near_conf={self.init_near_conf} without the near_conf feature; valid: "
                            f"features that include near_conf (arch features), or init_near_conf 0")
        if isinstance(self.gate_hi, bool) or not isinstance(self.gate_hi, (int, float)) or not 0 <= self.gate_hi <= 1:
            raise DLLMError(f"policy gate_hi={self.gate_hi!r}; valid: a number in (0, 1], or 0 for no gate")
        if self.gate_hi and (self.arch != "features" or not {"conf", "eligible"} <= set(self.features)):
            raise DLLMError(f"policy gate_hi={self.gate_hi} needs arch features with the conf and eligible features; "
                            f"valid: such a policy, or gate_hi 0")


def build_features(names, conf, margin, entropy, masked, eligible) -> torch.Tensor:
    """(b, L, F) float features; every input is (b, L)."""
    b, L = conf.shape
    cols = {
        "mask": lambda: masked.float(),
        "eligible": lambda: eligible.float(),
        "conf": lambda: conf.float(),
        "margin": lambda: margin.float(),
        "entropy": lambda: entropy.float() / math.log(2.0) / 8.0,  # bits, roughly in [0, 1]
        "pos": lambda: torch.arange(L, device=conf.device).float().div(max(L - 1, 1)).expand(b, L),
        "left": lambda: (masked.float().cumsum(-1) - masked.float()) / L,  # masked positions before i, / L
        "near": lambda: _before(masked.float(), 0.0).mean(-1),
        "near_conf": lambda: torch.where(_before(masked, False), _before(conf.float(), 1.0), 1.0).amin(-1),
    }
    return torch.stack([cols[n]() for n in names], dim=-1)


def _before(x: torch.Tensor, pad) -> torch.Tensor:
    """(b, L) -> (b, L, NEAR): for each position the NEAR values just before it, `pad` before the start."""
    return F.pad(x, (NEAR, 0), value=pad)[:, :-1].unfold(-1, NEAR, 1)


def _sinusoid(L: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(L, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(L, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe  # (L, dim)


def alpha_code(alpha: torch.Tensor) -> torch.Tensor:
    """(b,) the policy's alpha input: log2(alpha) / 4, so alpha = 1 is 0 (a policy trained at one alpha,
    warm-started from, is unchanged there) and the shipped policies' 1/16 .. 2048 is -1 .. 2.75."""
    return torch.log2(alpha.float().clamp_min(1e-6)) / 4


def _fourier(x: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(b,) -> (b, 2n): sin and cos of x * 2^k * pi / 2, k < n (the time and alpha embeddings' input)."""
    f = x.float()[:, None] * (2.0 ** torch.arange(n, device=x.device, dtype=torch.float32))[None, :] * (math.pi / 2)
    return torch.cat([f.sin(), f.cos()], dim=-1)


class AlphaEmbed(nn.Module):
    """alpha -> (b, h), added to the adaLN conditioning vector; its last layer starts at zero, so a fresh
    alpha input changes nothing until training finds a use for it."""

    def __init__(self, h: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, h), nn.SiLU(), nn.Linear(h, h))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        return self.net(_fourier(alpha_code(alpha)))


class AdaLNBlock(nn.Module):
    def __init__(self, h: int, ff: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(h, elementwise_affine=False)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ff = nn.Sequential(nn.Linear(h, ff), nn.GELU(), nn.Linear(ff, h))
        self.mod = nn.Linear(h, 6 * h)  # shift, scale, gate for attention and feed-forward
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, L, h = x.shape
        s1, m1, g1, s2, m2, g2 = self.mod(c)[:, None, :].chunk(6, dim=-1)  # each (b, 1, h)
        y = self.ln1(x) * (1 + m1) + s1
        q, k, v = self.qkv(y).view(b, L, 3, self.heads, h // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + (1 + g1) * self.proj(a.transpose(1, 2).reshape(b, L, h))
        y = self.ln2(x) * (1 + m2) + s2
        return x + (1 + g2) * self.ff(y)


class Policy(nn.Module):
    """What every arch shares: its config, its card, step logits on the policy's device, its files."""

    cfg: PolicyConfig
    card: dict | None = None  # set by load: the card of the folder it came from
    top_probs = 0  # how many of each position's most likely tokens' probabilities it reads (StepState.top)
    reads_hidden = False  # whether it reads the dLLM's last hidden states (StepState.hidden)

    def inputs(self, s) -> tuple:
        raise NotImplementedError

    @property
    def alpha_conditioned(self) -> bool:
        return self.cfg.alpha_range is not None

    def full_inputs(self, s, alpha=None) -> tuple:
        """`inputs(s)`, plus the alpha column (b,) for an alpha-conditioned policy: `alpha` a number or
        one per row of `s`. A policy of one alpha takes none."""
        inp = self.inputs(s)
        if not self.alpha_conditioned:
            if alpha is not None:
                raise DLLMError(f"alpha={alpha!r} for a policy trained at one alpha; valid: an alpha-conditioned "
                                f"policy (train.grpo --alpha-range), or no alpha")
            return inp
        if alpha is None:
            raise DLLMError(f"this policy is alpha-conditioned (trained over alpha {self.cfg.alpha_range}); "
                            f"valid: an alpha in that range")
        b = s.masked.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float32, device=s.masked.device).reshape(-1)
        return (*inp, a.expand(b) if a.numel() == 1 else a)

    def step_logits(self, s, alpha=None) -> torch.Tensor:
        """(b, L) logits for one step or a stack of steps `s` (at `alpha`, for an alpha-conditioned
        policy), computed on the policy's device and in its dtype (a step's statistics may be float64:
        compat=fast-dllm)."""
        p = next(self.parameters())
        cast = lambda a: a.to(p.device, p.dtype) if a.is_floating_point() else a.to(p.device)  # noqa: E731
        return self(*(cast(a) if isinstance(a, torch.Tensor) else a for a in self.full_inputs(s, alpha)))

    def save(self, directory: str | Path, card: dict | None = None) -> None:
        d = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(d / "policy.safetensors", lambda tmp: save_file(state, tmp))
        atomic_write_json(d / "policy.json", {"config": asdict(self.cfg), "card": card or {}})

    @classmethod
    def load(cls, directory: str | Path, device="cpu") -> "Policy":
        d = Path(directory)
        if not (d / "policy.json").exists():
            raise DLLMError(f"policy {str(directory)!r} has no policy.json; valid: a folder written "
                            f"by `python -m train.grpo` (policy.json + policy.safetensors)")
        redo = "a folder written by `python -m train.grpo`; retrain or re-copy it"
        try:
            meta = json.loads((d / "policy.json").read_text())
            for key in ("config", "card"):
                if not isinstance(meta.get(key, {}), dict):
                    raise TypeError(f"its {key} is {type(meta[key]).__name__}, not an object")
            pol = build_policy(PolicyConfig(**meta["config"]))
        except DLLMError as e:  # a value PolicyConfig refuses: its own one line, with the file
            raise DLLMError(f"{d / 'policy.json'}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DLLMError(f"{d / 'policy.json'} is not a policy card ({type(e).__name__}: "
                            f"{str(e)[:100]}); valid: {redo}") from None
        check_safetensors(d / "policy.safetensors", remedy=redo)
        try:
            pol.load_state_dict(load_file(str(d / "policy.safetensors"), device=str(device)))
        except RuntimeError as e:  # names or shapes that do not match policy.json's config
            first = str(e).strip().splitlines()[-1].strip()[:160]
            raise DLLMError(f"{d / 'policy.safetensors'} does not match {d / 'policy.json'} "
                            f"({first}); valid: {redo}") from None
        pol.card = meta.get("card", {})
        return pol.to(device).eval()


class UnmaskPolicy(Policy):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.inp = nn.Linear(len(cfg.features), h)
        self.time = nn.Sequential(nn.Linear(16, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(AdaLNBlock(h, cfg.ff, cfg.heads) for _ in range(cfg.layers))
        self.out_ln = nn.LayerNorm(h)
        self.out = nn.Linear(h, 1)
        nn.init.normal_(self.out.weight, std=0.01)  # small but non-zero: gradients reach every layer
        nn.init.constant_(self.out.bias, cfg.init_bias)
        self.skip = nn.Linear(len(cfg.features), 1)  # a linear path from the features to the logit
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)
        if cfg.init == "threshold":  # gain * (w . f + b) = sharpness * (conf - tau) - init_bias
            with torch.no_grad():
                self.skip.weight[0, cfg.features.index("conf")] = cfg.init_sharpness / cfg.skip_gain
                self.skip.bias.fill_((-cfg.init_sharpness * cfg.init_tau - cfg.init_bias) / cfg.skip_gain)
        if cfg.alpha_range is not None:
            self.alpha_embed = AlphaEmbed(h)
            # gain * alpha_code * (w . f + b): starts as a threshold lowered by alpha_shift * alpha_code / sharpness
            self.alpha_skip = nn.Linear(len(cfg.features), 1)
            nn.init.zeros_(self.alpha_skip.weight)
            nn.init.constant_(self.alpha_skip.bias, cfg.alpha_shift)
        if cfg.init == "threshold":
            self.start_near_conf()

    @torch.no_grad()
    def start_near_conf(self, fade: bool = True) -> None:
        """Add init_near_conf * (near_conf - 1), times the threshold start's sharpness, to the linear path
        (nothing when it is 0): the threshold start's dependency term, also given to a policy whose
        features gain near_conf (train.grpo --init-from). An alpha-conditioned policy's alpha path fades
        the term linearly in log alpha, from its full weight at alpha 1 to none at the top of the range:
        the term costs forwards, and the top of the range is where they cost the most (`fade` False:
        the full term at every alpha, which benchmarks.dependency_start compares)."""
        cfg = self.cfg
        if cfg.init_near_conf:
            i, w = cfg.features.index("near_conf"), cfg.init_sharpness * cfg.init_near_conf / cfg.skip_gain
            self.skip.weight[0, i] += w
            self.skip.bias -= w
            top = alpha_code(torch.tensor([float(cfg.alpha_range[1])])).item() if cfg.alpha_range else 0.0
            if fade and top > 0:  # (a range that ends at or below alpha 1 keeps the full term)
                self.alpha_skip.weight[0, i] -= w / top
                self.alpha_skip.bias += w / top

    def forward(self, feats: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """feats (b, L, F), t (b,) in [0, 1], alpha (b,) for an alpha-conditioned policy -> logits (b, L)."""
        b, L, _ = feats.shape
        x = self.inp(feats) + _sinusoid(L, self.cfg.hidden, feats.device)[None]  # (b, L, h)
        freqs = torch.arange(8, device=t.device, dtype=torch.float32)
        tt = t.float()[:, None] * (2.0 ** freqs)[None, :] * math.pi  # (b, 8)
        c = self.time(torch.cat([tt.sin(), tt.cos()], dim=-1))  # (b, h)
        skip = self.skip(feats)
        if self.cfg.alpha_range is not None:
            c = c + self.alpha_embed(alpha).to(c.dtype)
            skip = skip + alpha_code(alpha).to(skip.dtype)[:, None, None] * self.alpha_skip(feats)
        for blk in self.blocks:
            x = blk(x, c)
        logits = (self.out(self.out_ln(x)) + self.cfg.skip_gain * skip).squeeze(-1)  # (b, L)
        return self.gated(logits, feats) if self.cfg.gate_hi else logits

    def gated(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The block gate: min(logit, max(the lowest eligible logit, sharpness * (conf - gate_hi))). Where
        every eligible logit is >= 0 the block ends as the policy decides; else a position is committed
        (logit >= 0) only if its own logit and conf - gate_hi both are. A held token costs a forward
        only when it is the block's one reason to take another step; once it takes one anyway, holding
        more back is free, which the threshold rule (and a policy that decides position by position)
        does not use. A row with no eligible position keeps its logits."""
        f = self.cfg.features
        eligible = feats[..., f.index("eligible")] > 0.5
        lowest = torch.where(eligible, logits, torch.inf).amin(-1, keepdim=True)  # (b, 1)
        sure = self.cfg.init_sharpness * (feats[..., f.index("conf")] - self.cfg.gate_hi)
        return torch.minimum(logits, torch.maximum(lowest, sure.to(logits.dtype)))

    def inputs(self, s) -> tuple:
        """(features (b, L, F), t (b,)): t is the fraction of the canvas still masked."""
        feats = build_features(self.cfg.features, s.conf, s.margin, s.entropy, s.masked, s.eligible)
        return feats, s.masked.float().mean(-1)

    def logits_for(self, conf, margin, entropy, masked, eligible, alpha=None) -> torch.Tensor:
        return self(*self.full_inputs(SimpleNamespace(conf=conf, margin=margin, entropy=entropy, masked=masked,
                                                      eligible=eligible), alpha))


class DiTPolicy(Policy):
    """arch=dit_confidence / dit_hidden: the paper's DiTConfidencePolicy / DiTHiddenStatePolicy
    (policy_dit, held as `base_policy` so the paper's checkpoint keys load as they are) with the
    paper's inputs. The two differ only in what each position brings: its top_p probabilities, or
    the dLLM's last hidden state there."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "dit_hidden":
            if not cfg.dllm_arch:
                raise DLLMError("policy arch dit_hidden needs dllm_arch, the dLLM's block settings; valid: a "
                                "policy made for a model (train.grpo, policies.import_paper --dllm-config)")
            self.reads_hidden = True
            self.base_policy = DiTHiddenNet(block_arch(cfg.dllm_arch), cfg.layers, cfg.time_embed_dim,
                                            cfg.time_period, cfg.smart_init)
        else:
            self.top_probs = cfg.top_p
            self.base_policy = DiTConfidenceNet(cfg.hidden, cfg.ff, cfg.heads, cfg.layers, cfg.top_p,
                                                cfg.time_embed_dim, cfg.time_period, cfg.smart_init, cfg.dropout)
        if cfg.alpha_range is not None:  # through the paper's conditioning seam (Conditioned.condition's extra)
            self.alpha_embed = AlphaEmbed(self.base_policy.hidden)

    def inputs(self, s) -> tuple:
        """(m, x, timestep, eligible, start): the mask bit (b, n) and what each position brings (b, n, p):
        its top_p probabilities or the dLLM's hidden state, of the n positions the policy sees (the
        block at `s.block_start`, of `s.block_size`; all L with full_context), time = steps taken / L
        (b, 1); eligible (b, L) and start (b,) place the logits."""
        if self.reads_hidden:
            x = getattr(s, "hidden", None)
            if x is None or getattr(s, "steps", None) is None:
                raise DLLMError("policy arch dit_hidden needs the dLLM's last hidden states per position and the "
                                "steps taken; valid: a step of decode.diffuse on a model that exposes them "
                                "(StepState.hidden, .steps)")
        else:
            x = getattr(s, "top", None)
            if x is None or x.shape[-1] < self.cfg.top_p or getattr(s, "steps", None) is None:
                raise DLLMError(f"policy arch dit_confidence needs the top {self.cfg.top_p} token probabilities per "
                                f"position and the steps taken; valid: a step of decode.diffuse (StepState.top, .steps)")
            x = x[..., :self.cfg.top_p]
        b, L = s.masked.shape
        timestep = s.steps.float()[:, None] * (1 / L)  # as the paper: steps_taken * (1 / L)
        start = torch.as_tensor(s.block_start, device=s.masked.device).expand(b)
        if self.cfg.full_context:
            return s.masked, x, timestep, s.eligible, start
        idx = start[:, None] + torch.arange(s.block_size, device=start.device)  # (b, n)
        return (s.masked.gather(1, idx), x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])),
                timestep, s.eligible, start)

    def forward(self, m, x, timestep, eligible, start, alpha=None) -> torch.Tensor:
        extra = self.alpha_embed(alpha) if self.cfg.alpha_range is not None else None
        logits = self.base_policy(m, x, timestep, extra)  # (b, n)
        if logits.shape[1] == eligible.shape[1]:
            return logits
        idx = start[:, None] + torch.arange(logits.shape[1], device=logits.device)
        return torch.zeros(eligible.shape, dtype=logits.dtype, device=logits.device).scatter(1, idx, logits)


NETWORK = {"features": ("arch", "features", "hidden", "ff", "heads", "layers", "skip_gain"),
           "dit_confidence": ("arch", "hidden", "ff", "heads", "layers", "top_p", "full_context",
                              "time_embed_dim", "time_period"),
           "dit_hidden": ("arch", "dllm_arch", "layers", "full_context", "time_embed_dim", "time_period")}


def network_diff(have: PolicyConfig, want: PolicyConfig) -> dict:
    """The settings of `want`'s network (NETWORK[want.arch]) that `have` does not share: key -> want's value.
    Equal networks take each other's weights. A dllm_arch `want` does not know yet (empty: no model
    loaded) is not compared."""
    return {k: getattr(want, k) for k in NETWORK[want.arch]
            if getattr(have, k) != getattr(want, k) and not (k == "dllm_arch" and not want.dllm_arch)}


def build_policy(cfg: PolicyConfig) -> Policy:
    """A fresh policy of cfg.arch."""
    return DiTPolicy(cfg) if cfg.arch in DIT_ARCHS else UnmaskPolicy(cfg)


def update_card(directory: str | Path, **entries) -> dict:
    """Set entries of a policy folder's card (policy.json, rewritten atomically); the config and the
    weights stay as they are, and so does the policy's fingerprint (results.grid.policy_fingerprint)."""
    path = Path(directory) / "policy.json"
    try:
        meta = json.loads(path.read_text())
        meta["card"] = {**(meta.get("card") or {}), **entries}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DLLMError(f"{path} is not a policy card ({type(e).__name__}: {str(e)[:100]}); valid: a folder "
                        f"written by `python -m train.grpo`") from None
    atomic_write_json(path, meta)
    return meta["card"]


def bernoulli_logprob(logits: torch.Tensor, action: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(b,) log-probability of `action` under independent Bernoullis on the eligible positions."""
    lp = -F.binary_cross_entropy_with_logits(logits, action.to(logits.dtype), reduction="none")  # (b, L)
    return (lp * eligible.to(logits.dtype)).sum(-1)


def action_logprob(cfg: PolicyConfig, logits: torch.Tensor, action: torch.Tensor,
                   rank: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(b,) log-probability of a step's commits under the policy's own sampling."""
    if cfg.sampling == "pl":
        return pl_logprob(logits, rank, eligible, cfg.stop_logit)
    return bernoulli_logprob(logits, action, eligible)


def find_policy(name: str, *, model_id: str, block: int, gen_length: int) -> Path:
    """The one catalog lookup: a policy folder or shipped name, or ("") the shipped policy for
    this model and block (`policies.resolve_policy`'s rule)."""
    try:
        return policies.resolve_policy(name, model_id=model_id, block=block, gen_length=gen_length)
    except policies.CatalogError as e:
        raise DLLMError(str(e)) from None


def policy_for(name: str, *, model_id: str, block: int, gen_length: int, device) -> Policy:
    """Find and load the policy a learned sampler asked for (`Sampler.wanted_policy`); warns when
    it was trained on another model or block size (transfer)."""
    path = find_policy(name, model_id=model_id, block=block, gen_length=gen_length)
    pol = UnmaskPolicy.load(path, device=device)
    cfg = pol.cfg
    if cfg.base_model and cfg.base_model != model_id:
        log.warning("policy %s was trained on %s, used here with %s (transfer across models)",
                    path, cfg.base_model, model_id)
    if cfg.block and min(cfg.block, cfg.gen_length or cfg.block) != min(block, gen_length):
        log.warning("policy %s was trained with block %d, used here with block %d (transfer "
                    "across block sizes)", path, cfg.block, block)
    return pol


class PolicyLoader:
    """The one way a run gets the policy a sampler wants (`Sampler.wanted_policy`): found, checked
    and loaded by `policy_for` once per (name, block, L). The lm-eval model asks at start-up, so a
    missing or bad policy fails before the weights load, and its `Generator` reuses what it loaded."""

    def __init__(self, model_id: str, device):
        self.model_id, self.device = model_id, device
        self._loaded: dict[tuple[str, int, int], Policy] = {}

    def load(self, sampler, block: int, gen_length: int) -> Policy | None:
        """The policy `sampler` wants at (block, L); None for a sampler that wants none."""
        name = sampler.wanted_policy()
        if name is None:
            return None
        key = (name, block, gen_length)
        if key not in self._loaded:
            self._loaded[key] = policy_for(name, model_id=self.model_id, block=block, gen_length=gen_length,
                                           device=self.device)
        return self._loaded[key]
