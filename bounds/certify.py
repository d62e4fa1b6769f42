"""Sound certification with auto_LiRPA: margin lower bounds and certified radii (theory.md §2.1).

Every bound goes through the verification view and the allow-list of ``bounds.view``
(no switch skips them). ``BoundEngine`` builds the view and auto_LiRPA's
``BoundedModule`` once per model and reuses them across batches, eps values and
methods. Margins ``m_j = f_y - f_j`` (j != y) are bounded through the specification
matrix ``C`` (B, K-1, K); the L-inf ball is intersected with the box [0, 1]^d, the L2
ball is bounded as a whole (a superset of its intersection with the box: sound).

CROWN is the default method; alpha-CROWN is opt-in (about 400x slower on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bounds.attack import margins, min_margin, pgd
from bounds.bound_methods import BOUND_METHODS, LIRPA_NAMES
from bounds.errors import BoundsError, ContradictionError, UnsupportedModelError
from bounds.evidence import (
    SAMPLES,
    EvidencePoints,
    Region,
    check_bound,
    deciding_rows,
    first_node_outside,
    linear_form,
    localize,
    node_intervals,
    rounding_allowance,
    take_rows,
)
from bounds.graph import ESTIMATE_HINT, GraphCheck, check_graph_supported, lirpa_call, node_kind
from bounds.inputs import (
    check_batch_size,
    check_finite,
    check_input_shape,
    check_model,
    float32_model,
    logits_of,
)
from bounds.lirpa import auto_lirpa_version, import_auto_lirpa, reset_optimization
from bounds.norms import batch_norm, check_eps, default_eps_max, dual_norm, norm_name, parse_norm
from bounds.tracing import check_no_value_dependence
from bounds.view import check_modules, graph_of, verification_view

BOUND_NORMS = (math.inf, 2.0)
_LIRPA_METHODS = LIRPA_NAMES
# auto_LiRPA 0.3 needs this for alpha-CROWN (a shape error when > 90 % of a layer's neurons are unstable)
BOUND_OPTS = {"sparse_features_alpha": False}
# nodes whose relaxation depends on the values of their input bounds, not only on signs: with them, every
# intermediate bound is computed in full (no batch-shared sparsity, see BoundEngine)
_VALUE_DEPENDENT_RELAXATIONS = frozenset({"BoundMaxPool"})


@dataclass
class MarginBounds:
    """Certified lower bounds of the margins over ``B_p(x, eps)`` (theory.md §2.1).

    ``lower[i, k]`` bounds ``f_y - f_j`` for the k-th class ``j != y_i`` (classes in
    order, ``y_i`` skipped, as in ``bounds.attack.margins``); ``certified[i]`` is
    ``min_lower[i] > 0`` (which implies the clean prediction is ``y_i``).
    """

    lower: torch.Tensor  # (B, K-1)
    min_lower: torch.Tensor  # (B,)
    certified: torch.Tensor  # (B,) bool
    eps: torch.Tensor  # (B,)
    method: str
    norm: float


@dataclass
class RadiusResult:
    """Per-example certified radii (theory.md §2.1).

    ``radius`` is an eps at which the method certified the point (0 for points whose
    clean prediction is wrong: not certified at any eps, flagged by ``correct``);
    ``uncertified`` is the smallest eps the search knows the method not to certify
    (an eps the bounds failed at, or the attack's upper end); the search stops when
    ``uncertified - radius <= tol``. ``upper`` is the attack's upper end: an eps at
    which PGD found an adversarial example (an estimate of the true robust radius from
    above; ``radius <= upper`` always).
    """

    radius: torch.Tensor  # (B,) certified
    uncertified: torch.Tensor  # (B,)
    upper: torch.Tensor  # (B,) attack upper end (estimate)
    correct: torch.Tensor  # (B,) bool, clean prediction == label
    method: str
    norm: float
    tol: float
    passes: int = 0  # bound-propagation passes the search ran
    pass_eps: list[torch.Tensor] = field(default_factory=list, repr=False)


def check_method(method: str) -> str:
    key = str(method).strip().lower()
    if key not in BOUND_METHODS:
        raise BoundsError(f"unknown bound method {method!r}: use one of {', '.join(BOUND_METHODS)}")
    return key


def check_bound_norm(norm: str | float) -> float:
    p = parse_norm(norm)
    if p not in BOUND_NORMS:
        raise BoundsError(f"bound propagation supports the inf and 2 norms, not L{norm_name(p)}")
    return p


def _per_example_conv_class(lirpa: Any) -> type:
    """auto_LiRPA's convolution with per-example L2 radii in IBP (0.3 multiplies a (C,) norm by eps).

    Only the case this class adds is new: an L2 ball of radius ``eps_i`` (a tensor) around
    the input read directly by the convolution; then every output of channel k lies within
    ``||W_k||_2 * eps_i`` of the clean output (Cauchy-Schwarz; zero padding only removes
    terms). Every other case is auto_LiRPA's own code.
    """
    from auto_LiRPA.operators.base import Interval

    base: Any = lirpa.operators.BoundConv  # untyped third-party class

    class BoundConvPerExampleEps(base):  # type: ignore[misc]  # auto_LiRPA is untyped
        lirpa_kind = "BoundConv"

        def interval_propagate(self, *v: Any, C: Any = None) -> Any:
            ptb = getattr(v[0], "ptb", None) if isinstance(v[0], Interval) else None
            eps = getattr(ptb, "eps", None)
            if ptb is None or math.isinf(ptb.norm) or not torch.is_tensor(eps) or eps.numel() == 1:
                return super().interval_propagate(*v, C=C)
            if self.is_input_perturbed(1):
                raise NotImplementedError("weight perturbation is not supported")
            weight = v[1][0]
            bias = v[2][0] if self.has_bias else None
            center = F.conv2d(v[0][1], weight, bias, self.stride, self.padding, self.dilation, self.groups)
            kernel_norm = weight.flatten(1).norm(p=float(ptb.dual_norm), dim=1)
            deviation = kernel_norm.view(1, -1, 1, 1) * eps.reshape(-1, 1, 1, 1).to(center)
            return center - deviation, center + deviation

    return BoundConvPerExampleEps


def bounded_module(module: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                   version: str | None = None, conv_mode: str = "patches") -> Any:
    """auto_LiRPA's ``BoundedModule`` of ``module`` with the options certkd needs (per-example eps, 0.3 fixes).

    Callers must pass a verification view (or a module built from one), run
    ``bounds.graph.check_graph_supported`` on the result and a ``bounds.graph.GraphCheck``
    before computing any bound. auto_LiRPA's prints are dropped and its errors become one sentence.
    """
    lirpa = import_auto_lirpa()
    device = example_inputs[0].device if isinstance(example_inputs, tuple) else example_inputs.device
    check_no_value_dependence(module, example_inputs, "bound propagation")
    with lirpa_call("build its graph of this model", version or auto_lirpa_version()):
        return lirpa.BoundedModule(module, example_inputs, bound_opts={**BOUND_OPTS, "conv_mode": conv_mode},
                                   device=str(device),
                                   custom_ops={"onnx::Conv": _per_example_conv_class(lirpa)})


def batch_independent(bounded: Any) -> bool:
    """Make each example's bound independent of its batch neighbours; True if an option had to change.

    auto_LiRPA 0.3 computes CROWN bounds only for the pre-ReLU neurons IBP finds unstable in
    *some* example of the batch (``get_unstable_locations`` merges the batch); the others keep
    their IBP bounds. Both are sound bounds of the same neuron, and a ReLU's relaxation only
    depends on their signs, so ReLU networks get the same bound at any batch. A max-pooling
    relaxation uses the bound values themselves (which input has the largest lower bound,
    the concrete upper bound), so there the batch changed the (sound) bound. With such nodes,
    sparse intermediate bounds are switched off: every neuron gets its CROWN bound.
    """
    kinds = {node_kind(n) for n in bounded._modules.values()}
    if kinds & _VALUE_DEPENDENT_RELAXATIONS:
        bounded.bound_opts["sparse_intermediate_bounds"] = False
        return True
    return False


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The specification matrix C (B, K-1, K) with ``(C f)_k = f_y - f_{j_k}`` (theory.md §1)."""
    eye = torch.eye(num_classes, device=y.device)
    diff = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j = e_y - e_j
    keep = torch.ones(len(y), num_classes, dtype=torch.bool, device=y.device)
    keep[torch.arange(len(y), device=y.device), y] = False
    return diff[keep].view(len(y), num_classes - 1, num_classes)


class BoundEngine:
    """The verification view of one model and its auto_LiRPA graph, built once and reused.

    ``batch_size`` caps how many examples one bound pass handles (CROWN's memory grows
    with it: about 0.6 GB per example for LeNet on MNIST; docs/auto_lirpa.md).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu",
                 batch_size: int = 64):
        self.device = torch.device(device)
        self.input_shape = check_input_shape(input_shape)
        self.batch_size = check_batch_size(batch_size)
        self.version = auto_lirpa_version()
        model, note = float32_model(model)
        self.notes: list[str] = [note] if note else []  # what the certificates hold for, when not the model itself
        check_model(model, self.input_shape)  # output, shape and dtype: one sentence before any graph
        view = verification_view(model, self.input_shape).to(self.device)
        check_modules(view, self.version)
        example = torch.zeros((1, *self.input_shape), device=self.device)
        with torch.no_grad():
            self.num_classes = int(logits_of(view(example), 1).shape[1])
        view, bounded = graph_of(view, self.input_shape, self.version)
        batch_independent(bounded)
        check_graph_supported(bounded, "ibp", math.inf, self.version)  # the most permissive: attributes first
        self.view, self.bounded = view, bounded
        self.graph_check = GraphCheck(bounded, view, self.version)
        self.graph_check.check_unit_box(self.input_shape, self.device, torch.float32)
        self._lirpa = import_auto_lirpa()
        self._checked: set[tuple[str, float]] = set()

    def check(self, method: str, norm: str | float) -> tuple[str, float]:
        """Validate ``method`` and ``norm`` and run the allow-list for them (cached)."""
        key = (check_method(method), check_bound_norm(norm))
        if key not in self._checked:
            check_graph_supported(self.bounded, key[0], key[1], self.version)
            self._checked.add(key)
        return key

    def _inputs(self, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        y = torch.as_tensor(y).long().to(self.device)
        check_finite(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise BoundsError(f"inputs of shape {tuple(x.shape[1:])} do not fit a model for {self.input_shape}")
        if y.shape != (x.shape[0],) or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise BoundsError(f"labels must be {x.shape[0]} class indices in [0, {self.num_classes})")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise BoundsError("inputs must lie in [0, 1] (normalization belongs inside the model)")
        check_eps(eps)
        eps_t = torch.as_tensor(eps, dtype=torch.float32, device=self.device)
        eps_t = eps_t.expand(x.shape[0]).clone() if eps_t.dim() == 0 else eps_t.flatten()
        if eps_t.shape != (x.shape[0],):
            raise BoundsError(f"eps must be a number or one value per example, got shape {tuple(eps_t.shape)}")
        return x, y, eps_t

    def _perturbation(self, region: Region) -> Any:
        if math.isinf(region.norm):
            return self._lirpa.PerturbationLpNorm(norm=math.inf, eps=float(region.eps.max()), x_L=region.low,
                                                  x_U=region.high)
        eps = region.eps
        same = bool((eps == eps[0]).all())
        return self._lirpa.PerturbationLpNorm(norm=region.norm, eps=float(eps[0]) if same else eps.view(-1, 1))

    def bound_spec(self, region: Region, spec: torch.Tensor, method: str,
                   witnesses: torch.Tensor | None = None) -> torch.Tensor:
        """One auto_LiRPA call: lower bounds (B, R) of ``spec @ f`` over ``region``, checked against evidence.

        ``spec`` (B, R, K) is auto_LiRPA's specification matrix ``C`` (``margin_spec`` for the
        margins). The graph check runs first; alpha-CROWN needs autograd and leaves ``.grad``
        on the parameters (cleared here); an error inside auto_LiRPA becomes one
        ``UnsupportedModelError`` sentence. The float32 rounding allowance is subtracted and
        the result passes the evidence gate (``bounds.evidence``: the clean point, sampled
        points, the linear form's tightest points, ``witnesses`` (S, B, ...) such as attack
        points, and every intermediate interval) or ``ContradictionError`` is raised.
        """
        x, p = region.x, region.norm
        checked, outputs = self.graph_check.check(x, region.eps, p)
        bounded_x = self._lirpa.BoundedTensor(x, self._perturbation(region))
        linear = method != "ibp"  # every other method returns its linear bound on the input
        final, source = self.bounded.final_name, self.bounded.input_name[0]
        try:
            with torch.set_grad_enabled(method == "alpha-crown"), \
                    lirpa_call(f"bound this model with {method} under L{norm_name(p)}", self.version):
                result = self.bounded.compute_bounds(x=(bounded_x,), C=spec, method=_LIRPA_METHODS[method],
                                                     bound_upper=False, return_A=linear,
                                                     needed_A_dict={final: [source]} if linear else None)
        except BaseException:
            reset_optimization(self.bounded)  # a refused call leaves the engine usable
            raise
        finally:
            for param in self.bounded.parameters():
                param.grad = None
        lower: torch.Tensor = result[0].detach()
        coef = bias = None
        if linear:
            a_dict = result[2][final][source]
            if torch.is_tensor(a_dict["lA"]) and torch.is_tensor(a_dict["lbias"]):
                coef, bias = linear_form(a_dict["lA"].detach(), a_dict["lbias"].detach(), lower, region)
        intervals = node_intervals(self.bounded, len(x))
        allowance = rounding_allowance(self.bounded, x, spec, self.version)
        published: torch.Tensor = lower - allowance
        rows = deciding_rows(published)
        if coef is not None and bias is not None and rows is not None:  # many rows: those that decide
            coef, bias, allowance = take_rows(coef, rows), bias.gather(1, rows), allowance.gather(1, rows)
        fresh = [region.samples(SAMPLES, self.graph_check.generator)]
        if coef is not None:
            fresh.append(region.tightest(coef))
        if witnesses is not None:
            fresh.append(witnesses.to(x))
        with torch.no_grad():
            points = torch.cat([region.project(part) for part in (checked, *fresh)])
            logits = torch.stack([self.view(batch) for batch in points])  # one batch of points at a time
        evidence = EvidencePoints(points, torch.einsum("brc,sbc->sbr", spec, logits))
        broken = check_bound(published, evidence, coef, None if bias is None else bias - allowance, rows)
        node = first_node_outside(self.bounded, intervals, points, self.version)
        if bool(broken.any()) or node is not None:
            node = node or localize(self.bounded, bounded_x, _LIRPA_METHODS[method], points, self.version)
            where = f"first outside its interval at {node}" if node is not None else "at the values it bounds"
            raise ContradictionError(
                f"{method} is refused for this model: its bounds under L{norm_name(p)} are contradicted by the "
                f"model's own values at points of the region ({int(broken.sum())} of {len(x)} examples; {where}), "
                f"so auto_LiRPA {self.version} relaxes an operator of this model wrongly; {ESTIMATE_HINT}.")
        return published

    def margin_bounds(self, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str | float = "inf",
                      method: str = "crown", witnesses: torch.Tensor | None = None) -> MarginBounds:
        """Lower bounds of ``f_y - f_j`` over ``B_p(x, eps)`` for every ``j != y`` (theory.md §2.1).

        ``eps`` is a number or a (B,) tensor (one radius per example). Processes ``x`` in
        chunks of ``batch_size``. Every bound passes the evidence gate (``bounds.evidence``)
        or the call raises ``ContradictionError``; ``witnesses`` (S, B, ...) are further points
        of the balls to check it on (an attack's points).
        """
        method, p = self.check(method, norm)
        x, y, eps_t = self._inputs(x, y, eps)
        parts = [self.bound_spec(Region.ball(x[i:i + self.batch_size], eps_t[i:i + self.batch_size], p),
                                 margin_spec(y[i:i + self.batch_size], self.num_classes), method,
                                 None if witnesses is None else witnesses[:, i:i + self.batch_size])
                 for i in range(0, x.shape[0], self.batch_size)]
        lower = torch.cat(parts) if parts else torch.zeros(0, self.num_classes - 1, device=self.device)
        min_lower = lower.amin(dim=1)
        return MarginBounds(lower=lower, min_lower=min_lower, certified=min_lower > 0, eps=eps_t,
                            method=method, norm=p)

    def first_order_radius(self, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        """``min_j m_j(x) / ||grad m_j(x)||_q`` (theory.md §2.2 at R = 0): an **estimate**, the search's first guess."""
        k = self.num_classes - 1
        rows = x.repeat_interleave(k, dim=0).requires_grad_(True)
        labels = y.repeat_interleave(k)
        with torch.enable_grad():
            m = margins(self.view(rows), labels)[torch.arange(len(rows)), torch.arange(k).repeat(len(x))]
            (grad,) = torch.autograd.grad(m.sum(), rows)
        slope = batch_norm(grad, dual_norm(p)).clamp_min(1e-12)
        return (m.detach() / slope).view(-1, k).amin(dim=1).clamp_min(0.0)

    def attack_upper(self, x: torch.Tensor, y: torch.Tensor, p: float, eps_max: float, guess: torch.Tensor,
                     steps: int = 10, restarts: int = 1, rounds: int = 3,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An eps at which PGD found an adversarial example (``eps_max`` if none was found): an **estimate**.

        ``rounds`` PGD runs bisect the attack radius in log scale between ``guess / 4`` and ``eps_max``.
        Returns the upper ends (n,), and every round's points (rounds, n, ...) with the radius of the
        ball each lies in (rounds, n): evidence for the bounds at larger radii (``bounds.evidence``).
        """
        upper = torch.full((len(x),), float(eps_max), device=x.device)
        lower = (guess / 4).clamp(min=float(eps_max) * 1e-6, max=float(eps_max))
        points, radii = [], []
        for _ in range(rounds):
            mid = torch.sqrt(lower * upper)
            found = pgd(self.view, x, y, mid, p, steps=steps, restarts=restarts, generator=generator)
            points.append(found.x_adv.detach())
            radii.append(mid)
            broken = found.margin <= 0
            upper = torch.where(broken, mid, upper)
            lower = torch.where(broken, lower, mid)
        if not points:  # no attack (rounds = 0): no evidence points
            return upper, x.new_zeros((0, *x.shape)), upper.new_zeros((0, len(x)))
        return upper, torch.stack(points), torch.stack(radii)

    def _search_bound(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, p: float,
                      method: str, witnesses: torch.Tensor) -> torch.Tensor:
        """``min_j`` margin lower bounds for the radius search; -inf where the relaxation fails at this eps.

        auto_LiRPA 0.7.x's reciprocal asserts a positive input, which LayerNorm's loose bounds
        break at large L2 radii: such an eps is not certified (sound), and the search goes lower.
        """
        try:
            return self.margin_bounds(x, y, eps, p, method, witnesses).min_lower
        except UnsupportedModelError as exc:
            if isinstance(exc, ContradictionError) or not isinstance(exc.__cause__, AssertionError):
                raise
            return torch.full((len(x),), -math.inf, device=x.device)

    def certified_radius(self, x: torch.Tensor, y: torch.Tensor, norm: str | float = "inf",
                         method: str = "crown", eps_max: float | None = None, tol: float = 1e-3,
                         attack_steps: int = 10, attack_restarts: int = 1, attack_rounds: int = 3,
                         max_passes: int = 40,
                         generator: torch.Generator | None = None) -> RadiusResult:
        """Per-example certified radii: all examples searched at once (theory.md §2.1).

        Each example's bracket starts at ``[0, attack upper end]`` (eps = 0 is certified for a
        correctly classified point; PGD broke it at the upper end, so no sound method certifies
        there). Every pass of the bound method evaluates one eps per unfinished example (one
        batched call, per-example radii), chosen by a safeguarded root search on
        ``g(eps) = min_j lower bound of m_j`` (``_RootSearch``): a model of ``g`` through the
        evaluated points, steps that straddle the root by less than ``tol`` once it is
        located, and bisection whenever the bracket does not halve in three passes. The
        search stops when ``uncertified - radius <= tol``. The returned radius is an eps at
        which a pass of ``method`` certified the point, so ``margin_bounds`` at it certifies.
        Examples whose clean prediction is wrong get radius 0 and ``correct = False``.
        The attack (``attack_*``) supplies the bracket's upper end ``upper`` (an estimate), and its points
        are evidence every pass's bounds are checked on (``margin_bounds``'s ``witnesses``).
        """
        method, p = self.check(method, norm)
        if tol <= 0:
            raise BoundsError(f"the radius tolerance must be positive, got {tol}")
        x, y, _ = self._inputs(x, y, 0.0)
        eps_max = float(eps_max) if eps_max is not None else default_eps_max(p, self.input_shape)
        check_eps(eps_max)
        with torch.no_grad():
            clean = min_margin(self.view(x), y)
        correct = clean > 0
        n = len(x)
        radius = torch.zeros(n, device=self.device)
        uncertified = torch.zeros(n, device=self.device)
        upper = torch.zeros(n, device=self.device)
        result = RadiusResult(radius, uncertified, upper, correct, method, p, float(tol))
        idx = correct.nonzero().flatten()
        if len(idx) == 0:
            return result
        xs, ys = x[idx], y[idx]
        first_order = self.first_order_radius(xs, ys, p)
        upper[idx], attack_points, attack_radii = self.attack_upper(xs, ys, p, eps_max, first_order, attack_steps,
                                                                    attack_restarts, attack_rounds, generator)
        search = _RootSearch(clean[idx], first_order, upper[idx], tol)
        for _ in range(max_passes):
            active = search.active()
            if len(active) == 0:
                break
            eps = search.next_eps(active)
            inside = (attack_radii[:, active] <= eps).view(len(attack_radii), len(active), *([1] * (xs.dim() - 1)))
            witnesses = torch.where(inside, attack_points[:, active], xs[active].unsqueeze(0))
            g = self._search_bound(xs[active], ys[active], eps, p, method, witnesses)
            search.update(active, eps, g)
            result.passes += 1
            result.pass_eps.append(eps.detach().cpu())
        radius[idx], uncertified[idx] = search.lo, search.hi
        return result


def _power_model_root(m0: float, s0: float, points: list[tuple[float, float]], power: float, lo: float,
                      hi: float) -> float | None:
    """Root in [lo, hi] of ``m0 - s0 e - c e**k`` through one point (k = ``power``) or two (k fitted).

    None when the model does not fit (a point above the first-order line: ``c <= 0``).
    """
    loss = [(e, m0 - s0 * e - g) for e, g in points]
    if any(d <= 0 or e <= 0 for e, d in loss):
        return None
    (e1, d1) = loss[0]
    if len(loss) == 2 and abs(math.log(loss[1][0] / e1)) > 1e-6:
        power = min(max(math.log(loss[1][1] / d1) / math.log(loss[1][0] / e1), 1.2), 6.0)
    c = d1 / e1 ** power

    def model(e: float) -> float:
        return float(m0 - s0 * e - c * e ** power)

    if model(lo) <= 0 or model(hi) > 0:
        return None
    for _ in range(60):  # the model decreases on [0, inf): bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model(mid) > 0 else (lo, mid)
    return lo


def _interpolated_root(points: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    """Root in (lo, hi) of the quadratic through three points (the one nearest the secant's), else the secant's."""
    (e1, g1), (e2, g2) = points[0], points[1]
    if g1 == g2:
        return None
    secant = e1 - g1 * (e1 - e2) / (g1 - g2)
    if len(points) < 3 or len({q[0] for q in points}) < 3:
        return secant
    a, b, c = np.polyfit([q[0] for q in points], [q[1] for q in points], 2)
    roots = [r.real for r in np.roots([a, b, c]) if abs(r.imag) < 1e-12 and lo < r.real < hi]
    return min(roots, key=lambda r: abs(r - secant)) if roots else secant


class _RootSearch:
    """Per-example safeguarded search for the largest eps with ``g(eps) > 0`` (see ``certified_radius``).

    ``lo`` is always an eps that was certified (0 at the start), ``hi`` one that was not (or
    the attack's upper end). The model of the bound curve is
    ``g(e) = m0 - s0 e - c e**k``: ``g(0) = m0`` is the clean margin, ``s0 = m0 / r0`` the
    first-order slope and ``c e**k`` (c > 0) the relaxation's growing looseness, fitted
    through the one or two evaluated points nearest the root (``k = 2.5`` with one point).
    """

    FIRST_GUESS = 0.4  # typical CROWN radius / first-order radius (PGD-trained digits CNNs)
    DEFAULT_POWER = 2.5  # fits CROWN's curves best among 2..4 (L-inf and L2, digits CNN)
    KEEP_OFF_ENDS = 0.05  # never evaluate closer than this fraction of the bracket to its ends

    def __init__(self, clean: torch.Tensor, first_order: torch.Tensor, upper: torch.Tensor, tol: float):
        self.tol = tol
        self.lo = torch.zeros_like(upper)
        self.hi = upper.clone()
        self.first_order = first_order.clamp_min(1e-12)
        self.clean = clean
        self.history: list[list[tuple[float, float]]] = [[] for _ in range(len(upper))]
        self.widths: list[list[float]] = [[float(u)] for u in upper]

    def active(self) -> torch.Tensor:
        return ((self.hi - self.lo) > self.tol).nonzero().flatten()

    def _model_root(self, i: int) -> float | None:
        """The next estimate of the root in (lo, hi), or None when no model fits.

        No point yet: ``FIRST_GUESS * r0``. One or two points: the root of
        ``m0 - s0 e - c e**k`` through them (``k = DEFAULT_POWER`` with one point). More: the
        quadratic through the three evaluated points nearest the root.
        """
        r0 = float(self.first_order[i])
        points = self.history[i]
        lo, hi = float(self.lo[i]), float(self.hi[i])
        if not points:
            return self.FIRST_GUESS * r0
        m0 = float(self.clean[i])
        if len(points) <= 2:
            root = _power_model_root(m0, m0 / r0, points, self.DEFAULT_POWER, lo, hi)
            if root is None and len(points) == 2:
                root = _interpolated_root(points, lo, hi)
        else:
            root = _interpolated_root(sorted(points, key=lambda q: abs(q[1]))[:3], lo, hi)
        return root if root is not None and lo < root < hi else None

    def next_eps(self, active: torch.Tensor) -> torch.Tensor:
        out = []
        for i in active.tolist():
            lo, hi = float(self.lo[i]), float(self.hi[i])
            width = hi - lo
            widths = self.widths[i]
            root = self._model_root(i)
            if root is None or (len(widths) >= 4 and width > 0.5 * widths[-4]):
                eps = (lo + hi) / 2  # bisection: the model failed or the bracket stopped shrinking
            elif self.history[i] and hi - root < self.tol:
                eps = hi - 0.9 * self.tol  # certifying this closes the bracket
            elif self.history[i] and root - lo < self.tol:
                eps = lo + 0.9 * self.tol  # failing here closes the bracket
            else:
                eps = root
            margin = self.KEEP_OFF_ENDS * width
            out.append(min(max(eps, lo + margin), hi - margin))
        return torch.tensor(out, dtype=self.lo.dtype, device=self.lo.device)

    def update(self, active: torch.Tensor, eps: torch.Tensor, g: torch.Tensor) -> None:
        certified = g > 0
        for k, i in enumerate(active.tolist()):
            if math.isfinite(float(g[k])):  # a failed bound (-inf) says nothing about the curve's shape
                self.history[i].append((float(eps[k]), float(g[k])))
            if bool(certified[k]):
                self.lo[i] = eps[k]
            else:
                self.hi[i] = eps[k]
            self.widths[i].append(float(self.hi[i] - self.lo[i]))


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor,
                  norm: str | float = "inf",
                  method: str = "crown", device: str | torch.device = "cpu") -> MarginBounds:
    """One-off ``BoundEngine(model, x.shape[1:]).margin_bounds(...)``; build an engine to reuse it."""
    return BoundEngine(model, x.shape[1:], device=device).margin_bounds(x, y, eps, norm, method)


def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str | float = "inf",
                     method: str = "crown", eps_max: float | None = None, tol: float = 1e-3,
                     device: str | torch.device = "cpu", **search: Any) -> RadiusResult:
    """One-off ``BoundEngine(model, x.shape[1:]).certified_radius(...)``; build an engine to reuse it."""
    return BoundEngine(model, x.shape[1:], device=device).certified_radius(x, y, norm, method, eps_max, tol,
                                                                         **search)
