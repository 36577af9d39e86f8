"""Differential testing: run only the calls in the sandbox, compare the results outside (as EvalPlus).

    checks = split_asserts(["assert add(1, 2) == 3"])      # None: these tests cannot be split
    passes_split(code, checks, timeout_s=5, memory_mb=512)  # True only if add(1, 2) returns 3

A test `assert f(ARGS) == EXPECTED` whose arguments and expected value are plain data (literals,
arithmetic on them) is split in two: the sandbox gets the program and the calls `f(ARGS)` and writes
one record per call, `repr((i, "ok", value))`, to a pipe; the trusted side parses each record with
`ast.literal_eval` and compares it with EXPECTED, which never enters the sandbox. So nothing inside
the sandbox can prove a pass — a pass needs the right values — and an object whose `__eq__` is always
true cannot come back at all (only plain data parses). Records must be exactly one per call, in
order: anything else (a missing, extra or unparsable line) fails the sample.

Forms understood (E: plain data; C: a call of the function under test with plain-data arguments,
optionally wrapped in one of WRAPS, applied outside): `C == E`, `E == C`, `C != E`, `C is E`,
`C is not E`, `C`, `not C`, `abs(C - E) < T` and `<= T`. Any other statement in the tests (a loop,
a helper, a random input) leaves the whole task to `code_passes`'s other path: the tests run beside
the program, in a sandboxed process it can neither read nor trace, calling its functions through
literal-only proxies (`run_python(trusted=...)`).

    python -m lm_eval_dllm.tasks.code_share   # rewrites docs/code_scoring.md: how many tasks split
"""

from __future__ import annotations

import ast
import builtins
import functools
import logging
import operator
from dataclasses import dataclass

from .sandbox import SandboxUnavailable, run_python

log = logging.getLogger(__name__)

WRAPS = {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset, "sorted": sorted}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_,
            ast.IsNot: operator.is_not, ast.Lt: operator.lt, ast.LtE: operator.le}
RESULTS_ENV = "LM_EVAL_DLLM_RESULTS_FD"  # tells the driver which descriptor takes its records
RECORDS_CAP = 1 << 20  # bytes of records (and of output) a split run may return: large answers fit
_UNSPLIT = (SyntaxError, ValueError, TypeError, ArithmeticError, MemoryError, RecursionError)

# Appended to the program: calls each function and writes one record per call. It runs with the
# candidate, so it proves nothing; the trusted side trusts only the data it parses.
_DRIVER = '''

def _lm_eval_dllm_drive(calls):
    import os
    fd = int(os.environ["{env}"])
    for i, (name, args, kwargs) in enumerate(calls):
        try:
            line = repr((i, "ok", globals()[name](*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the call did not return
            line = repr((i, "raise", type(e).__name__))
        data = line.encode("utf-8", "backslashreplace") + b"\\n"
        while data:
            data = data[os.write(fd, data):]


_lm_eval_dllm_drive({calls!r})
'''


class NotSplit(Exception):
    """This test is not a call with plain-data inputs and a plain-data expectation."""


@dataclass(frozen=True)
class Check:
    """One split assert: call fn(*args, **kwargs) inside; outside, `op(wrap(output), expected)`."""
    fn: str
    args: tuple
    kwargs: tuple[tuple[str, object], ...]
    op: str = "=="              # ==, !=, is, is not, <, <= (on abs(output - expected)), truthy, falsy
    expected: object = None
    wrap: str = ""              # a name in WRAPS applied to the output outside, or ""
    expected_first: bool = False  # `E == C`: E's __eq__ is asked first, as in the original
    tol: float = 0.0

    def holds(self, output: object) -> bool:
        """Does the parsed output satisfy this assert? Never raises."""
        try:
            out = WRAPS[self.wrap](output) if self.wrap else output
            if self.op == "truthy":
                return bool(out)
            if self.op == "falsy":
                return not out
            if self.tol:
                return _COMPARE[_OP_NODES[self.op]](abs(out - self.expected), self.tol)
            a, b = (self.expected, out) if self.expected_first else (out, self.expected)
            return bool(_COMPARE[_OP_NODES[self.op]](a, b))
        except Exception:  # noqa: BLE001 - a wrong type, a deep structure: the assert fails
            return False


