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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bounds.attack import min_margin, pgd
from bounds.errors import BoundsError
from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
from bounds.norms import check_eps, norm_name, parse_norm
from bounds.view import check_graph_supported, check_modules, verification_view

BOUND_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
BOUND_NORMS = (math.inf, 2.0)
_LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}
# auto_LiRPA 0.3 needs this for alpha-CROWN (a shape error when > 90 % of a layer's neurons are unstable)
BOUND_OPTS = {"sparse_features_alpha": False}


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


def _per_example_conv_class(lirpa):
    """auto_LiRPA's convolution with per-example L2 radii in IBP (0.3 multiplies a (C,) norm by eps).

    Only the case this class adds is new: an L2 ball of radius ``eps_i`` (a tensor) around
    the input read directly by the convolution; then every output of channel k lies within
    ``||W_k||_2 * eps_i`` of the clean output (Cauchy-Schwarz; zero padding only removes
    terms). Every other case is auto_LiRPA's own code.
    """
    from auto_LiRPA.operators.base import Interval

    class BoundConvPerExampleEps(lirpa.operators.BoundConv):
        lirpa_kind = "BoundConv"

        def interval_propagate(self, *v, C=None):
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


def bounded_module(module: nn.Module, example_inputs):
    """auto_LiRPA's ``BoundedModule`` of ``module`` with the options certkd needs (per-example eps, 0.3 fixes).

    Callers must pass a verification view (or a module built from one) and run
    ``bounds.view.check_graph_supported`` on the result before computing any bound.
    """
    lirpa = import_auto_lirpa()
    device = example_inputs[0].device if isinstance(example_inputs, tuple) else example_inputs.device
    return lirpa.BoundedModule(module, example_inputs, bound_opts=dict(BOUND_OPTS), device=str(device),
                               custom_ops={"onnx::Conv": _per_example_conv_class(lirpa)})


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
    with it: about 0.6 GB per example for LeNet on MNIST; auto_lirpa_notes.md).
    """

    def __init__(self, model: nn.Module, input_shape, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        self.device = torch.device(device)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.batch_size = int(batch_size)
        self.view = verification_view(model, self.input_shape).to(self.device)
        self.version = auto_lirpa_version()
        check_modules(self.view, self.version)
        example = torch.zeros((1, *self.input_shape), device=self.device)
        with torch.no_grad():
            self.num_classes = int(self.view(example).shape[1])
        if self.num_classes < 2:
            raise BoundsError("margins need a model with at least 2 outputs")
        self.bounded = bounded_module(self.view, example)
        self._lirpa = import_auto_lirpa()
        self._checked: set[tuple[str, float]] = set()

    def check(self, method: str, norm: str | float) -> tuple[str, float]:
        """Validate ``method`` and ``norm`` and run the allow-list for them (cached)."""
        key = (check_method(method), check_bound_norm(norm))
        if key not in self._checked:
            check_graph_supported(self.bounded, key[0], key[1], self.version)
            self._checked.add(key)
        return key

    def _inputs(self, x: torch.Tensor, y: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        y = torch.as_tensor(y).long().to(self.device)
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

    def _perturbation(self, x: torch.Tensor, eps: torch.Tensor, p: float):
        if math.isinf(p):
            e = eps.view(-1, *([1] * (x.dim() - 1)))
            return self._lirpa.PerturbationLpNorm(norm=math.inf, eps=float(eps.max()),
                                                  x_L=(x - e).clamp(0.0, 1.0), x_U=(x + e).clamp(0.0, 1.0))
        same = bool((eps == eps[0]).all())
        return self._lirpa.PerturbationLpNorm(norm=p, eps=float(eps[0]) if same else eps.view(-1, 1))

    def _lower(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, p: float, method: str) -> torch.Tensor:
        """One auto_LiRPA call: lower bounds (B, K-1) of the margins (no chunking, no checks)."""
        bounded_x = self._lirpa.BoundedTensor(x, self._perturbation(x, eps, p))
        spec = margin_spec(y, self.num_classes)
        if method == "alpha-crown":  # needs autograd; leaves .grad behind
            with torch.enable_grad():
                lower, _ = self.bounded.compute_bounds(x=(bounded_x,), C=spec, method=_LIRPA_METHODS[method],
                                                       bound_upper=False)
            for param in self.bounded.parameters():
                param.grad = None
            return lower.detach()
        with torch.no_grad():
            lower, _ = self.bounded.compute_bounds(x=(bounded_x,), C=spec, method=_LIRPA_METHODS[method],
                                                   bound_upper=False)
        return lower

    def margin_bounds(self, x: torch.Tensor, y: torch.Tensor, eps, norm: str | float = "inf",
                      method: str = "crown") -> MarginBounds:
        """Lower bounds of ``f_y - f_j`` over ``B_p(x, eps)`` for every ``j != y`` (theory.md §2.1).

        ``eps`` is a number or a (B,) tensor (one radius per example). Processes ``x`` in
        chunks of ``batch_size``.
        """
        method, p = self.check(method, norm)
        x, y, eps_t = self._inputs(x, y, eps)
        parts = [self._lower(x[i:i + self.batch_size], y[i:i + self.batch_size], eps_t[i:i + self.batch_size],
                             p, method) for i in range(0, x.shape[0], self.batch_size)]
        lower = torch.cat(parts) if parts else torch.zeros(0, self.num_classes - 1, device=self.device)
        min_lower = lower.amin(dim=1)
        return MarginBounds(lower=lower, min_lower=min_lower, certified=min_lower > 0, eps=eps_t,
                            method=method, norm=p)

    def certified_radius(self, x: torch.Tensor, y: torch.Tensor, norm: str | float = "inf",
                         method: str = "crown", eps_max: float | None = None, tol: float = 1e-3,
                         attack_steps: int = 20, attack_restarts: int = 1,
                         generator: torch.Generator | None = None) -> RadiusResult:
        """Per-example certified radii by a joint search (theory.md §2.1); see ``certified_radius``."""
        raise NotImplementedError


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str | float = "inf",
                  method: str = "crown", device: str | torch.device = "cpu") -> MarginBounds:
    """One-off ``BoundEngine(model, x.shape[1:]).margin_bounds(...)``; build an engine to reuse it."""
    return BoundEngine(model, x.shape[1:], device=device).margin_bounds(x, y, eps, norm, method)
