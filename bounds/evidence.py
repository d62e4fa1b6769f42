"""The evidence gate: no bound is returned that a point certkd can evaluate contradicts (theory.md §2.1).

A sound lower bound ``lb_k`` of the margin ``m_k = f_y - f_{j_k}`` over a ball holds at
*every* point of the ball, and a linear bound ``a_k . x + c_k`` (CROWN, CROWN-IBP,
alpha-CROWN) lies below ``m_k`` on the whole ball. Whatever the relaxation of an operator,
its author or its backend, these are checked on points certkd holds before a bound leaves
``bounds``:

- the clean point ``x`` (a lower bound above the model's own margin is proof of a wrong
  relaxation, at any eps), points of the ball (corners, inside, the graph check's points),
  the points attacks found (``witnesses``), and, for linear bounds, the point of the ball
  where each row's linear function is smallest (where the bound is tightest);
- the bound's own linear function at all of them: ``a_k . x_s + c_k <= m_k(x_s)``;
- every intermediate interval auto_LiRPA computed: each node's value at the sampled
  points lies inside it (``first_node_outside``). The first node that fails names the
  operator in the refusal: a wrong relaxation is localized, past or future.

A contradiction raises ``ContradictionError`` (a refusal of the method for this model); no
partial result is returned.

Floating point: the published bound is lowered by ``rounding_allowance``, a first-order
running error bound of the float32 forward pass (Wilkinson): every accumulating node
(dense layer, convolution, matrix product, mean, pooling) adds at most
``gamma(n) |W| |h|`` (``gamma(n) = n u / (1 - n u)``, ``u = 2**-24``, ``n`` terms), every
other arithmetic node a few ulps of its value, and each node's error reaches the margin
through ``|d m_k / d node|``. The sum, evaluated at the clean point, is doubled
(``ROUNDING_FACTOR``: the bound computation performs the same products on magnitudes of
the same size once more); the gate then compares with no further tolerance.

Example
-------
>>> u = UNIT_ROUNDOFF
>>> round(gamma(100) / u)
100
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bounds.errors import ContradictionError, UnsupportedModelError
from bounds.graph import allow_list, describe_node, lirpa_call, node_kind, node_label, perturbed_names

UNIT_ROUNDOFF = 2.0 ** -24  # float32
ROUNDING_FACTOR = 2.0
SAMPLES = 6  # random points of each ball besides the clean point and the graph check's
NODE_RTOL = 1e-4  # an intermediate value outside its interval by more than this (relative) is a contradiction
# nodes that compute exactly (selection, copies, sign changes): no rounding of their own
_EXACT = frozenset({"BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant", "BoundShape",
                    "BoundRelu", "BoundFlatten", "BoundReshape", "BoundConcat", "BoundSqueeze", "BoundUnsqueeze",
                    "BoundTranspose", "BoundGather", "BoundMaxPool", "BoundNeg", "BoundPad", "BoundClip",
                    "BoundIdentity", "BoundSlice", "BoundLeakyRelu", "BoundPRelu"})
_SHAPE_ONLY = frozenset({"BoundFlatten", "BoundReshape", "BoundSqueeze", "BoundUnsqueeze", "BoundTranspose",
                         "BoundConcat", "BoundGather", "BoundParams", "BoundBuffers", "BoundConstant", "BoundShape"})
_ELEMENTWISE_ULPS = 4.0  # elementwise library functions (exp, erf, sqrt, division) are accurate to a few ulps


__all__ = ["ContradictionError", "EvidencePoints", "Region", "check_bound", "deciding_rows", "first_node_outside", "gamma", "linear_form",
           "localize", "node_intervals", "refuse_if_exceeded", "rounding_allowance", "take_rows"]


def gamma(n: float) -> float:
    """``n u / (1 - n u)``: the relative error bound of a float32 sum of ``n`` terms (Higham, Thm 3.1)."""
    nu = n * UNIT_ROUNDOFF
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


@dataclass(frozen=True)
class Region:
    """The perturbation set of each example: an L-inf box ``[low, high]`` (a ball intersected with [0, 1]^d, or
    any box) or an L2 ball of radius ``eps`` around ``x`` (bounded as a whole, not intersected with the box).

    ``x`` (B, ...) is the centre the graph is evaluated at; ``eps`` (B,) the radius (L-inf: half the widest side).
    """

    x: torch.Tensor
    eps: torch.Tensor
    norm: float
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def ball(cls, x: torch.Tensor, eps: torch.Tensor, norm: float) -> Region:
        """``B_p(x, eps)``; under L-inf intersected with [0, 1]^d."""
        e = eps.view(-1, *([1] * (x.dim() - 1))).to(x)
        if math.isinf(norm):
            return cls(x, eps, norm, (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0))
        return cls(x, eps, norm, x - e, x + e)

    @classmethod
    def box(cls, low: torch.Tensor, high: torch.Tensor) -> Region:
        """The box ``[low, high]`` (L-inf), centred at its middle."""
        return cls((low + high) / 2, ((high - low) / 2).flatten(1).amax(dim=1), math.inf, low, high)

    def _radius(self) -> torch.Tensor:
        return self.eps.view(-1, *([1] * (self.x.dim() - 1))).to(self.x)

    def samples(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` points per example, half corners (L-inf) or sphere points (L2), half inside: (count, B, ...)."""
        x = self.x
        shape = (count, *x.shape)
        u = torch.rand(shape, generator=generator).to(x)
        outer = (torch.arange(count) < (count + 1) // 2).view(-1, *([1] * x.dim())).to(x.device)
        if math.isinf(self.norm):
            corner = torch.where(u < 0.5, self.low, self.high)
            inside = self.low + (self.high - self.low) * torch.rand(shape, generator=generator).to(x)
            return torch.where(outer, corner, inside)
        direction = torch.randn(shape, generator=generator).to(x)
        direction = direction / direction.flatten(2).norm(dim=2).clamp_min(1e-12).view(count, -1, *([1] * (x.dim() - 1)))
        scale = torch.where(outer, torch.ones_like(u), u.flatten(2)[:, :, :1].view(count, -1, *([1] * (x.dim() - 1))))
        result: torch.Tensor = x + self._radius() * scale * direction
        return result

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """``points`` (S, B, ...) moved into the region (an attack's float rounding, points of a wider check)."""
        if math.isinf(self.norm):
            inside: torch.Tensor = torch.maximum(torch.minimum(points, self.high), self.low)
            return inside
        delta = points - self.x
        length = delta.flatten(2).norm(dim=2).view(*delta.shape[:2], *([1] * (self.x.dim() - 1)))
        scaled: torch.Tensor = self.x + delta * torch.clamp(self._radius() / length.clamp_min(1e-30), max=1.0)
        return scaled

    def tightest(self, coef: torch.Tensor) -> torch.Tensor:
        """Per row k of ``coef`` (B, R, ...), the point where ``coef_k . x'`` is smallest: (R, B, ...)."""
        a = coef.transpose(0, 1)
        if math.isinf(self.norm):
            return torch.where(a > 0, self.low.unsqueeze(0), self.high.unsqueeze(0))
        unit = a / a.flatten(2).norm(dim=2).clamp_min(1e-30).view(*a.shape[:2], *([1] * (self.x.dim() - 1)))
        result: torch.Tensor = (self.x - self._radius() * unit).to(self.x)
        return result

    def concretize(self, coef: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``min`` over the region of ``coef_k . x' + bias_k``: (B, R)."""
        a = coef.flatten(2)
        if math.isinf(self.norm):
            least: torch.Tensor = torch.minimum(a * self.low.flatten(1).unsqueeze(1),
                                                a * self.high.flatten(1).unsqueeze(1)).sum(dim=2) + bias
            return least
        e = self.eps.view(-1, 1).to(self.x)
        centre: torch.Tensor = torch.einsum("bkd,bd->bk", a, self.x.flatten(1)) - e * a.norm(dim=2) + bias
        return centre


def node_intervals(bounded: Any, batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The intervals auto_LiRPA holds for the perturbed intermediate nodes of the last bound pass."""
    perturbed = perturbed_names(bounded)
    final = bounded.final_name
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in bounded._modules.values():
        if node.name not in perturbed or node.name == final or node_kind(node) == "BoundInput":
            continue
        lower, upper = getattr(node, "lower", None), getattr(node, "upper", None)
        if torch.is_tensor(lower) and torch.is_tensor(upper) and lower.dim() > 0 and lower.shape[0] == batch \
                and lower.shape == upper.shape:
            out[node.name] = (lower.detach().clone(), upper.detach().clone())
    return out


def first_node_outside(bounded: Any, intervals: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       points: torch.Tensor, version: str | None) -> str | None:
    """The first node (auto_LiRPA's order) whose value at some point lies outside its interval, described; or None.

    ``points`` (S, B, ...) lie in the regions the intervals were computed for; the graph is
    evaluated on one batch of points at a time.
    """
    if not intervals:
        return None
    order = {name: k for k, name in enumerate(bounded._modules)}
    first: Any = None
    for batch in points:
        with torch.no_grad(), lirpa_call("evaluate its graph of this model", version):
            bounded(batch)
        for node in bounded._modules.values():
            if node.name not in intervals or (first is not None and order[node.name] >= order[first.name]):
                continue
            value = getattr(node, "forward_value", None)
            lower, upper = intervals[node.name]
            if not torch.is_tensor(value) or value.shape != lower.shape:
                continue
            slack = NODE_RTOL * (1.0 + value.abs())
            if bool(((value < lower - slack) | (value > upper + slack)).any()):
                first = node
                break
    return None if first is None else describe_node(first)


def localize(bounded: Any, bounded_x: Any, method: str, points: torch.Tensor, version: str | None) -> str | None:
    """After a contradiction: bound each perturbed node on its own (``final_node_name``) in auto_LiRPA's order;
    describe the first whose interval misses its value at one of ``points`` (S, B, ...), with the operators
    between it and the last node whose interval held (one of them is relaxed wrongly); None when none misses.

    Costs one bound pass per node, so it runs only to word a refusal.
    """
    perturbed = perturbed_names(bounded)
    count, batch = points.shape[:2]
    with torch.no_grad(), lirpa_call("evaluate its graph of this model", version):
        bounded(points.reshape(count * batch, *points.shape[2:]))
    values = {n.name: n.forward_value.detach().clone() for n in bounded._modules.values()
              if n.name in perturbed and torch.is_tensor(getattr(n, "forward_value", None))}
    suspects: list[str] = []
    for node in bounded._modules.values():
        if node.name not in values or node_kind(node) == "BoundInput":
            continue
        try:
            with torch.no_grad(), lirpa_call(f"bound node {node.name}", version):
                lower, upper = bounded.compute_bounds(x=(bounded_x,), method=method, final_node_name=node.name)
            value = values[node.name].view(count, *lower.shape)
        except (UnsupportedModelError, RuntimeError):  # a node auto_LiRPA cannot bound alone says nothing
            if node_kind(node) not in _SHAPE_ONLY:
                suspects.append(node_label(node_kind(node), allow_list()))
            continue
        slack = NODE_RTOL * (1.0 + value.abs())
        if bool(((value < lower - slack) | (value > upper + slack)).any()):
            after = f"; relaxed before it: {', '.join(dict.fromkeys(suspects))}" if suspects else ""
            return f"{describe_node(node)}{after}"
        suspects = []
    return None


GRADIENT_BATCH = 1024  # rows (examples x specification rows) per backward pass of the rounding allowance
GRADIENT_ROWS = 64  # specification rows up to which each row's own gradient weighs the errors (beyond: forward)
# how each node kind carries the errors of its inputs in ``_forward_error`` (the rest: no forward rule)
_STRUCTURAL = frozenset({"BoundFlatten", "BoundReshape", "BoundSqueeze", "BoundUnsqueeze", "BoundTranspose",
                         "BoundConcat", "BoundGather", "BoundPad", "BoundSlice", "BoundMaxPool", "BoundIdentity"})
_ONE_LIPSCHITZ = frozenset({"BoundRelu", "BoundLeakyRelu", "BoundClip", "BoundNeg"})
_MULTILINEAR = frozenset({"BoundLinear", "BoundConv", "BoundMatMul", "BoundMul", "BoundAdd", "BoundAveragePool",
                          "BoundGlobalAveragePool", "BoundReduceMean", "BoundReduceSum"})


def rounding_allowance(bounded: Any, x: torch.Tensor, spec: torch.Tensor, version: str | None) -> torch.Tensor:
    """Float32 rounding allowance of every specification row at ``x`` (module docstring): shape (B, R).

    Up to ``GRADIENT_ROWS`` rows, each node's error is weighed by that row's own gradient
    (one backward pass per row). With more rows (ImageNet's 999 margins) the errors are
    carried forward instead, through ``|W|`` and 1-Lipschitz operators (``_forward_error``:
    cost independent of the rows, looser on deep networks).
    """
    batch, rows = spec.shape[:2]
    if rows > GRADIENT_ROWS:
        forward = _forward_error(bounded, x, spec, version)
        if forward is not None:
            return ROUNDING_FACTOR * forward
    step = max(1, GRADIENT_BATCH // rows)  # examples per backward pass: memory grows with examples x rows
    parts = [_gradient_error(bounded, x[i:i + step], spec[i:i + step], version) for i in range(0, batch, step)]
    return ROUNDING_FACTOR * torch.cat(parts)


def _gradient_error(bounded: Any, x: torch.Tensor, spec: torch.Tensor, version: str | None) -> torch.Tensor:
    """Each row's first-order float32 error at ``x``: the nodes' rounding weighed by that row's gradient (B, R)."""
    batch, rows = spec.shape[:2]
    points = x.repeat_interleave(rows, dim=0).detach().requires_grad_(True)
    select = spec.reshape(batch * rows, -1)
    with torch.enable_grad(), lirpa_call("evaluate its graph of this model", version):
        logits = bounded(points)
        margin = (select * logits).sum(dim=1)
        nodes = [n for n in bounded._modules.values()
                 if node_kind(n) not in _EXACT and torch.is_tensor(getattr(n, "forward_value", None))
                 and n.forward_value.requires_grad]
        grads = torch.autograd.grad(margin.sum(), [n.forward_value for n in nodes], allow_unused=True)
        error = UNIT_ROUNDOFF * margin.detach().abs()
        for node, grad in zip(nodes, grads, strict=True):
            if grad is None:
                continue
            radius = _node_rounding(node)
            if radius is not None:
                error = error + (grad.abs() * radius).flatten(1).sum(dim=1)
    result: torch.Tensor = error.view(batch, rows).detach()
    return result


def _forward_error(bounded: Any, x: torch.Tensor, spec: torch.Tensor, version: str | None) -> torch.Tensor | None:
    """A bound of every row's float32 error at ``x`` carried forward node by node; None for a node with no rule.

    Multilinear nodes (dense, convolution, products, sums, means) with error ``E`` on inputs
    of magnitude ``M``: ``f(M + E) - f(M)`` on magnitudes, plus their own rounding; 1-Lipschitz
    nodes pass ``E``; selections and copies apply themselves to ``E``; a difference adds.
    """
    perturbed = perturbed_names(bounded)
    errors: dict[str, torch.Tensor] = {}
    with torch.no_grad(), lirpa_call("evaluate its graph of this model", version):
        logits = bounded(x)
        for node in bounded._modules.values():  # auto_LiRPA keeps its nodes in topological order
            if node.name not in perturbed:
                continue
            kind = node_kind(node)
            inputs = list(getattr(node, "inputs", []))
            if kind == "BoundInput":
                errors[node.name] = torch.zeros_like(node.forward_value)
                continue
            if any(i.name in perturbed and i.name not in errors for i in inputs):
                return None
            values = [i.forward_value.detach() for i in inputs]
            carried = [errors.get(i.name) for i in inputs]
            if kind in _STRUCTURAL:
                out = node.forward(*[v if e is None else e for v, e in zip(values, carried, strict=True)])
            elif kind in _ONE_LIPSCHITZ:
                out = next(e for e in carried if e is not None)
            elif kind == "BoundSub":
                out = sum((e for e in carried if e is not None), torch.zeros_like(node.forward_value))
            elif kind in _MULTILINEAR:
                sizes = [v.abs() for v in values]
                grown = [m if e is None else m + e for m, e in zip(sizes, carried, strict=True)]
                out = node.forward(*grown) - node.forward(*sizes)
            else:
                return None
            own = _node_rounding(node)
            errors[node.name] = out.abs() + (own if own is not None and kind not in _STRUCTURAL else 0.0)
        final = errors[bounded.final_name]
    margin = torch.einsum("brc,bc->br", spec, logits.detach())
    total: torch.Tensor = torch.einsum("brc,bc->br", spec.abs(), final.flatten(1)) + UNIT_ROUNDOFF * margin.abs()
    return total


def _node_rounding(node: Any) -> torch.Tensor | None:
    """Per element of the node's value at its last evaluation, a bound of the float32 rounding it adds."""
    kind = node_kind(node)
    value = node.forward_value.detach()
    inputs = [getattr(i, "forward_value", None) for i in getattr(node, "inputs", [])]
    if not all(torch.is_tensor(v) for v in inputs):
        return None
    magnitudes = [v.detach().abs() for v in inputs if v is not None]
    with torch.no_grad():
        if kind in ("BoundLinear", "BoundConv", "BoundMatMul"):
            terms = magnitudes[1][0].numel() if kind == "BoundConv" else magnitudes[0].shape[-1]
            scale, size = gamma(terms + 2), node.forward(*magnitudes)  # |W| |h| + |b|: the operator on magnitudes
        elif kind in ("BoundAveragePool", "BoundGlobalAveragePool", "BoundReduceMean", "BoundReduceSum"):
            terms = max(1, magnitudes[0][0].numel() // max(1, value[0].numel()))
            scale, size = gamma(terms + 1), node.forward(*magnitudes)
        elif kind in ("BoundAdd", "BoundSub"):
            scale, size = UNIT_ROUNDOFF, (magnitudes[0] + magnitudes[1]).expand_as(value)
        elif kind == "BoundSoftmax":
            scale, size = gamma(value.shape[-1] + _ELEMENTWISE_ULPS), value
        else:
            scale, size = _ELEMENTWISE_ULPS * UNIT_ROUNDOFF, value
        radius: torch.Tensor = size.abs() * scale
    return radius


COMPARE_RTOL = 1e-5  # float rounding when comparing two numbers computed along different paths


def refuse_if_exceeded(bound: torch.Tensor, seen: torch.Tensor, what: str) -> None:
    """Raise ``ContradictionError`` where a certified upper ``bound`` is below a value ``seen`` at a point of the
    ball (an attack's or the clean point's), beyond float rounding; ``what`` names the bound in the refusal."""
    seen = seen.to(bound.dtype)
    broken = seen > bound + COMPARE_RTOL * (1.0 + seen.abs())
    if bool(broken.any()):
        raise ContradictionError(
            f"{what} is refused for this model: it is exceeded by a value at a point of the ball at "
            f"{int(broken.flatten(1).any(dim=1).sum()) if broken.dim() > 1 else int(broken.sum())} of "
            f"{len(bound)} examples, so a relaxation it uses is wrong for this model")


def deciding_rows(published: torch.Tensor, limit: int = GRADIENT_ROWS) -> torch.Tensor | None:
    """The ``limit`` rows (B, limit) with the smallest bounds, which decide a certificate; None when all fit."""
    if published.shape[1] <= limit:
        return None
    rows: torch.Tensor = published.topk(limit, dim=1, largest=False).indices
    return rows


def take_rows(coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``coef`` (B, R, ...) restricted to ``rows`` (B, M): (B, M, ...)."""
    index = rows.view(*rows.shape, *([1] * (coef.dim() - 2))).expand(-1, -1, *coef.shape[2:])
    taken: torch.Tensor = coef.gather(1, index)
    return taken


LINEAR_FORM_RTOL = 1e-4


def linear_form(coef: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor,
                region: Region) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef, bias)`` with ``bias`` -inf on the rows whose concretization is not ``lower``.

    auto_LiRPA 0.3 returns, for an input read by several nodes, the coefficients of one path
    only: such a row's linear form is not the bound and says nothing about it.
    """
    same = (region.concretize(coef, bias) - lower).abs() <= LINEAR_FORM_RTOL * (1.0 + lower.abs())
    return coef, torch.where(same, bias, torch.full_like(bias, -math.inf))


@dataclass
class EvidencePoints:
    """Points of each example's ball and the model's margins there: ``points`` (S, B, ...), ``margins`` (S, B, K-1)."""

    points: torch.Tensor
    margins: torch.Tensor


def check_bound(lower: torch.Tensor, evidence: EvidencePoints, coef: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Which examples' published bounds a point contradicts: (B,) bool.

    ``lower`` (B, K-1) is the published bound (rounding allowance already subtracted);
    ``coef`` (B, K-1, ...) and ``bias`` (B, K-1) the linear bound ``coef_k . x' + bias_k``
    lowered by the same allowance (``bias`` includes it), for the rows whose linear form is
    the one the bound was concretized from (others: ``bias`` -inf, see ``linear_form``);
    ``rows`` (B, M) says which rows ``coef`` and ``bias`` hold when they hold only M of them
    (``deciding_rows``).
    """
    broken = (lower.unsqueeze(0) > evidence.margins).flatten(2).any(dim=2).any(dim=0)
    if coef is not None and bias is not None:
        flat = evidence.points.flatten(2)  # (S, B, d)
        a = coef.flatten(2)  # (B, K-1, d)
        linear = torch.einsum("bkd,sbd->sbk", a, flat) + bias.unsqueeze(0)
        # the dot product's own float32 rounding
        slack = gamma(flat.shape[-1] + 1) * torch.einsum("bkd,sbd->sbk", a.abs(), flat.abs())
        held = evidence.margins if rows is None else \
            evidence.margins.gather(2, rows.unsqueeze(0).expand(len(flat), -1, -1))
        broken |= ((linear - slack) > held).any(dim=2).any(dim=0)
    return broken