_OP_NODES = {"==": ast.Eq, "!=": ast.NotEq, "is": ast.Is, "is not": ast.IsNot, "<": ast.Lt, "<=": ast.LtE}
_OP_NAMES = {v: k for k, v in _OP_NODES.items()}


def value(node: ast.AST) -> object:
    """The plain-data value of an expression: literals, containers, + - * / // % ** on them, WRAPS
    calls."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = value(node.left), value(node.right)
        if isinstance(node.op, ast.Pow) and not (isinstance(right, int) and abs(right) <= 64):
            raise NotSplit("a large power")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [value(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {value(k): value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](value(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in WRAPS
            and len(node.args) == 1 and not node.keywords):
        return WRAPS[node.func.id](value(node.args[0]))
    raise NotSplit(ast.unparse(node)[:60])


def _data(node: ast.AST) -> object:
    """value(node), which must also survive repr -> literal_eval unchanged (it is sent as source)."""
    v = value(node)
    try:
        if ast.literal_eval(repr(v)) == v:
            return v
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    raise NotSplit(f"{v!r:.60} is not plain data")


def _call(node: ast.AST, names: dict[str, str] | None) -> dict:
    """Check's fn, args, kwargs and wrap for `f(ARGS)` or `wrap(f(ARGS))`; NotSplit otherwise."""
    wrap = ""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in WRAPS
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Call)):
        wrap, node = node.func.id, node.args[0]
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise NotSplit("not a call")
    name = node.func.id
    fn = names.get(name) if names is not None else (
        None if name in WRAPS or hasattr(builtins, name) else name)
    if fn is None or any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords):
        raise NotSplit(f"a call of {name}")
    args = tuple(_data(a) for a in node.args)
    kwargs = tuple((k.arg, _data(k.value)) for k in node.keywords)
    return {"fn": fn, "args": args, "kwargs": kwargs, "wrap": wrap}


def split_assert(test: ast.expr, names: dict[str, str] | None) -> Check | None:
    """The Check of `assert test`; None for an assert that always holds; NotSplit otherwise."""
    if isinstance(test, ast.Constant):
        if test.value:
            return None
        raise NotSplit("an assert that always fails")
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return Check(**_call(test.operand, names), op="falsy")
    if not isinstance(test, ast.Compare):
        return Check(**_call(test, names), op="truthy")
    if len(test.ops) != 1 or type(test.ops[0]) not in _OP_NAMES:
        raise NotSplit("a chained or unknown comparison")
    op, left, right = _OP_NAMES[type(test.ops[0])], test.left, test.comparators[0]
    if op in ("<", "<="):  # abs(C - E) < T
        if not (isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id == "abs"
                and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp)
                and isinstance(left.args[0].op, ast.Sub)):
            raise NotSplit("an ordering comparison")
        tol = value(right)
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise NotSplit("a tolerance that is not a positive number")
        return Check(**_call(left.args[0].left, names), op=op, expected=value(left.args[0].right), tol=tol)
    try:
        return Check(**_call(left, names), op=op, expected=value(right))
    except NotSplit:
        return Check(**_call(right, names), op=op, expected=value(left), expected_first=True)


def split_asserts(lines: list[str], names: dict[str, str] | None = None) -> list[Check] | None:
    """MBPP-style tests (one statement each). names: allowed callee -> function (None: any name
    that is not a builtin). None when any statement cannot be split."""
    try:
        stmts = [s for line in lines for s in ast.parse(line).body]
        return _split_body(stmts, names)
    except (NotSplit, *_UNSPLIT):
        return None


