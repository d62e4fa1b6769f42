"""The transfer bound and transfer certificates from a teacher to its student (theory.md §3).

Loss form, for every ``delta`` in the ball (Taylor at ``x`` + Hoelder):

    loss_S(x+delta) <= loss_T(x+delta) + [loss_S(x) - loss_T(x)]
                       + eps * ||grad loss_S(x) - grad loss_T(x)||_q + gamma_S(eps, x) + gamma_T(eps, x)

so ``robust_S <= robust_T + output gap + eps * gradient gap + gamma_S + gamma_T``.
``transfer_bound`` computes every term per example twice: with PGD estimates of the
gammas and of the teacher's robust loss (an **estimate**: it may fail), and, on
request, with certified gammas and a certified upper bound of the teacher's robust
loss (**certified**: it is never below the student's robust loss, hence never
below a PGD-measured one).

Margin form: a certified lower bound of the teacher's margins minus
``|m^S_j(x) - m^T_j(x)|``, ``eps * ||grad m^S_j - grad m^T_j||_q`` and both certified
gammas is a certified lower bound of the student's margins: a *transfer certificate*
(``transfer_certificate``), compared with certifying the student directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bounds.attack import pgd_maximize
from bounds.evidence import refuse_if_exceeded
from bounds.gradients import InputGradients
from bounds.linearity import CE, MARGIN, LinearityBounder, gamma_estimate, scalar_gradients
from bounds.norms import batch_norm, check_eps, dual_norm, parse_norm

if TYPE_CHECKING:  # annotations only: bounds.certify (and auto_LiRPA) load when an engine is built
    from bounds.certify import BoundEngine


@dataclass
class BoundCheck:
    """How an upper bound compares with a measured value, per example: ``slack = bound - measured``."""

    holds: torch.Tensor  # (B,) bool: bound >= measured
    slack: torch.Tensor  # (B,)


@dataclass
class TransferBound:
    """Per-example terms of the loss transfer bound (theory.md §3); every field is (B,).

    ``robust_student`` / ``robust_teacher``: PGD maxima of the CE over the ball (**estimates**,
    lower ends of the robust losses). ``bound``: the bound with PGD gammas and the teacher's
    PGD robust loss (**estimate**). The ``*_certified`` fields (None unless requested) use
    certified gammas and ``robust_teacher_upper``, a certified upper bound of the teacher's
    robust loss: ``bound_certified`` is **certified** (>= the student's true robust loss).
    """

    eps: float
    norm: float
    loss_student: torch.Tensor
    loss_teacher: torch.Tensor
    output_gap: torch.Tensor  # loss_S(x) - loss_T(x), signed
    gradient_gap: torch.Tensor  # ||grad loss_S(x) - grad loss_T(x)||_q
    robust_student: torch.Tensor
    robust_teacher: torch.Tensor
    gamma_student: torch.Tensor
    gamma_teacher: torch.Tensor
    bound: torch.Tensor
    gamma_student_certified: torch.Tensor | None = None
    gamma_teacher_certified: torch.Tensor | None = None
    robust_teacher_upper: torch.Tensor | None = None
    bound_certified: torch.Tensor | None = None

    def check(self, certified: bool = False) -> BoundCheck:
        """The estimated (or certified) bound against the student's PGD-measured robust loss."""
        bound = self.bound_certified if certified else self.bound
        if bound is None:
            raise ValueError("this TransferBound was computed without certified terms")
        return bound_check(bound, self.robust_student)


@dataclass
class TransferCertificate:
    """Margin-form transfer (theory.md §3); margin fields are (B, K-1), flags (B,).

    ``student_lower = teacher_lower - margin_gap - gradient_term - gamma_student - gamma_teacher``
    is a certified lower bound of every student margin over the ball; ``through_transfer``
    where its minimum is > 0. ``direct``: the student certified by bound propagation itself.
    """

    eps: float
    norm: float
    teacher_lower: torch.Tensor
    margin_gap: torch.Tensor  # |m^S_j(x) - m^T_j(x)|
    gradient_term: torch.Tensor  # eps * ||grad m^S_j(x) - grad m^T_j(x)||_q
    gamma_student: torch.Tensor
    gamma_teacher: torch.Tensor
    student_lower: torch.Tensor
    student_direct_lower: torch.Tensor
    through_transfer: torch.Tensor
    direct: torch.Tensor

    def counts(self) -> dict[str, int]:
        """Points certified by both routes, through transfer only, directly only, by neither."""
        t, d = self.through_transfer, self.direct
        return {"both": int((t & d).sum()), "transfer_only": int((t & ~d).sum()),
                "direct_only": int((~t & d).sum()), "neither": int((~t & ~d).sum())}


def bound_check(bound: torch.Tensor, measured: torch.Tensor) -> BoundCheck:
    """``holds = bound >= measured`` and ``slack = bound - measured`` per example, compared in float64."""
    slack = bound.double() - measured.double()
    return BoundCheck(holds=slack >= 0, slack=slack)


def robust_loss_estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                         norm: str | float = "inf", steps: int = 40, restarts: int = 2,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``max_{x' in ball} CE(f(x'), y)`` by PGD on the CE (**estimate**: a lower end), shape (B,)."""
    def ce(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(z), y, reduction="none")

    _, best = pgd_maximize(ce, x, eps, norm, steps, restarts=restarts, generator=generator)
    return best


def gradient_gap(student: InputGradients, teacher: InputGradients, norm: str | float) -> torch.Tensor:
    """``||grad h_S(x) - grad h_T(x)||_q`` in the dual norm q of ``norm``, per example and output (B, M)."""
    q = dual_norm(parse_norm(norm))
    diff = student.grad - teacher.grad  # (B, M, *input)
    b, m = diff.shape[:2]
    return batch_norm(diff.reshape(b * m, -1), q).view(b, m)


def transfer_bound(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   norm: str | float = "inf", certified: bool = False, method: str = "crown",
                   steps: int = 40, restarts: int = 2, generator: torch.Generator | None = None,
                   bounders: tuple[LinearityBounder, LinearityBounder] | None = None) -> TransferBound:
    """Every term of the loss transfer bound per example (theory.md §3).

    ``certified=True`` adds certified gammas and a certified upper bound of the teacher's
    robust loss (bound propagation with ``method``, one of ``GAMMA_METHODS``); pass
    ``bounders=(student_bounder, teacher_bounder)`` to reuse ``LinearityBounder`` s over batches.
    """
    p = parse_norm(norm)
    check_eps(eps)
    grad_s = scalar_gradients(student, x, y, CE)
    grad_t = scalar_gradients(teacher, x, y, CE)
    gap = gradient_gap(grad_s, grad_t, p)[:, 0]
    loss_s, loss_t = grad_s.value[:, 0], grad_t.value[:, 0]
    output_gap = loss_s - loss_t
    robust_s = robust_loss_estimate(student, x, y, eps, p, steps, restarts, generator)
    robust_t = robust_loss_estimate(teacher, x, y, eps, p, steps, restarts, generator)
    gamma_s = gamma_estimate(student, x, y, eps, p, CE, steps, restarts, generator=generator, grads=grad_s).gamma
    gamma_t = gamma_estimate(teacher, x, y, eps, p, CE, steps, restarts, generator=generator, grads=grad_t).gamma
    common = output_gap + eps * gap
    result = TransferBound(
        eps=float(eps), norm=p, loss_student=loss_s, loss_teacher=loss_t, output_gap=output_gap,
        gradient_gap=gap, robust_student=robust_s, robust_teacher=robust_t, gamma_student=gamma_s[:, 0],
        gamma_teacher=gamma_t[:, 0], bound=robust_t + common + gamma_s[:, 0] + gamma_t[:, 0])
    if certified:
        shape = tuple(x.shape[1:])
        bound_s, bound_t = bounders if bounders is not None else (
            LinearityBounder(student, shape, method, p, x.device), LinearityBounder(teacher, shape, method, p, x.device))
        cert_s = bound_s.gamma(student, x, y, eps, CE, grad_s).gamma[:, 0]
        cert_t = bound_t.gamma(teacher, x, y, eps, CE, grad_t).gamma[:, 0]
        upper_t = bound_t.bounds(x, y, eps, CE).upper[:, 0]
        # the evidence gate: attacks found these values inside the balls, so certified bounds must cover them
        refuse_if_exceeded(cert_s, gamma_s[:, 0], "the student's certified gamma")
        refuse_if_exceeded(cert_t, gamma_t[:, 0], "the teacher's certified gamma")
        refuse_if_exceeded(upper_t, robust_t, "the teacher's certified robust loss")
        result.gamma_student_certified = cert_s
        result.gamma_teacher_certified = cert_t
        result.robust_teacher_upper = upper_t
        result.bound_certified = upper_t + common.to(upper_t.dtype) + cert_s + cert_t
    return result


def transfer_certificate(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                         norm: str | float = "inf", method: str = "crown", gamma_method: str = "crown",
                         engines: tuple[BoundEngine, BoundEngine] | None = None,
                         bounders: tuple[LinearityBounder, LinearityBounder] | None = None) -> TransferCertificate:
    """Certify the student through the teacher's certificate (margin form, theory.md §3).

    ``method`` bounds both models' margins (``bounds.certify``: the teacher's for the
    transfer, the student's for the direct route); ``gamma_method`` bounds the margin
    gammas. ``engines`` / ``bounders``: (student, teacher) ``BoundEngine`` /
    ``LinearityBounder`` to reuse over batches.
    """
    from bounds.certify import BoundEngine

    p = parse_norm(norm)
    check_eps(eps)
    shape = tuple(x.shape[1:])
    engine_s, engine_t = engines if engines is not None else (
        BoundEngine(student, shape, device=x.device), BoundEngine(teacher, shape, device=x.device))
    bound_s, bound_t = bounders if bounders is not None else (
        LinearityBounder(student, shape, gamma_method, p, x.device),
        LinearityBounder(teacher, shape, gamma_method, p, x.device))
    grad_s = scalar_gradients(student, x, y, MARGIN)
    grad_t = scalar_gradients(teacher, x, y, MARGIN)
    margin_gap = (grad_s.value - grad_t.value).abs()
    gradient_term = eps * gradient_gap(grad_s, grad_t, p)
    gamma_s = bound_s.gamma(student, x, y, eps, MARGIN, grad_s).gamma
    gamma_t = bound_t.gamma(teacher, x, y, eps, MARGIN, grad_t).gamma
    teacher_lower = engine_t.margin_bounds(x, y, eps, p, method).lower.to(gamma_t.dtype)
    direct = engine_s.margin_bounds(x, y, eps, p, method)
    student_lower = teacher_lower - margin_gap - gradient_term - gamma_s - gamma_t
    # the evidence gate: a lower bound of the student's margins over the ball holds at its centre
    refuse_if_exceeded(-student_lower, -grad_s.value.to(student_lower.dtype), "the transfer certificate")
    return TransferCertificate(
        eps=float(eps), norm=p, teacher_lower=teacher_lower, margin_gap=margin_gap, gradient_term=gradient_term,
        gamma_student=gamma_s, gamma_teacher=gamma_t, student_lower=student_lower,
        student_direct_lower=direct.lower, through_transfer=student_lower.amin(1) > 0,
        direct=direct.certified.bool())
