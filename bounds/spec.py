"""Linear output specifications over an input box: ``min_{x in box} C f(x)`` (theory.md §2.1).

A VNN-LIB-style query asks whether some ``x`` in a box ``[x_L, x_U]`` satisfies all rows of
one clause ``C_k f(x) <= d_k``. ``spec_bounds`` bounds every row of every clause at once
(auto_LiRPA's specification matrix ``C``, one pass) over the box, through a
``BoundEngine``'s verification view, graph check and allow-list; ``box_attack`` searches
the box for a point that satisfies a clause (projected sign gradient on the clause's
largest violated row). Every lower bound passes the engine's evidence gate
(``BoundEngine.bound_spec``: the box's centre and corners, the attack's points, the linear
form's tightest points, every intermediate interval): a contradiction is reported, never claimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bounds.certify import BoundEngine
from bounds.errors import BoundsError, ContradictionError
from bounds.evidence import Region

__all__ = ["SpecBounds", "AttackResult", "spec_bounds", "box_attack", "clause_values", "check_box"]


@dataclass
class SpecBounds:
    """Certified lower bounds of ``C f(x) - d`` over the box (one example).

    ``lower[r]`` bounds row r from below (rounding allowance subtracted); ``refuted[k]``:
    some row of clause k is positive on the whole box (clause k has no point);
    ``unsat``: every clause is refuted. ``contradiction`` names evidence a bound exceeds
    (then nothing is claimed: ``unsat`` is False).
    """

    lower: torch.Tensor  # (R,)
    refuted: torch.Tensor  # (num_clauses,) bool
    unsat: bool
    method: str
    contradiction: str | None = None


@dataclass
class AttackResult:
    """The best point found per clause: ``points`` (num_clauses, *shape), ``worst`` (num_clauses,) the
    largest row value ``max_r (C_k f(x) - d_k)_r`` there (<= 0: the clause holds at that point)."""

    points: torch.Tensor
    worst: torch.Tensor


def check_box(engine: BoundEngine, x_lower: torch.Tensor, x_upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box as float32 tensors of one example's shape, inside [0, 1] with ``lower <= upper``."""
    shape = engine.input_shape
    lo = torch.as_tensor(x_lower, dtype=torch.float32).reshape(1, *shape).to(engine.device)
    up = torch.as_tensor(x_upper, dtype=torch.float32).reshape(1, *shape).to(engine.device)
    if bool((lo > up).any()) or float(lo.min()) < 0.0 or float(up.max()) > 1.0:
        raise BoundsError("the input box must satisfy 0 <= lower <= upper <= 1 (map other ranges into the model)")
    return lo, up