def _split_body(stmts: list[ast.stmt], names: dict[str, str] | None) -> list[Check]:
    checks = []
    for s in stmts:
        if isinstance(s, ast.Assert):
            check = split_assert(s.test, names)
            checks += [check] if check is not None else []
        elif not (isinstance(s, (ast.Pass, ast.Import, ast.ImportFrom))
                  or isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            raise NotSplit(type(s).__name__)
    if not checks:
        raise NotSplit("no test")
    return checks


def split_check_function(test: str, entry_point: str) -> list[Check] | None:
    """HumanEval-style tests: `def check(candidate): assert ...` (plus constants and imports at the
    top). None when anything in them cannot be split."""
    try:
        checks = None
        for s in ast.parse(test).body:
            if isinstance(s, ast.FunctionDef) and s.name == "check" and len(s.args.args) == 1:
                checks = _split_body(s.body, {s.args.args[0].arg: entry_point})
            elif not (isinstance(s, (ast.Import, ast.ImportFrom))
                      or isinstance(s, ast.Assign) and _is_data(s.value)
                      or isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
                raise NotSplit(type(s).__name__)
        return checks
    except (NotSplit, *_UNSPLIT):
        return None


def _is_data(node: ast.AST) -> bool:
    try:
        value(node)
        return True
    except (NotSplit, *_UNSPLIT):
        return False


def proxied(tests: str) -> str:
    """`tests` preceded by `f = _proxy('f')` for each function they call but do not define (nor
    import, nor find among the builtins): the functions of the program under test."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:  # they fail where they run, as they would anywhere
        return tests
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    defined |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    free = sorted(called - defined - set(dir(builtins)))
    return "".join(f"{name} = _proxy({name!r})\n" for name in free) + tests


def driver(checks: list[Check]) -> str:
    """Python source to append to the program: makes each call and writes its record."""
    calls = [(c.fn, c.args, dict(c.kwargs)) for c in checks]
    return _DRIVER.format(env=RESULTS_ENV, calls=calls)


def judge(checks: list[Check], records: str) -> bool:
    """Exactly one well-formed `(i, "ok", value)` line per check, in order, each satisfying it."""
    lines = records.split("\n")
    if lines[-1] != "" or len(lines) - 1 != len(checks):
        return False
    for i, (check, line) in enumerate(zip(checks, lines)):
        try:
            rec = ast.literal_eval(line)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
        if not (type(rec) is tuple and len(rec) == 3 and type(rec[0]) is int and rec[0] == i
                and rec[1] == "ok" and check.holds(rec[2])):
            return False
    return True


def code_passes(code: str, checks: list[Check] | None, tests: str, *, timeout_s: float,
                memory_mb: int) -> bool:
    """Does `code` pass: by its checks where its tests split, else by `tests` run beside it in the
    sandbox, in a process the code cannot read (`run_python(trusted=...)`; they call the code's
    functions through `_proxy(name)`). A failure of the scorer itself (not of the code) scores
    False, says why once, and lets the run go on; only SandboxUnavailable (nothing can run) stops it."""
    try:
        if checks is not None:
            return passes_split(code, checks, timeout_s=timeout_s, memory_mb=memory_mb)
        res = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, trusted=tests)
        return res.results == "pass\n"
    except SandboxUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - one sample's scorer failing must not end a run
        _scorer_failed(f"{type(e).__name__}: {e}"[:300])
        return False


@functools.lru_cache(maxsize=256)
def _scorer_failed(why: str) -> None:
    log.warning("code scorer failed, the sample scores 0 (said once per reason): %s", why)


def passes_split(code: str, checks: list[Check], *, timeout_s: float, memory_mb: int) -> bool:
    """Run `code` plus the calls in the sandbox; judge their records here."""
    res = run_python(code + driver(checks), timeout_s=timeout_s, memory_mb=memory_mb,
                     results_env=RESULTS_ENV, max_output_bytes=RECORDS_CAP)
    return judge(checks, res.results)
