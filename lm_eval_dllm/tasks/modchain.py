"""The bundled testbed task: mod-10 chain arithmetic, written as GSM8K-format JSONL.

    python -m lm_eval_dllm.tasks.modchain      # rewrites the shipped splits (deterministic)

A question is a chain of single digits and operators, evaluated left to right mod 10 until the
first result 0 (or the end of the chain); the answer shows one step per line and ends in
`#### N`, so lm-eval's gsm8k filters and exact_match score it unchanged:

    question: 3+7*4-2+9*3          answer: 3+7=0\n#### 0
    question: 3+8*4-2+9*3          answer: 3+8=1\n1*4=4\n4-2=2\n2+9=1\n1*3=3\n#### 3

Why this task (facts from a feasibility run, see docs/testbed.md): a 2 M-parameter model learns it on
a laptop CPU in minutes, and the unmasking order matters a lot — every result digit depends on
the line above it, so committing a result in the same step as its input is a typical error.
Where the answer ends (EOS) depends on the computation, not only on the question's length: the
chain has 4-7 operations, but it stops at the first result 0, so an answer has 1-7 lines and a
decoder cannot place the end before it knows the results. Committing the end too early (or too
late) is the typical failure of parallel heuristics at full diffusion, as in the paper.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = {"train": (5_000, 1), "validation": (500, 2), "test": (1_000, 3)}  # size, seed
OPS = "+-*"
MIN_OPS, MAX_OPS = 4, 7
GEN_LENGTH = 48  # completion positions: the longest answer (7 ops) takes exactly 48


def solve(question: str) -> str:
    """The GSM8K-style answer of a chain, e.g. '3+8*4' -> '3+8=1\\n1*4=4\\n#### 4'."""
    acc, lines = int(question[0]), []
    for i in range(1, len(question), 2):
        op, d = question[i], int(question[i + 1])
        new = {"+": acc + d, "-": acc - d, "*": acc * d}[op] % 10
        lines.append(f"{acc}{op}{d}={new}")
        acc = new
        if acc == 0:  # the chain stops at its first result 0
            break
    return "\n".join(lines) + f"\n#### {acc}"


def sample_question(rng: random.Random) -> str:
    n = rng.randint(MIN_OPS, MAX_OPS)
    parts = [str(rng.randrange(10))]
    for _ in range(n):
        parts += [rng.choice(OPS), str(rng.randrange(10))]
    return "".join(parts)


def generate(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct problems from `seed`, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        q = sample_question(rng)
        if q not in seen:
            seen.add(q)
            out.append({"question": q, "answer": solve(q)})
    return out


def split_path(split: str) -> Path:
    return DATA_DIR / f"modchain_{split}.jsonl"


def load_split(split: str) -> list[dict]:
    with open(split_path(split)) as f:
        return [json.loads(line) for line in f]


def held_out_questions() -> set[str]:
    """Questions of the validation and test splits: pretraining and RL never see them."""
    return {d["question"] for s in ("validation", "test") for d in load_split(s)}


def fresh(n: int, seed: int) -> list[dict]:
    """n problems from the same generator that no shipped split holds (seed 0, 4, 5, ...: any seed
    but the splits' own), to check that a choice made on the validation split, or a table read
    from the test split, carries over to problems nobody looked at. (Pretraining draws from the
    same generator, so these may include problems the dLLM saw; so may the train split.)"""
    if seed in {s for _, s in SPLITS.values()}:
        raise ValueError(f"fresh problems with seed {seed}: that is a split's seed; valid: any other")
    return generate(n, seed, exclude={d["question"] for s in SPLITS for d in load_split(s)})


def write_splits() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    # test first, then validation, then train: each split excludes the ones before it
    for split in ("test", "validation", "train"):
        n, seed = SPLITS[split]
        docs = generate(n, seed, exclude=taken)
        taken |= {d["question"] for d in docs}
        with open(split_path(split), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)


def prompt(question: str) -> str:
    """The exact zero-shot prompt the lm-eval task `modchain` builds for a doc (its doc_to_text).

    Shorter than gsm8k's "Question: ...\nAnswer:" because every prompt character costs training
    compute on this CPU; the trailing space makes the longest answer (7 ops) exactly 48 tokens.
    """
    return f"Q: {question}\nA: "


def decode(gen, docs: list[dict], sampler, block: int, batch_size: int = 64,
           stats: list[dict] | None = None) -> tuple[list[str], int]:
    """(completion texts, total NFE) of `docs` through a `generate.Generator`, in batches; each
    problem's seed is its index, so a text does not depend on the batch size. `stats`, if given,
    receives each problem's per-sample statistics (nfe, positions, ...)."""
    texts, nfe = [], 0
    for i in range(0, len(docs), batch_size):
        batch = docs[i:i + batch_size]
        out = gen.generate([prompt(d["question"]) for d in batch], sampler, gen_length=GEN_LENGTH,
                           block=block, seeds=list(range(i, i + len(batch))))
        texts += out.texts
        nfe += sum(st["nfe"] for st in out.stats)
        if stats is not None:
            stats += out.stats
    return texts, nfe


def final_answers_right(texts: list[str], docs: list[dict]) -> int:
    """How many texts end in their problem's final answer (`#### N`, what lm-eval's strict-match reads)."""
    return sum(t.split("#### ")[-1] == d["answer"].split("#### ")[-1] for t, d in zip(texts, docs))


if __name__ == "__main__":
    write_splits()
