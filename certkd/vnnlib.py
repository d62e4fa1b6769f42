"""VNN-LIB properties: read the benchmarks' robustness-shaped queries, write certkd's own.

A VNN-LIB file (VNN-COMP 2021-2026) declares inputs ``X_i`` and outputs ``Y_j`` and
asserts the *counterexample*: a box on the inputs and a condition on the outputs. The
reader accepts what the benchmarks use: bounds ``X_i <= c`` / ``X_i >= c``, and linear
output constraints (``<=``, ``>=``, ``<``, ``>``; ``+``, ``-``, ``*`` by a number) under
``and``/``or`` in any nesting. The whole query becomes disjunctive normal form: a list of
``Case`` (an input box and the clauses found with it), each clause ``A y <= b`` (rows
joined by AND, clauses by OR). ``sat`` means some input of a case's box satisfies all rows
of one of its clauses; ``unsat`` means none does.

Strict and non-strict comparisons are read alike (``a < b`` as ``a <= b``): proving
``unsat`` for the closed set also proves it for the open one; a counterexample is
checked against the file's own comparisons.

certkd parses the text itself: the ``vnnlib`` package on PyPI (1.0) reads the VNN-LIB 2.0
syntax only, not the ``(declare-const X_0 Real)`` files the benchmarks ship.
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certkd.errors import CertkdError
from certkd.io import atomic_write_text

__all__ = ["Clause", "Case", "Spec", "parse_vnnlib", "read_vnnlib", "write_vnnlib", "robustness_spec",
           "format_counterexample"]

_VAR = re.compile(r"^([XY])_(\d+)$")
MAX_CASES = 10_000
"""The most (input box, clause) combinations a query may expand to (an AND of ORs multiplies out)."""


@dataclass
class Clause:
    """A conjunction of linear output constraints ``A y <= b`` (``strict[r]``: row r is ``<``)."""

    A: torch.Tensor  # (R, K) float64
    b: torch.Tensor  # (R,) float64
    strict: list[bool] = field(default_factory=list)


@dataclass
class Case:
    """An input box ``lower <= x <= upper`` (flat, float64) and the output clauses asserted with it."""

    lower: torch.Tensor
    upper: torch.Tensor
    clauses: list[Clause]


@dataclass
class Spec:
    """A VNN-LIB query: ``cases`` (OR) over ``num_inputs`` inputs and ``num_outputs`` outputs.

    ``matrix()`` stacks every clause's rows: the specification matrix ``C`` for bound
    propagation, with ``d`` and ``clause_of_row``.
    """

    num_inputs: int
    num_outputs: int
    cases: list[Case]

    def matrix(self, case: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C, d, clause_of_row)`` of one case: rows ``C y <= d``; row r belongs to clause ``clause_of_row[r]``."""
        clauses = self.cases[case].clauses
        if not clauses:
            return (torch.zeros(0, self.num_outputs, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
                    torch.zeros(0, dtype=torch.long))
        c = torch.cat([cl.A for cl in clauses])
        d = torch.cat([cl.b for cl in clauses])
        which = torch.cat([torch.full((len(cl.b),), i, dtype=torch.long) for i, cl in enumerate(clauses)])
        return c, d, which


# --------------------------------------------------------------------------- s-expressions

def _tokens(text: str) -> list[str]:
    text = re.sub(r";[^\n]*", " ", text)
    return text.replace("(", " ( ").replace(")", " ) ").split()


Sexp = str | list["Sexp"]


def _parse_all(tokens: list[str], where: str) -> list[Sexp]:
    out: list[Sexp] = []
    stack: list[list[Sexp]] = []
    for tok in tokens:
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if not stack:
                raise CertkdError(f"{where}: unbalanced ')' in the VNN-LIB text")
            done = stack.pop()
            (stack[-1] if stack else out).append(done)
        else:
            (stack[-1] if stack else out).append(tok)
    if stack:
        raise CertkdError(f"{where}: unbalanced '(' in the VNN-LIB text (the file ends inside an expression)")
    return out


# --------------------------------------------------------------------------- linear terms

Linear = tuple[dict[tuple[str, int], float], float]  # coefficients of (kind, index), constant


def _number(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def _linear(e: Sexp, declared: set[tuple[str, int]], where: str) -> Linear:
    if isinstance(e, str):
        value = _number(e)
        if value is not None:
            return {}, value
        m = _VAR.match(e)
        if not m or (m.group(1), int(m.group(2))) not in declared:
            raise CertkdError(f"{where}: {e!r} is not a declared variable or a number")
        return {(m.group(1), int(m.group(2))): 1.0}, 0.0
    if not e or not isinstance(e[0], str):
        raise CertkdError(f"{where}: cannot read the term {_show(e)}")
    op, args = e[0], [_linear(a, declared, where) for a in e[1:]]
    if op == "+" and args:
        return _combine(args, [1.0] * len(args))
    if op == "-" and len(args) == 1:
        return _combine(args, [-1.0])
    if op == "-" and len(args) >= 2:
        return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
    if op == "*" and len(args) == 2:
        constant = [i for i, (coef, _) in enumerate(args) if not coef]
        if not constant:
            raise CertkdError(f"{where}: a product of two variables is not linear: {_show(e)}")
        k = args[constant[0]][1]
        return _combine([args[1 - constant[0]]], [k])
    raise CertkdError(f"{where}: cannot read the term {_show(e)}")


def _combine(args: list[Linear], weights: list[float]) -> Linear:
    coef: dict[tuple[str, int], float] = {}
    const = 0.0
    for (c, k), w in zip(args, weights, strict=True):
        for var, v in c.items():
            coef[var] = coef.get(var, 0.0) + w * v
        const += w * k
    return coef, const


def _show(e: Sexp) -> str:
    text = e if isinstance(e, str) else "(" + " ".join(_show(a) for a in e) + ")"
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- formulas -> DNF

Atom = tuple[dict[tuple[str, int], float], float, bool]  # sum coef * var + const <= 0 (strict flag)


def _dnf(e: Sexp, declared: set[tuple[str, int]], where: str) -> list[list[Atom]]:
    if isinstance(e, str) or not e or not isinstance(e[0], str):
        raise CertkdError(f"{where}: expected a formula, found {_show(e)}")
    op = e[0]
    if op == "and":
        parts = [_dnf(a, declared, where) for a in e[1:]]
        out: list[list[Atom]] = [[]]
        for part in parts:
            out = [a + b for a in out for b in part]
            if len(out) > MAX_CASES:
                raise CertkdError(f"{where}: the query expands to more than {MAX_CASES} cases")
        return out
    if op == "or":
        return [conj for a in e[1:] for conj in _dnf(a, declared, where)]
    if op in ("<=", ">=", "<", ">") and len(e) >= 3:
        terms = [_linear(a, declared, where) for a in e[1:]]
        atoms = []
        for left, right in itertools.pairwise(terms):  # chained comparisons hold pairwise
            lo, hi = (left, right) if op in ("<=", "<") else (right, left)
            coef, const = _combine([lo, hi], [1.0, -1.0])
            atoms.append(({k: v for k, v in coef.items() if v != 0.0}, const, op in ("<", ">")))
        return [atoms]
    raise CertkdError(f"{where}: unsupported VNN-LIB construct {_show(e)} (certkd reads and/or of <=, >=, <, >)")


def parse_vnnlib(text: str, where: str = "VNN-LIB") -> Spec:
    """Parse VNN-LIB text into a ``Spec`` (module docstring); one ``CertkdError`` sentence on anything else.

    Example
    -------
    >>> spec = parse_vnnlib('''(declare-const X_0 Real)(declare-const Y_0 Real)(declare-const Y_1 Real)
    ... (assert (>= X_0 0.2))(assert (<= X_0 0.4))(assert (>= Y_1 Y_0))''')
    >>> spec.cases[0].clauses[0].A.tolist(), spec.cases[0].clauses[0].b.abs().tolist()
    ([[1.0, -1.0]], [0.0])
    """
    declared: set[tuple[str, int]] = set()
    formula: list[Sexp] = ["and"]
    for e in _parse_all(_tokens(text), where):
        if not isinstance(e, list) or not e or not isinstance(e[0], str):
            raise CertkdError(f"{where}: expected (declare-const ...) or (assert ...), found {_show(e)}")
        if e[0] == "declare-const":
            m = _VAR.match(e[1]) if len(e) == 3 and isinstance(e[1], str) else None
            if m is None or e[2] != "Real":
                raise CertkdError(f"{where}: certkd reads declarations (declare-const X_i Real) and "
                                  f"(declare-const Y_j Real), not {_show(e)}")
            declared.add((m.group(1), int(m.group(2))))
        elif e[0] == "assert" and len(e) == 2:
            formula.append(e[1])
        else:
            raise CertkdError(f"{where}: unsupported VNN-LIB command {_show(e)}")
    n_in = _count(declared, "X", where)
    n_out = _count(declared, "Y", where)
    boxes: dict[tuple[tuple[float, ...], tuple[float, ...]], Case] = {}
    for conj in _dnf(formula, declared, where):
        lower = torch.full((n_in,), -math.inf, dtype=torch.float64)
        upper = torch.full((n_in,), math.inf, dtype=torch.float64)
        rows, rhs, strict = [], [], []
        for coef, const, is_strict in conj:
            kinds = {k for k, _ in coef}
            if kinds == {"X"} and len(coef) == 1:
                ((_, i), v), = coef.items()
                bound = -const / v  # v x + const <= 0
                if v > 0:
                    upper[i] = min(float(upper[i]), bound)
                else:
                    lower[i] = max(float(lower[i]), bound)
            elif kinds == {"Y"}:
                row = torch.zeros(n_out, dtype=torch.float64)
                for (_, j), v in coef.items():
                    row[j] = v
                rows.append(row)
                rhs.append(-const)
                strict.append(is_strict)
            elif not kinds:
                if const > 0 or (is_strict and const == 0):
                    rows = []  # a constant false atom: this conjunction is empty
                    lower[0:1] = math.inf
                    break
            else:
                raise CertkdError(f"{where}: certkd reads input bounds on one X_i and linear constraints on the "
                                  "outputs, not constraints mixing inputs and outputs or several inputs")
        if bool((lower > upper).any()):
            continue  # an empty conjunction
        if not bool(torch.isfinite(lower).all() & torch.isfinite(upper).all()):
            missing = int((~(torch.isfinite(lower) & torch.isfinite(upper))).nonzero()[0])
            raise CertkdError(f"{where}: input X_{missing} has no lower or upper bound: the input region must be "
                              "a box")
        key = (tuple(lower.tolist()), tuple(upper.tolist()))
        case = boxes.setdefault(key, Case(lower, upper, []))
        clause = Clause(torch.stack(rows) if rows else torch.zeros(0, n_out, dtype=torch.float64),
                        torch.tensor(rhs, dtype=torch.float64), strict)
        case.clauses.append(clause)
    if not boxes:
        raise CertkdError(f"{where}: the assertions are contradictory (no input box remains)")
    return Spec(n_in, n_out, list(boxes.values()))


def _count(declared: set[tuple[str, int]], kind: str, where: str) -> int:
    idx = sorted(i for k, i in declared if k == kind)
    if not idx or idx != list(range(len(idx))):
        raise CertkdError(f"{where}: the {kind} variables must be declared as {kind}_0 .. {kind}_n-1")
    return len(idx)


def read_vnnlib(path: str | Path) -> Spec:
    """``parse_vnnlib`` of a ``.vnnlib`` (or ``.vnnlib.gz``) file."""
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode()
    except (OSError, UnicodeDecodeError):
        raise CertkdError(f"{path}: not a VNN-LIB text file") from None
    return parse_vnnlib(text, str(path))


# --------------------------------------------------------------------------- writing

def _num(v: float) -> str:
    return repr(float(v))


def _row_text(row: torch.Tensor, rhs: float) -> str:
    """``(<= lhs rhs)`` for one row; a margin row (one +1, one -1, rhs 0) as ``(>= Y_j Y_y)``."""
    nz = [(j, float(v)) for j, v in enumerate(row.tolist()) if v != 0.0]
    if rhs == 0.0 and len(nz) == 2 and sorted(v for _, v in nz) == [-1.0, 1.0]:
        plus = next(j for j, v in nz if v > 0)
        minus = next(j for j, v in nz if v < 0)
        return f"(>= Y_{minus} Y_{plus})"
    terms = [f"Y_{j}" if v == 1.0 else f"(* {_num(v)} Y_{j})" for j, v in nz]
    lhs = terms[0] if len(terms) == 1 else "(+ " + " ".join(terms) + ")"
    return f"(<= {lhs} {_num(rhs)})"


def format_vnnlib(spec: Spec, comment: str = "") -> str:
    """VNN-LIB text of ``spec`` (one case: asserted box, then an OR of ANDs of the output rows)."""
    if len(spec.cases) != 1:
        raise CertkdError("certkd writes VNN-LIB queries with one input box")
    case = spec.cases[0]
    lines = [f"; {line}" for line in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(spec.num_inputs)] + [""]
    lines += [f"(declare-const Y_{j} Real)" for j in range(spec.num_outputs)] + [""]
    for i in range(spec.num_inputs):
        lines += [f"(assert (>= X_{i} {_num(float(case.lower[i]))}))",
                  f"(assert (<= X_{i} {_num(float(case.upper[i]))}))"]
    clauses = ["(and " + " ".join(_row_text(r, float(b)) for r, b in zip(cl.A, cl.b, strict=True)) + ")"
               for cl in case.clauses]
    lines += ["", "(assert (or", *(f"    {c}" for c in clauses), "))", ""]
    return "\n".join(lines)


def write_vnnlib(path: str | Path, spec: Spec, comment: str = "") -> Path:
    """Write ``spec`` as a VNN-LIB file, atomically."""
    atomic_write_text(path, format_vnnlib(spec, comment))
    return Path(path)


def robustness_spec(x: torch.Tensor, eps: float, label: int, num_classes: int) -> Spec:
    """The L-inf robustness query of one point: the box ``[x - eps, x + eps] ∩ [0, 1]`` and, as the
    counterexample, ``OR_{j != label} Y_j >= Y_label`` (one clause per class)."""
    flat = x.detach().double().flatten()
    eye = torch.eye(num_classes, dtype=torch.float64)
    clauses = [Clause((eye[label] - eye[j]).view(1, -1), torch.zeros(1, dtype=torch.float64), [False])
               for j in range(num_classes) if j != label]
    case = Case((flat - eps).clamp(0.0, 1.0), (flat + eps).clamp(0.0, 1.0), clauses)
    return Spec(flat.numel(), num_classes, [case])


def format_counterexample(x: torch.Tensor, y: torch.Tensor) -> str:
    """The VNN-COMP counterexample: ``sat`` then ``((X_0 v) ... (Y_0 v) ...)``."""
    pairs = [f"(X_{i} {_num(v)})" for i, v in enumerate(x.flatten().tolist())]
    pairs += [f"(Y_{j} {_num(v)})" for j, v in enumerate(y.flatten().tolist())]
    return "sat\n(" + "\n".join(pairs) + ")\n"
