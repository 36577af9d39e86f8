"""The bundled testbed task: mod-10 chain arithmetic, written as GSM8K-format JSONL.

    python -m lm_eval_dllm.tasks.modchain      # rewrites the shipped splits (deterministic)

A question is a chain of single digits and operators, evaluated left to right mod 10; the answer
shows one step per line and ends in `#### N`, so lm-eval's gsm8k filters and exact_match score it
unchanged:

    question: 3+7*4-2+9*3
    answer:   3+7=0\n0*4=0\n0-2=8\n8+9=7\n7*3=1\n#### 1

Why this task (facts from a feasibility run, see the README): a 2 M-parameter model learns it on
a laptop CPU in minutes, and the unmasking order matters a lot — every result digit depends on
the line above it, so committing a result in the same step as its input is a typical error.
The number of operations varies (4-7), so where the answer ends (EOS) differs between problems.
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
    """The GSM8K-style answer of a chain, e.g. '3+7*4' -> '3+7=0\\n0*4=0\\n#### 0'."""
    acc, lines = int(question[0]), []
    for i in range(1, len(question), 2):
        op, d = question[i], int(question[i + 1])
        new = {"+": acc + d, "-": acc - d, "*": acc * d}[op] % 10
        lines.append(f"{acc}{op}{d}={new}")
        acc = new
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


if __name__ == "__main__":
    write_splits()


def prompt(question: str) -> str:
    """The exact zero-shot prompt the lm-eval task `modchain` builds for a doc (its doc_to_text).

    Shorter than gsm8k's "Question: ...\nAnswer:" because every prompt character costs training
    compute on this CPU; the trailing space makes the longest answer (7 ops) exactly 48 tokens.
    """
    return f"Q: {question}\nA: "
