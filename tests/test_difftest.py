"""Differential testing: which asserts split, and how strictly records are judged (no sandbox needed
except where a test says so)."""

from __future__ import annotations

import pytest

from lm_eval_dllm import difftest, sandbox
from lm_eval_dllm.difftest import Check, judge, split_asserts, split_check_function


def test_assert_forms_split_into_calls_and_expected_values():
    checks = split_asserts(["assert f(1, [2, 3], k='x') == (4, 5 * 2)", "assert 7 == f(-1)",
                            "assert f(0)", "assert not f(2)", "assert f(3) is None",
                            "assert abs(f(1.5) - 2.0 / 3.0) < 1e-6", "assert tuple(f([1])) == (1,)"])
    assert [c.op for c in checks] == ["==", "==", "truthy", "falsy", "is", "<", "=="]
    assert checks[0] == Check("f", (1, [2, 3]), (("k", "x"),), "==", (4, 10))
    assert checks[1].expected_first and checks[1].expected == 7 and checks[1].args == (-1,)
    assert checks[5].expected == 2.0 / 3.0 and checks[5].tol == 1e-6
    assert checks[6].wrap == "tuple"


@pytest.mark.parametrize("lines", [
    ["assert f(1) == 2", "for i in range(3):\n    assert f(i) == i"],   # a loop: not all split
    ["assert f(x) == 2"],                                                # a name, not data
    ["assert f(1) == g(2)"],                                             # a call on both sides
    ["assert len(f(1)) == 2"],                                           # a builtin that is not a wrap
    ["assert 0 < f(1) < 3"],                                             # a chained comparison
    ["x = 1", "assert f(x) == 1"],                                       # set-up code
    ["assert f(1) == float('nan')"],                                     # not plain data
    ["assert f(2 ** 1000) == 1"],                                        # too large a power
])
def test_what_cannot_be_split_is_left_whole(lines):
    assert split_asserts(lines) is None


def test_humaneval_check_functions_split_with_the_entry_point():
    test = ("METADATA = {'author': 'x'}\n\ndef check(candidate):\n    assert candidate(1) == 2\n"
            "    assert True, 'always'\n")
    assert split_check_function(test, "inc") == [Check("inc", (1,), (), "==", 2)]
    helper = test + "    assert candidate(2) == helper(2)\n"
    assert split_check_function(helper, "inc") is None


def test_records_are_judged_strictly():
    checks = [Check("f", (1,), (), "==", 2), Check("f", (2,), (), "truthy")]
    good = "(0, 'ok', 2)\n(1, 'ok', [0])\n"
    assert judge(checks, good)
    for bad in ["(0, 'ok', 2)\n",                                # a record missing
                good + "(1, 'ok', True)\n",                      # an extra guess
                "(0, 'ok', 2)\n(1, 'ok', [0])",                  # an unfinished line
                "(1, 'ok', [0])\n(0, 'ok', 2)\n",                # out of order
                "(0, 'ok', 2.5)\n(1, 'ok', [0])\n",              # a wrong value
                "(0, 'ok', Eq())\n(1, 'ok', 1)\n",               # not plain data
                "(0, 'raise', 'ValueError')\n(1, 'ok', 1)\n",    # the call raised
                "(True, 'ok', 2)\n(1, 'ok', 1)\n",               # index of another type
                "[" * 10_000 + "\n(1, 'ok', 1)\n"]:              # too deep to parse
        assert not judge(checks, bad), bad


def test_tolerance_and_wraps_are_applied_outside():
    close = Check("f", (), (), "<", 2 / 3, tol=1e-6)
    assert close.holds(0.6666667) and not close.holds(0.67) and not close.holds("0.6666667")
    assert Check("f", (), (), "==", (1, 2), wrap="tuple").holds([1, 2])
    assert not Check("f", (), (), "==", (1, 2)).holds([1, 2])  # as in Python: (1, 2) != [1, 2]
    assert Check("f", (), (), "is", True).holds(True) and not Check("f", (), (), "is", True).holds(1)


@pytest.mark.skipif(not sandbox.isolation().sandboxed, reason="no sandbox here")
def test_calls_run_in_the_sandbox_and_are_compared_outside():
    checks = split_asserts(["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"])
    assert difftest.passes_split("def add(a, b):\n    return a + b\n", checks, timeout_s=5, memory_mb=256)
    assert not difftest.passes_split("def add(a, b):\n    return 3\n", checks, timeout_s=5, memory_mb=256)
    program = "def add(a, b):\n    return a + b\n" + difftest.driver(checks)
    assert "'ab'" not in program and " 3" not in program.split("_lm_eval_dllm_drive(")[-1]


def test_docs_share_is_what_the_command_writes(tmp_path):
    from pathlib import Path

    from lm_eval_dllm.tasks import code_share

    code_share.main(["--out", str(tmp_path / "share.md")])
    shipped = Path(code_share.OUT).read_text()
    assert (tmp_path / "share.md").read_text() == shipped and "| HumanEval | 164 |" in shipped