def clause_values(view: nn.Module, x: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``C f(x) - d`` for a batch of points: (B, R)."""
    with torch.no_grad():
        f: torch.Tensor = view(x).double()
    return f @ c.t().to(f) - d.to(f)


def _refuted(lower: torch.Tensor, clause_of_row: torch.Tensor, num_clauses: int) -> torch.Tensor:
    best = torch.full((num_clauses,), -math.inf, dtype=lower.dtype, device=lower.device)
    best = best.scatter_reduce(0, clause_of_row.to(lower.device), lower, reduce="amax")
    return best > 0


def spec_bounds(engine: BoundEngine, x_lower: torch.Tensor, x_upper: torch.Tensor, c: torch.Tensor,
                d: torch.Tensor, clause_of_row: torch.Tensor, method: str = "crown",
                evidence: torch.Tensor | None = None) -> SpecBounds:
    """Lower bounds of every row of ``C f(x) - d`` over the box, in one auto_LiRPA pass.

    Parameters
    ----------
    engine : BoundEngine
        The model's verification view and auto_LiRPA graph.
    x_lower, x_upper : torch.Tensor
        The box (one example's shape), inside [0, 1].
    c, d : torch.Tensor
        (R, K) and (R,): the rows ``C f <= d`` of all clauses.
    clause_of_row : torch.Tensor
        (R,) the clause of each row.
    method : str
        ibp, crown-ibp, crown or alpha-crown.
    evidence : torch.Tensor, optional
        Points of the box (N, *shape) whose values the bounds must not exceed (the centre is always used).

    Returns
    -------
    SpecBounds
        ``lower[r] <= min_{x in box} (C f(x) - d)_r``; ``unsat`` iff every clause has a row
        with a positive lower bound and no evidence contradicts a bound.

    Formula
    -------
    ``lower = bound(C)(box) - allowance - d``: ``BoundEngine.bound_spec`` with the box as its region (the
    float32 allowance and the evidence gate of ``bounds.evidence``; a contradiction is reported, not claimed).

    Example
    -------
    >>> b = spec_bounds(engine, lo, up, c, d, rows)  # doctest: +SKIP
    """
    method, p = engine.check(method, "inf")
    lo, up = check_box(engine, x_lower, x_upper)
    c = torch.as_tensor(c, dtype=torch.float32).to(engine.device)
    d = torch.as_tensor(d, dtype=torch.float64).to(engine.device)
    rows = torch.as_tensor(clause_of_row, dtype=torch.long)
    num_clauses = int(rows.max()) + 1 if rows.numel() else 0
    if c.dim() != 2 or c.shape[1] != engine.num_classes or d.shape != (c.shape[0],) or rows.shape != d.shape:
        raise BoundsError(f"the specification needs C (R, {engine.num_classes}), d (R,) and one clause per row; "
                          f"got C {tuple(c.shape)}, d {tuple(d.shape)}")
    if c.shape[0] == 0:
        return SpecBounds(torch.zeros(0), torch.zeros(num_clauses, dtype=torch.bool), False, method)
    points = None if evidence is None else evidence.to(lo).reshape(-1, 1, *lo.shape[1:])
    try:
        lower = engine.bound_spec(Region.box(lo, up), c.unsqueeze(0), method, witnesses=points)
    except ContradictionError as exc:
        return SpecBounds(torch.zeros(c.shape[0], dtype=torch.float64), torch.zeros(num_clauses, dtype=torch.bool),
                          False, method, contradiction=str(exc))
    low = lower.double().flatten() - d
    refuted = _refuted(low, rows.to(low.device), num_clauses)
    return SpecBounds(low, refuted, bool(refuted.all()), method)


def box_attack(view: nn.Module, x_lower: torch.Tensor, x_upper: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
               clause_of_row: torch.Tensor, steps: int = 50, restarts: int = 2,
               generator: torch.Generator | None = None) -> AttackResult:
    """Search the box for a point satisfying each clause (an **estimate**: finding none proves nothing).

    ``x_lower``, ``x_upper``: (1, *shape). Per clause, projected sign-gradient descent on ``max_r (C_k f(x) - d_k)_r`` from the
    centre and ``restarts`` random points, step size decaying from a quarter of the box's
    width; the best point per clause is kept.
    """
    lo, up = x_lower, x_upper
    rows = torch.as_tensor(clause_of_row, dtype=torch.long)
    num_clauses = int(rows.max()) + 1 if rows.numel() else 0
    c64, d64 = c.double(), d.double()
    mask = torch.stack([rows == k for k in range(num_clauses)]).to(lo.device) if num_clauses else None
    width = up - lo
    starts = [(lo + up) / 2] + [lo + width * torch.rand(lo.shape, generator=generator).to(lo)
                                for _ in range(restarts)]
    best_x = ((lo + up) / 2).repeat(num_clauses, *([1] * (lo.dim() - 1)))
    best = torch.full((num_clauses,), math.inf, dtype=torch.float64)
    if mask is None:
        return AttackResult(best_x, best)

    def worst(x: torch.Tensor) -> torch.Tensor:  # (num_clauses,) max over each clause's rows
        f: torch.Tensor = view(x).double()
        vals = f @ c64.t().to(x.device) - d64.to(x.device)  # (num_clauses, R)
        return vals.masked_fill(~mask, -math.inf).amax(dim=1)

    for start in starts:
        x = start.repeat(num_clauses, *([1] * (lo.dim() - 1))).clone()
        for t in range(steps + 1):
            x.requires_grad_(True)
            with torch.enable_grad():
                w = worst(x)
                (grad,) = torch.autograd.grad(w.sum(), x)
            with torch.no_grad():
                value = w.detach().cpu()
                better = value < best
                best = torch.where(better, value, best)
                best_x[better.to(best_x.device)] = x.detach()[better.to(x.device)]
                if t == steps:
                    break
                step = width * 0.25 * (1 - t / steps) + width * 1e-3
                x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), up), lo)
    return AttackResult(best_x, best)
