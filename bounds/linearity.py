"""Local linearity of the loss and of the margins (theory.md §3; Qin et al. 2019).

For a scalar function ``h`` of the input (the per-example cross-entropy, or a
margin ``m_j = f_y - f_j``), the linearity gap at ``x`` is

    g_h(delta; x) = h(x + delta) - h(x) - delta^T grad h(x)

and the local linearity is ``gamma_h(eps, x) = max_{delta in B_p(eps)} |g_h(delta; x)|``
(the ball intersected with the box [0, 1]^d, theory.md §1).

- ``gamma_estimate``: PGD maximizes ``+g_h`` and ``-g_h`` (restarts, random starts),
  a lower end of gamma: an **estimate**.
- ``gamma_certified``: bound propagation (auto_LiRPA, CROWN or CROWN-IBP) on the
  composite ``delta -> h(x + delta) - delta^T c`` with ``c = grad h(x)`` a constant
  gives an upper end of gamma: **certified**.

``target`` names ``h``: ``"ce"`` (one value per example, M = 1) or ``"margin"``
(the K-1 margins ``j != y`` in increasing order of j, M = K-1).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bounds.attack import margins, pgd_maximize
from bounds.bound_methods import GAMMA_METHODS, LIRPA_NAMES
from bounds.errors import BoundsError
from bounds.gradients import InputGradients, loss_gradient, margin_gradients, other_classes
from bounds.graph import GraphCheck, lirpa_call
from bounds.norms import check_eps, parse_norm

CE = "ce"
MARGIN = "margin"
TARGETS = (CE, MARGIN)
_LIRPA_METHOD = LIRPA_NAMES
ESTIMATE = "estimate"
CERTIFIED = "certified"


@dataclass
class Linearity:
    """``gamma_h(eps, x)`` per example and output; ``kind`` is ``estimate`` (PGD) or ``certified``."""

    gamma: torch.Tensor  # (B, M)
    value: torch.Tensor  # (B, M): h(x)
    kind: str
    target: str
    eps: float
    norm: float


@dataclass
class ScalarBounds:
    """Certified bounds of ``h(x + delta) - delta^T c`` over the ball, per example and output (B, M).

    ``center`` is the same function at ``delta = 0``, i.e. ``h(x)``, evaluated by the same
    float64 network; ``lower <= center <= upper``. All float64.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    center: torch.Tensor


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise BoundsError(f"unknown linearity target {target!r}: use one of {', '.join(TARGETS)}")


def scalar_values(logits: torch.Tensor, y: torch.Tensor, target: str) -> torch.Tensor:
    """``h`` from the logits: CE as (B, 1), or the margins ``m_j, j != y`` as (B, K-1) (theory.md §1)."""
    _check_target(target)
    if target == CE:
        return F.cross_entropy(logits, y, reduction="none").unsqueeze(1)
    return margins(logits, y)


def scalar_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: str) -> InputGradients:
    """``h(x)`` (B, M) and ``grad h(x)`` (B, M, *x.shape[1:]) per example (bounds.gradients)."""
    _check_target(target)
    if target == CE:
        g = loss_gradient(model, x, y)
        return InputGradients(g.value.unsqueeze(1), g.grad.unsqueeze(1))
    return margin_gradients(model, x, y)


def linearity_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, target: str,
                  grads: InputGradients | None = None) -> torch.Tensor:
    """``g_h(delta; x) = h(x + delta) - h(x) - delta^T grad h(x)``, shape (B, M) (theory.md §3)."""
    grads = scalar_gradients(model, x, y, target) if grads is None else grads
    with torch.no_grad():
        h = scalar_values(model(x + delta), y, target)
        slope_term = torch.einsum("bmd,bd->bm", grads.grad.flatten(2), delta.flatten(1))
    return h - grads.value - slope_term


