"""Projected gradient attacks: the empirical upper end of every certificate (theory.md §2).

Everything here is an **estimate**: an attack that fails proves nothing, an
attack that succeeds refutes any certificate at that radius.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bounds.norms import _expand, check_eps, parse_norm, project, random_in_ball, steepest_step


@dataclass
class AttackResult:
    """Per-example attack outcome; ``margin < 0`` means an adversarial example was found."""

    x_adv: torch.Tensor
    margin: torch.Tensor  # (B,) smallest min_j m_j found over all iterates and restarts


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``m_j = f_y - f_j`` for every ``j != y`` (theory.md §1); shape (B, K-1)."""
    k = logits.shape[1]
    true = logits.gather(1, y.view(-1, 1))
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(len(y)), y] = False
    return (true - logits)[others].view(-1, k - 1)


def min_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``min_{j != y} f_y - f_j``; positive exactly when the prediction is ``y``."""
    return margins(logits, y).amin(dim=1)


def pgd_maximize(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str | float = "inf",
    steps: int = 50,
    step_size: float | torch.Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximize a per-example objective over ``B_p(x, eps)`` (intersected with the box).

    ``objective(x')`` returns shape (B,). Steepest ascent for the norm, projection
    onto the ball and the box after every step; the best point of every example
    over all iterates and restarts is kept. Returns ``(x_best, value_best)``.
    ``eps`` may be a scalar or a per-example tensor; ``step_size`` defaults to
    ``2.5 * eps / steps``.
    """
    p = parse_norm(norm)
    check_eps(eps)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(x.shape[0]).clone() if eps_t.dim() == 0 else eps_t
    alpha = 2.5 * eps_t / max(steps, 1) if step_size is None else torch.as_tensor(
        step_size, dtype=x.dtype, device=x.device).expand(x.shape[0])
    x = x.detach()

    def clip_box(z: torch.Tensor) -> torch.Tensor:
        return z if clip is None else z.clamp(*clip)

    with torch.no_grad():
        best_val = objective(x).detach()
    best_x = x.clone()
    for _ in range(max(restarts, 1)):
        delta = random_in_ball(x.shape, p, eps_t, generator, x.device, x.dtype) if random_start \
            else torch.zeros_like(x)
        x_adv = clip_box(x + delta)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            val = objective(x_adv)
            (grad,) = torch.autograd.grad(val.sum(), x_adv)
            with torch.no_grad():
                improved = val.detach() > best_val
                best_val = torch.where(improved, val.detach(), best_val)
                best_x[improved] = x_adv.detach()[improved]
                step = steepest_step(grad, p) * _expand(alpha, grad)
                x_adv = clip_box(x + project(x_adv.detach() + step - x, p, eps_t))
        with torch.no_grad():
            val = objective(x_adv)
            improved = val > best_val
            best_val = torch.where(improved, val, best_val)
            best_x[improved] = x_adv[improved]
    return best_x.detach(), best_val.detach()


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str | float = "inf",
    steps: int = 50,
    step_size: float | torch.Tensor | None = None,
    restarts: int = 1,
    loss: str = "margin",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """PGD (Madry et al.) under L-inf or L2 on the margin (CW) or cross-entropy loss.

    Returns the adversarial points and, per example, the smallest margin
    ``min_j f_y - f_j`` seen at any iterate (the empirical upper bound that every
    certified lower bound must stay below).
    """
    if loss not in ("margin", "ce"):
        raise ValueError(f"unknown attack loss {loss!r}: use margin or ce")
    seen = {"margin": None}

    def objective(z: torch.Tensor) -> torch.Tensor:
        logits = model(z)
        m = min_margin(logits, y)
        md = m.detach()
        seen["margin"] = md if seen["margin"] is None else torch.minimum(seen["margin"], md)
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return -m

    x_adv, _ = pgd_maximize(objective, x, eps, norm, steps, step_size, restarts, random_start, generator)
    return AttackResult(x_adv=x_adv, margin=seen["margin"])


def attack_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    norm: str | float = "inf", steps: int = 20, restarts: int = 1,
                    generator: torch.Generator | None = None) -> float:
    """Fraction of points whose margin stays positive under PGD (robust accuracy, an estimate)."""
    if len(y) == 0:
        return math.nan
    res = pgd(model, x, y, eps, norm, steps=steps, restarts=restarts, generator=generator)
    return float((res.margin > 0).float().mean())
