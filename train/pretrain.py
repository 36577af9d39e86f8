"""Train the bundled tiny dLLM from scratch on the mod-10 chain task (masked-diffusion objective).

    python -m train.pretrain                        # defaults: what the shipped checkpoint is
    python -m train.pretrain --out /tmp/tiny --steps 200 --resume

The loss is LLaDA's: mask each completion token with probability t ~ U(0, 1] (stratified over
the batch), cross-entropy on the masked positions weighted by 1/t. EOS padding after the answer
is part of the completion and gets masked too, so the model learns where answers end. The
prompt is exactly what the lm-eval task `modchain` sends. Training state is checkpointed
atomically every --save-every steps; --resume continues a killed run from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm_eval_dllm.generate import Generator
from lm_eval_dllm.loading import load
from lm_eval_dllm.samplers import make_sampler
from lm_eval_dllm.tasks import modchain
from lm_eval_dllm.tiny import BUNDLED_DIR, BUNDLED_ID, TinyDLLMConfig, TinyDLLMModel, build_char_tokenizer
from lm_eval_dllm.tiny.modeling import POS_ENCODINGS
from lm_eval_dllm.utils import atomic_write, atomic_write_json

from . import crash

log = logging.getLogger("train.pretrain")

GEN_LENGTH = modchain.GEN_LENGTH
SPECIALS = {
    "eos_token": ("<|eos|>", None),
    "pad_token": ("<|eos|>", None),
    "mask_token": ("<|mask|>", None),
    "unk_token": ("<|unk|>", None),
}


@dataclass
class PretrainConfig:
    out: str = str(BUNDLED_DIR)
    steps: int = 2600
    batch_size: int = 128
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 0.01
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    pos_encoding: str = "both"  # absolute | rope | both (see lm_eval_dllm/tiny/modeling.py)
    seed: int = 0
    bf16: bool = True
    save_every: int = 200
    eval_problems: int = 500
    threads: int = 0  # 0: torch's default
    t_min: float = 1e-3  # smallest masking rate; the loss weight 1/t is at most 1/t_min
    init_from: str = ""  # continue training the weights of this checkpoint (fresh optimizer/schedule)


def make_tokenizer():
    return build_char_tokenizer(SPECIALS)


def encode_batch(tok, docs: list[dict], gen_length: int):
    """Left-padded prompt + completion (answer then EOS padding). Returns ids, attn, completion mask."""
    eos = tok.eos_token_id
    prompts = [tok(modchain.prompt(d["question"]))["input_ids"] for d in docs]
    comps = [tok(d["answer"])["input_ids"] for d in docs]
    P = max(map(len, prompts))
    ids, attn, comp = [], [], []
    for p, c in zip(prompts, comps):
        assert len(c) <= gen_length, f"answer of {len(c)} tokens > gen_length {gen_length}"
        pad = P - len(p)
        ids.append([eos] * pad + p + c + [eos] * (gen_length - len(c)))
        attn.append([0] * pad + [1] * (len(p) + gen_length))
        comp.append([0] * (pad + len(p)) + [1] * gen_length)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp, dtype=torch.bool)


def diffusion_loss(model, ids, attn, comp, mask_id: int, gen: torch.Generator, t_min: float = 1e-3) -> torch.Tensor:
    B = ids.shape[0]
    # stratified t in (0, 1]: one draw per stratum, lower variance than iid
    t = (torch.arange(B) + torch.rand(B, generator=gen)) / B
    t = t[torch.randperm(B, generator=gen)].clamp(min=t_min)  # (B,)
    masked = comp & (torch.rand(ids.shape, generator=gen) < t[:, None])  # (B, T)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, attention_mask=attn).logits  # (B, T, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, T)
    return ((ce * masked) / t[:, None]).sum() / comp.sum()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class RunState:
    """What a checkpoint holds and --resume restores: the weights, the optimizer, both random
    generators (questions and masking), the step and the losses so far."""
    model: TinyDLLMModel
    opt: torch.optim.Optimizer
    rng: random.Random  # draws the questions
    gen: torch.Generator  # draws the masking rates and masks
    step: int = 0
    losses: list = field(default_factory=list)

    def save(self, path: Path) -> None:
        st = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.getstate(),
              "gen": self.gen.get_state(), "step": self.step, "losses": self.losses}
        atomic_write(path, lambda tmp: torch.save(st, tmp))

    def load(self, path: Path) -> None:
        st = torch.load(path, weights_only=False)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.rng.setstate(st["rng"])
        self.gen.set_state(st["gen"])
        self.step, self.losses = st["step"], st["losses"]
        log.info("resumed from %s at step %d", path, self.step)


def build_model(cfg: PretrainConfig, tok) -> tuple[TinyDLLMModel, list[str]]:
    """A fresh model of cfg's size (drawn from torch's global generator), or --init-from's weights;
    and the commands of the stages that made those weights (empty for a fresh model)."""
    mconf = TinyDLLMConfig(
        vocab_size=8 * math.ceil((max(tok.get_vocab().values()) + 1) / 8),
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
        max_position=128, mask_token_id=tok.mask_token_id, pos_encoding=cfg.pos_encoding,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dllm_gen_length=GEN_LENGTH,
    )
    model = TinyDLLMModel(mconf)
    stages = []
    if cfg.init_from:
        prev = TinyDLLMModel.from_pretrained(cfg.init_from)
        model.load_state_dict(prev.state_dict())
        prev_card = Path(cfg.init_from) / "card.json"
        if prev_card.exists():
            c = json.loads(prev_card.read_text())
            stages = c.get("stages", [c.get("command")]) if "stages" in c or "command" in c else []
        log.info("initialised from %s", cfg.init_from)
    return model, stages


def sample_docs(rng: random.Random, held_out: set, n: int) -> list[dict]:
    """n training problems (question and answer), none of the held-out questions."""
    docs = []
    while len(docs) < n:
        q = modchain.sample_question(rng)
        if q not in held_out:
            docs.append({"question": q, "answer": modchain.solve(q)})
    return docs


def train_steps(cfg: PretrainConfig, st: RunState, tok, state_path: Path) -> None:
    """Train from st.step to --steps, saving the state every --save-every steps and at the last."""
    held_out = modchain.held_out_questions()
    mask_id = st.model.config.mask_token_id
    st.model.train()
    bar = tqdm(total=cfg.steps, initial=st.step, desc="pretrain", dynamic_ncols=True)
    while st.step < cfg.steps:
        ids, attn, comp = encode_batch(tok, sample_docs(st.rng, held_out, cfg.batch_size), GEN_LENGTH)
        for g in st.opt.param_groups:
            g["lr"] = lr_at(st.step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = diffusion_loss(st.model, ids, attn, comp, mask_id, st.gen, cfg.t_min)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), 1.0)
        st.opt.step()
        st.step += 1
        st.losses.append(round(loss.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(st.losses[-20:]) / len(st.losses[-20:]):.4f}")
        if st.step % cfg.save_every == 0 or st.step == cfg.steps:
            st.save(state_path)
        crash.end_of_step(st.step)
    bar.close()


def save_checkpoint(cfg: PretrainConfig, model: TinyDLLMModel, tok, stages: list[str], facts: dict) -> None:
    """The finished model, its tokenizer and its card in --out: the command that made it, after the
    earlier stages' (--init-from), the config, and `facts` about the run."""
    out = Path(cfg.out)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    command = "python -m train.pretrain " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if k != "out" and v != "")
    card = {"command": command, "stages": [s for s in stages if s] + [command],
            "config": asdict(cfg) | {"out": None}, "gen_length": GEN_LENGTH, "task": "modchain"} | facts
    atomic_write_json(out / "card.json", card)
    log.info("saved %s (loss %.4f, %.1f min)", out, card["final_loss_mean_last_100"], card["train_minutes_this_run"])


