"""MATH answer equivalence: lm-eval's verdicts, cheap cases in-process, hard ones bounded in time.

    python -m pytest tests/test_math_check.py -q
"""

from __future__ import annotations

import time

import pytest

from lm_eval_dllm import math_check
from lm_eval_dllm.math_check import is_equiv

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
    (r"\frac12", r"\frac{1}{2}"),          # normalisation alone
    (r"$\boxed{x + 1}$", "1+x"),
    ("1,000", "1000"),
    ("12 \\text{ inches}", "12"),
]
DIFFERENT = [
    (r"\frac{1}{3}", "0.33"),
    (r"2\sqrt{2}", r"\sqrt{2}"),
    (r"\sqrt{2}", "1.41"),
    ("x+1", "x-1"),
    ("3", "4"),
    ("", ""),                               # an empty answer is never right
]
HOSTILE = [
    "10**10**10",
    r"10^{10^{10}}",
    r"2^{2^{2^{2^{2^{100}}}}}",
    "(" * 1000 + "1" + ")" * 1000,
    r"\frac{1}{" * 300 + "2" + "}" * 300,
]


@pytest.mark.parametrize("pred, ref", EQUIVALENT)
def test_equivalent_forms_are_accepted(pred, ref):
    assert is_equiv(pred, ref) and is_equiv(ref, pred)


@pytest.mark.parametrize("pred, ref", DIFFERENT)
def test_wrong_answers_are_rejected(pred, ref):
    assert not is_equiv(pred, ref) and not is_equiv(ref, pred)


@pytest.mark.parametrize("pred, ref", EQUIVALENT + DIFFERENT[:-1])
def test_agrees_with_lm_eval(pred, ref):
    from lm_eval.tasks.minerva_math.utils import is_equiv as lm_eval_is_equiv
    from lm_eval.tasks.minerva_math.utils import normalize_final_answer

    assert is_equiv(pred, ref) == lm_eval_is_equiv(normalize_final_answer(pred),
                                                   normalize_final_answer(ref))


def test_cheap_cases_stay_in_process(monkeypatch):
    def no_worker(*args):
        raise AssertionError("the sympy worker was asked")

    monkeypatch.setattr(math_check._WORKER, "call", no_worker)
    assert is_equiv(r"\frac12", r"\frac{1}{2}") and is_equiv("1,000", "1000") and is_equiv("-07", "-7")
    assert not is_equiv("3", "4") and not is_equiv("x" * (math_check.MAX_CHARS + 1), "x")


@pytest.mark.parametrize("pred", HOSTILE, ids=["pow-tower-py", "pow-tower", "2-tower", "parens-1000",
                                               "frac-300"])
def test_hostile_answers_return_false_within_the_limit(pred):
    math_check.warm_up()  # the worker may be restarting after the previous case; not part of the limit
    limit = 1.0
    start = time.monotonic()
    assert not is_equiv(pred, "2", timeout_s=limit)
    assert time.monotonic() - start < limit + 1.0


def test_worker_recovers_after_a_timeout():
    assert not is_equiv(r"10^{10^{10}}", "7", timeout_s=0.5)
    assert is_equiv(r"2\sqrt{2}", r"\sqrt{8}")  # a fresh worker answers
