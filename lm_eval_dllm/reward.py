"""An lm-eval task as an RL environment: its prompts, and its own scorer as the reward.

The reward of a completion is exactly what evaluation would score: the task's filter pipeline
(e.g. gsm8k's strict-match regex) then its `process_results` metric, so training and evaluation
cannot disagree. The NFE discount of the paper multiplies it:

    r = score * ((L - min(NFE, L) + 1) / L) ** alpha        (alpha = 0: pure accuracy)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from .utils import DLLMError


def _kept_share(nfe: int, gen_length: int) -> float:
    """(L - min(NFE, L) + 1) / L: the base the NFE discount raises to alpha."""
    L = gen_length
    return (L - min(nfe, L) + 1) / L


def nfe_discount(nfe: int, gen_length: int, alpha: float) -> float:
    return _kept_share(nfe, gen_length) ** alpha


def reward(score: float, nfe: int, gen_length: int, alpha: float) -> float:
    """The paper's reward: the task's verdict discounted by the forwards spent (the one formula)."""
    return score * nfe_discount(nfe, gen_length, alpha)


def log_reward(score: float, nfe: int, gen_length: int, alpha: float) -> float:
    """log(reward(...)), -inf for a score of 0: exact where the reward itself underflows (at L = 48,
    NFE 20 and alpha 2048 it is about 1e-450, below float64's smallest number)."""
    if score <= 0:
        return -math.inf
    return math.log(score) + alpha * math.log(_kept_share(nfe, gen_length))


@dataclass
class Prompt:
    doc: dict
    doc_id: int
    context: str
    gen_kwargs: dict


class TaskScorer:
    def __init__(self, task_name: str, *, num_fewshot: int | None = None, chat_template=None,
                 filter_name: str | None = None, metric: str | None = None, task_manager=None):
        tm = task_manager or TaskManager()
        if task_name not in tm.all_tasks:
            raise DLLMError(f"unknown task {task_name!r}; valid: an lm-eval task name, e.g. "
                            f"modchain, gsm8k (see `lm_eval ls tasks`)")
        self.task = tm.load([task_name])["tasks"][task_name]
        self.name = task_name
        if self.task.OUTPUT_TYPE != "generate_until":
            raise DLLMError(f"task {task_name!r} is {self.task.OUTPUT_TYPE}; valid: a generate_until task")
        self.num_fewshot = self.task.config.num_fewshot or 0 if num_fewshot is None else num_fewshot
        self.chat_template = chat_template
        names = [f.name for f in self.task._filters]
        self.filter_name = filter_name or names[0]
        if self.filter_name not in names:
            raise DLLMError(f"task {task_name!r} has no filter {self.filter_name!r}; valid: {', '.join(names)}")
        self.filter = next(f for f in self.task._filters if f.name == self.filter_name)
        metrics = [m["metric"] for m in self.task.config.metric_list or []] or ["exact_match"]
        self.metric = metric or metrics[0]
        self.gen_kwargs = dict(self.task.config.generation_kwargs or {})

    # ------------------------------------------------------------ documents and prompts
    def docs(self, split: str) -> list[dict]:
        t = self.task
        have = {"train": t.has_training_docs(), "validation": t.has_validation_docs(), "test": t.has_test_docs()}
        if not have.get(split):
            raise DLLMError(f"task {self.name!r} has no {split} split; valid: "
                            f"{', '.join(k for k, v in have.items() if v)}")
        return list({"train": t.training_docs, "validation": t.validation_docs, "test": t.test_docs}[split]())

    def prompt(self, doc: dict, doc_id: int) -> Prompt:
        ctx = self.task.fewshot_context(doc, self.num_fewshot, apply_chat_template=self.chat_template is not None,
                                        chat_template=self.chat_template)
        return Prompt(doc=doc, doc_id=doc_id, context=ctx, gen_kwargs=dict(self.gen_kwargs))

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[Prompt]:
        docs = self.docs(split)
        ids = list(range(len(docs)))
        if n is not None and n < len(ids):
            ids = sorted(random.Random(seed).sample(ids, n))
        return [self.prompt(docs[i], i) for i in ids]

    # ------------------------------------------------------------ scoring
    def score(self, doc: dict, text: str) -> float:
        """The task's verdict on one completion (filters, then the metric)."""
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", self.gen_kwargs),
                        idx=0, metadata=(self.name, 0, 1))
        inst.resps = [text]
        self.filter.apply([inst])
        res = self.task.process_results(doc, [inst.filtered_resps[self.filter_name]])
        return float(res[self.metric])

    def reward(self, doc: dict, text: str, nfe: int, gen_length: int, alpha: float) -> float:
        return reward(self.score(doc, text), nfe, gen_length, alpha)