def train(cfg: PretrainConfig, resume: bool) -> None:
    """Pretrain (or resume) to --steps, save the checkpoint and its card, and validate it."""
    out = Path(cfg.out)
    state_path = out / "train_state.pt"
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = make_tokenizer()
    model, stages = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    st = RunState(model, opt, random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed))
    if resume and state_path.exists():
        st.load(state_path)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters, vocab %d", n_params / 1e6, model.config.vocab_size)
    t0 = time.time()
    train_steps(cfg, st, tok, state_path)
    save_checkpoint(cfg, model, tok, stages, {
        "parameters": n_params,
        "final_loss_mean_last_100": sum(st.losses[-100:]) / len(st.losses[-100:]),
        "train_minutes_this_run": round((time.time() - t0) / 60, 2)})
    state_path.unlink(missing_ok=True)  # the finished checkpoint supersedes it
    evaluate_checkpoint(out, cfg.eval_problems)


def evaluate_checkpoint(out: Path, n: int) -> dict:
    """Greedy one-token-per-step confidence decoding on n validation problems; adds to the card."""
    model, tok, spec = load(str(out), dtype="float32", device="cpu")
    gen = Generator(model, tok, spec, model_id=BUNDLED_ID, device="cpu")
    docs = modchain.load_split("validation")[:n]
    metrics = {}
    for block in (8, GEN_LENGTH):
        texts, _ = modchain.decode(gen, docs, make_sampler("confidence"), block)
        exact = sum(t == d["answer"] for t, d in zip(texts, docs))
        metrics[f"val_B{block}_exact_text"] = exact / len(docs)
        metrics[f"val_B{block}_final_answer"] = modchain.final_answers_right(texts, docs) / len(docs)
    card_path = out / "card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card["validation"] = {"problems": len(docs), "sampler": "confidence(k=1), greedy"} | metrics
    atomic_write_json(card_path, card)
    log.info("validation: %s", metrics)
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PretrainConfig()
    for k, v in asdict(d).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=v)
        elif k == "pos_encoding":
            p.add_argument(flag, choices=POS_ENCODINGS, default=v)
        else:
            p.add_argument(flag, type=type(v), default=v)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--eval-only", action="store_true", help="only (re)compute the card's validation metrics")
    a = vars(p.parse_args(argv))
    resume, eval_only = a.pop("resume"), a.pop("eval_only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = PretrainConfig(**a)
    if eval_only:
        evaluate_checkpoint(Path(cfg.out), cfg.eval_problems)
    else:
        train(cfg, resume)


if __name__ == "__main__":
    main()