def gamma_estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str | float = "inf",
                   target: str = CE, steps: int = 40, restarts: int = 2, step_size: float | None = None,
                   generator: torch.Generator | None = None,
                   grads: InputGradients | None = None) -> Linearity:
    """Lower end of ``gamma_h(eps, x)`` by PGD on ``+g_h`` and ``-g_h`` (**estimate**, theory.md §3).

    Every (example, output, sign) is one row of a single ``bounds.attack.pgd_maximize``
    call over the ball intersected with the box; ``gamma = max(best +g, best -g) >= 0``.
    """
    p = parse_norm(norm)
    check_eps(eps)
    grads = scalar_gradients(model, x, y, target) if grads is None else grads
    b, m = grads.value.shape
    rows = 2 * m  # per example: output 0 with signs +, -, output 1 with signs +, -, ...
    x_rows = x.detach().repeat_interleave(rows, 0)
    y_rows = y.repeat_interleave(rows)
    output = torch.arange(m, device=x.device).repeat_interleave(2).repeat(b)
    sign = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).repeat(b * m)
    value0 = grads.value.reshape(-1).repeat_interleave(2)
    slope = grads.grad.flatten(2).reshape(b * m, -1).repeat_interleave(2, 0)

    def signed_gap(z: torch.Tensor) -> torch.Tensor:
        h = scalar_values(model(z), y_rows, target).gather(1, output.view(-1, 1)).squeeze(1)
        return sign * (h - value0 - ((z - x_rows).flatten(1) * slope).sum(1))

    _, best = pgd_maximize(signed_gap, x_rows, eps, p, steps, step_size, restarts, generator=generator)
    gamma = best.view(b, m, 2).amax(2).clamp_min(0.0)
    return Linearity(gamma=gamma, value=grads.value, kind=ESTIMATE, target=target, eps=float(eps), norm=p)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """auto_LiRPA 0.3 makes some constants in the default dtype: float64 bounds need it set meanwhile."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class _BoundedScalar(Protocol):
    """What ``LinearityBounder`` calls on an auto_LiRPA ``BoundedModule`` (auto_LiRPA has no type hints)."""

    def compute_bounds(self, *, x: tuple[torch.Tensor, ...], method: str) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class _SlopedScalar(nn.Module):
    """``(x', x, c, onehot, shift) -> h(x') - (x' - x)^T c`` for every output of ``h`` (B, M).

    CE is ``log(sum(exp(z) * exp(-s))) + s - z_y`` with ``s`` the clean max logit: auto_LiRPA 0.3
    has no ``ReduceLogSumExp``, and ``z - s`` fails in its patches mode (a Sub node of logits);
    the product form is the same function. Margins: all K values ``z_y - z_j`` (the column
    j = y is 0 and is dropped by the caller). Every fixed tensor is an extra unperturbed input
    (docs/auto_lirpa.md: buffers with a batch dimension fail).
    """

    def __init__(self, view: nn.Module, target: str):
        super().__init__()
        self.view = view
        self.target = target

    def forward(self, x_pert: torch.Tensor, x: torch.Tensor, slope: torch.Tensor, onehot: torch.Tensor,
                shift: torch.Tensor) -> torch.Tensor:
        z = self.view(x_pert)
        true_logit = torch.sum(z * onehot, dim=1, keepdim=True)
        if self.target == CE:
            h = torch.log(torch.sum(torch.exp(z) * torch.exp(-shift), dim=1, keepdim=True)) + shift - true_logit
        else:
            h = true_logit - z
        linear = torch.sum((x_pert - x).flatten(1).unsqueeze(1) * slope, dim=2)
        return h - linear


class LinearityBounder:
    """Certified bounds of ``h(x + delta) - delta^T c`` for one model (theory.md §3), reusable over batches.

    The model goes through ``bounds.view.verification_view`` and the allow-list
    ``bounds.view.check_supported`` (no path bypasses them), then into a float64
    ``BoundedModule`` of the composite ``_SlopedScalar`` (float64: no overflow of
    ``exp`` and little rounding in ``upper - h(x)``). Methods: ``GAMMA_METHODS``;
    norms: those of ``bounds.certify.BOUND_NORMS``.

    The operators the composite adds around the view are outside the view's allow-list
    and were checked separately (tests/test_linearity.py, with large arbitrary slopes
    so that a dropped ``delta^T c`` term would show): ``x' - x`` times an unperturbed
    input (auto_LiRPA's product relaxation is exact when one factor has equal lower and
    upper bounds, whatever the bounds of the other), sums, ``exp`` and ``log``.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], method: str = "crown",
                 norm: str | float = "inf", device: str | torch.device = "cpu"):
        if method not in GAMMA_METHODS:
            raise BoundsError(f"certified linearity supports {', '.join(GAMMA_METHODS)}, not {method!r}")
        from bounds.certify import check_bound_norm
        from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
        from bounds.view import check_supported, verification_view

        self.lirpa = import_auto_lirpa()
        self.version = auto_lirpa_version()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.method = method
        self.norm = check_bound_norm(norm)
        self.device = torch.device(device)
        # the composite is proven on the 0.3 table only: transformers stay refused on every backend
        view = check_supported(verification_view(model, self.input_shape, transformers=False), method, norm,
                               self.input_shape, baseline=True)
        self.view = copy.deepcopy(view).to(self.device, torch.float64).eval()
        self._bounded_modules: dict[tuple[str, int], _BoundedScalar] = {}
        self.batch_size: int | None = None  # examples per bound pass (None: the whole batch; certkd.memory plans it)

    def _bounded(self, target: str, inputs: tuple[torch.Tensor, ...]) -> _BoundedScalar:
        key = (target, inputs[0].shape[0])
        if key not in self._bounded_modules:
            with _default_dtype(torch.float64), lirpa_call("build its graph of this model", self.version):
                self._bounded_modules[key] = self.lirpa.BoundedModule(_SlopedScalar(self.view, target), inputs,
                                                              device=self.device)
        return self._bounded_modules[key]

    def bounds(self, x: torch.Tensor, y: torch.Tensor, eps: float, target: str,
               slope: torch.Tensor | None = None) -> ScalarBounds:
        """Bounds of ``h(x + delta) - delta^T slope`` over ``B_p(x, eps)`` (L-inf: intersected with the box).

        ``slope`` is (B, M, *input) (``grad h(x)`` gives gamma; None means 0, i.e. bounds of
        ``h`` itself). Non-finite bounds become -inf / +inf (still sound). At most
        ``batch_size`` examples go through one bound pass (each example's bounds depend on
        that example only, so chunking changes no value).
        """
        step = self.batch_size or max(len(x), 1)
        if len(x) <= step:
            return self._bounds_pass(x, y, eps, target, slope)
        parts = [self._bounds_pass(x[i:i + step], y[i:i + step], eps, target,
                                   None if slope is None else slope[i:i + step]) for i in range(0, len(x), step)]
        return ScalarBounds(lower=torch.cat([p.lower for p in parts]), upper=torch.cat([p.upper for p in parts]),
                            center=torch.cat([p.center for p in parts]))

    def _bounds_pass(self, x: torch.Tensor, y: torch.Tensor, eps: float, target: str,
                     slope: torch.Tensor | None) -> ScalarBounds:
        """One auto_LiRPA pass of ``bounds`` over the whole of ``x``."""
        _check_target(target)
        check_eps(eps)
        dt = torch.float64
        x64 = x.detach().to(self.device, dt)
        b = x64.shape[0]
        with torch.no_grad():
            logits = self.view(x64)
        k = logits.shape[1]
        m = 1 if target == CE else k - 1
        slope = torch.zeros(b, m, *x.shape[1:]) if slope is None else slope
        slope = slope.detach().to(self.device, dt).flatten(2)
        if target == MARGIN:  # scatter the K-1 slopes into K columns, zero at j = y
            full = torch.zeros(b, k, slope.shape[2], dtype=dt, device=self.device)
            full.scatter_(1, other_classes(y, k).to(self.device).unsqueeze(2).expand_as(slope), slope)
            slope = full
        onehot = F.one_hot(y.to(self.device), k).to(dt)
        shift = logits.amax(1, keepdim=True)
        inputs = (x64, x64, slope, onehot, shift)
        module = self._bounded(target, inputs)
        if math.isinf(self.norm):
            ptb = self.lirpa.PerturbationLpNorm(norm=math.inf, eps=float(eps), x_L=(x64 - eps).clamp(0.0, 1.0),
                                                x_U=(x64 + eps).clamp(0.0, 1.0))
        else:  # the full L-p ball, a superset of its intersection with the box: still sound
            ptb = self.lirpa.PerturbationLpNorm(norm=self.norm, eps=float(eps))
        repeat = lambda points: tuple(t.repeat(len(points) // b, *([1] * (t.dim() - 1))) for t in inputs[1:])  # noqa: E731
        GraphCheck(module, _SlopedScalar(self.view, target), self.version, repeat).check(
            x64, torch.full((b,), float(eps), dtype=dt, device=self.device), self.norm)
        bounded_x = self.lirpa.BoundedTensor(x64, ptb)
        with torch.no_grad(), _default_dtype(torch.float64), lirpa_call(f"bound this model with {self.method}",
                                                                        self.version):
            lower, upper = module.compute_bounds(x=(bounded_x, *inputs[1:]), method=_LIRPA_METHOD[self.method])
            center = _SlopedScalar(self.view, target)(*inputs)
        lower = torch.where(torch.isfinite(lower), lower, torch.full_like(lower, -math.inf))
        upper = torch.where(torch.isfinite(upper), upper, torch.full_like(upper, math.inf))
        if target == MARGIN:
            keep = torch.ones(b, k, dtype=torch.bool, device=self.device)
            keep[torch.arange(b), y.to(self.device)] = False
            lower, upper, center = (t[keep].view(b, k - 1) for t in (lower, upper, center))
        return ScalarBounds(lower=lower.to(x.device), upper=upper.to(x.device), center=center.to(x.device))

    def gamma(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, target: str,
              grads: InputGradients | None = None) -> Linearity:
        """Upper end of ``gamma_h(eps, x)`` (**certified**): ``max(upper - h(x), h(x) - lower)``, float64."""
        grads = scalar_gradients(model, x, y, target) if grads is None else grads
        b = self.bounds(x, y, eps, target, grads.grad)
        gamma = torch.maximum(b.upper - b.center, b.center - b.lower).clamp_min(0.0)
        return Linearity(gamma=gamma, value=b.center, kind=CERTIFIED, target=target, eps=float(eps),
                         norm=self.norm)


def gamma_certified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str | float = "inf",
                    target: str = CE, method: str = "crown",
                    grads: InputGradients | None = None) -> Linearity:
    """Upper end of ``gamma_h(eps, x)`` by bound propagation (**certified**, theory.md §3)."""
    bounder = LinearityBounder(model, tuple(x.shape[1:]), method, norm, x.device)
    return bounder.gamma(model, x, y, eps, target, grads)


def robust_loss_upper(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str | float = "inf",
                      method: str = "crown") -> torch.Tensor:
    """Certified upper bound of ``max_{x' in ball} CE(f(x'), y)`` per example, shape (B,)."""
    bounder = LinearityBounder(model, tuple(x.shape[1:]), method, norm, x.device)
    return bounder.bounds(x, y, eps, CE).upper[:, 0]
