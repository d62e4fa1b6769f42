"""Projected gradient attacks: the empirical upper end of every certificate (theory.md §2).

Everything here is an **estimate**: an attack that fails proves nothing, an
attack that succeeds refutes any certificate at that radius.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bounds.inputs import check_finite, logits_of, model_dtype
from bounds.norms import (
    _expand,
    batch_norm,
    check_eps,
    default_eps_max,
    parse_norm,
    project,
    random_in_ball,
    steepest_step,
)

ATTACKS = ("apgd", "pgd")
"""The attacks of a radius search (``make_attack``): APGD-CE + targeted APGD-DLR, or PGD on the margin."""


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
    check_finite(x)
    x = x.to(model_dtype(model))  # a float64 (or bfloat16) model is attacked in its own precision
    seen: dict[str, torch.Tensor] = {}  # "margin": running minimum (objective runs first on x itself)

    def objective(z: torch.Tensor) -> torch.Tensor:
        logits = logits_of(model(z), len(z))
        m = min_margin(logits, y)
        md = m.detach()
        seen["margin"] = torch.minimum(seen["margin"], md) if "margin" in seen else md
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


# --------------------------------------------------------------------------- APGD (Croce & Hein 2020)

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass(frozen=True)
class ApgdConfig:
    """Budget and schedule of APGD (Croce & Hein 2020, Algorithm 1; defaults of AutoAttack).

    ``steps`` iterations per run, ``restarts`` random starts per loss (and per target class
    for the targeted DLR loss), ``target_classes`` the number of targets (the strongest wrong
    classes at ``x``), ``momentum`` the weight ``alpha`` of the step, ``rho`` the oscillation
    threshold of the step-size checkpoints.
    """

    steps: int = 20
    restarts: int = 1
    target_classes: int = 3
    momentum: float = 0.75
    rho: float = 0.75

    def budget(self, losses: Sequence[str], num_classes: int) -> int:
        """Gradient evaluations per example of ``apgd_ensemble`` with these ``losses`` (an upper bound)."""
        runs = sum(self.restarts * (self.targets(num_classes) if name == "dlr-targeted" else 1) for name in losses)
        return runs * (self.steps + 1)

    def targets(self, num_classes: int) -> int:
        """Target classes actually used: at most ``num_classes - 1``."""
        return max(1, min(self.target_classes, num_classes - 1))


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, Eq. 6 and 7), per example, to maximize.

    Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``;
    targeted:   ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``
    with ``z_pi1 >= z_pi2 >= ...`` the sorted logits. Shift and scale invariant.
    With fewer than 3 classes the denominator is 1 (the margin loss).

    Examples
    --------
    >>> z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    >>> round(float(dlr_loss(z, torch.tensor([0]))), 3)
    -0.667
    """
    srt = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    if target is None:
        others = logits.clone()
        others[torch.arange(len(y)), y] = -math.inf
        scale = srt[:, 0] - srt[:, 2] + 1e-12 if logits.shape[1] >= 3 else torch.ones_like(z_y)
        return -(z_y - others.amax(dim=1)) / scale
    z_t = logits.gather(1, target.view(-1, 1)).squeeze(1)
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def _apgd_objective(model: torch.nn.Module, y: torch.Tensor, loss: str,
                    target: torch.Tensor | None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x' -> (loss per example, min margin per example)`` for APGD."""

    def objective(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(model(z), len(z))
        if loss == "ce":
            value = F.cross_entropy(logits, y, reduction="none")
        else:
            value = dlr_loss(logits, y, target)
        return value, min_margin(logits, y)

    return objective


class _Best:
    """The point of smallest margin seen so far, per example (what an attack reports)."""

    def __init__(self, x: torch.Tensor, margin: torch.Tensor):
        self.x, self.margin = x.clone(), margin.clone()

    def update(self, x: torch.Tensor, margin: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        rows = torch.arange(len(margin), device=margin.device) if rows is None else rows
        better = margin < self.margin[rows]
        self.margin[rows[better]] = margin[better]
        self.x[rows[better]] = x[better]


def _apgd_start(x: torch.Tensor, p: float, eps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random start on the scaled ball (AutoAttack: a random direction of norm eps), in the box."""
    if math.isinf(p):
        t = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        t = t / _expand(t.flatten(1).abs().amax(1).clamp_min(1e-12), t)
    else:
        t = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        t = t / _expand(t.flatten(1).norm(dim=1).clamp_min(1e-12), t)
    return (x + _expand(eps, x) * t).clamp(0.0, 1.0)


def _apgd_step(x: torch.Tensor, x_adv: torch.Tensor, x_old: torch.Tensor, grad: torch.Tensor, p: float,
               eps: torch.Tensor, step: torch.Tensor, momentum: float) -> torch.Tensor:
    """``z = P(x_k + eta s(grad))``; ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``."""

    def proj(z: torch.Tensor) -> torch.Tensor:
        return (x + project(z - x, p, eps)).clamp(0.0, 1.0)

    z = proj(x_adv + _expand(step, x) * steepest_step(grad, p))
    return proj(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_old))


def _value_and_grad(objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    value, margin = objective(z)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), margin.detach(), grad.detach()


def apgd_run(objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
             eps: torch.Tensor, p: float, config: ApgdConfig, generator: torch.Generator | None) -> _Best:
    """One APGD run from a random start (Croce & Hein 2020, Algorithm 1), batched per example.

    Step size ``eta = 2 eps``; at the checkpoints ``w_j`` (first after ``0.22 N`` steps,
    then ever closer, at least ``0.06 N`` apart) ``eta`` halves for the examples where
    fewer than ``rho`` of the steps since ``w_{j-1}`` increased the loss, or where neither
    ``eta`` nor the best loss changed since ``w_{j-1}``; those restart from their best point.
    Returns the point of smallest margin ``min_j m_j`` seen per example.
    """
    n = config.steps
    interval, min_interval, shrink = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
    x_adv = _apgd_start(x, p, eps, generator)
    value, margin, grad = _value_and_grad(objective, x_adv)
    best = _Best(x_adv, margin)
    best_value, x_best, grad_best = value.clone(), x_adv.clone(), grad.clone()
    step = 2.0 * eps
    x_old = x_adv.clone()
    history = [value]
    reduced = torch.zeros_like(value, dtype=torch.bool)
    value_at_check = best_value.clone()
    since = 0
    for i in range(n):
        with torch.no_grad():
            x_new = _apgd_step(x, x_adv, x_old, grad, p, eps, step, config.momentum if i > 0 else 1.0)
        x_old, x_adv = x_adv, x_new
        value, margin, grad = _value_and_grad(objective, x_adv)
        best.update(x_adv, margin)
        history.append(value)
        improved = value > best_value
        best_value = torch.where(improved, value, best_value)
        x_best[improved], grad_best[improved] = x_adv[improved], grad[improved]
        since += 1
        if since == interval:
            window = torch.stack(history[-interval - 1:])
            increases = (window[1:] > window[:-1]).sum(0)
            halve = (increases < config.rho * interval) | (~reduced & (value_at_check >= best_value))
            reduced, value_at_check = halve, best_value.clone()
            step = torch.where(halve, step / 2, step)
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            x_old[halve] = x_best[halve]
            since, interval = 0, max(interval - shrink, min_interval)
    return best


def _targets(logits: torch.Tensor, y: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The ``count`` strongest wrong classes at ``x`` per example, strongest first."""
    masked = logits.clone()
    masked[torch.arange(len(y)), y] = -math.inf
    order = masked.argsort(dim=1, descending=True)
    return [order[:, k] for k in range(count)]


def apgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor,
         norm: str | float = "inf", loss: str = "ce", config: ApgdConfig | None = None,
         generator: torch.Generator | None = None) -> AttackResult:
    """APGD with one loss (``ce``, ``dlr`` or ``dlr-targeted``), all restarts (and targets); an estimate.

    Returns, per example, the point of smallest margin ``min_j m_j`` over every
    iterate of every run; ``margin < 0`` means an adversarial example was found.
    ``eps`` may be per example (shape (B,)).

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> res = apgd(net, torch.rand(5, 4), torch.zeros(5, dtype=torch.long), 0.1,
    ...            generator=torch.Generator().manual_seed(0))
    >>> res.margin.shape
    torch.Size([5])
    """
    return apgd_ensemble(model, x, y, eps, norm, (loss,), config, generator, stop_early=False)


def apgd_ensemble(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor,
                  norm: str | float = "inf", losses: Sequence[str] = ("ce", "dlr-targeted"),
                  config: ApgdConfig | None = None, generator: torch.Generator | None = None,
                  stop_early: bool = True) -> AttackResult:
    """APGD-CE then targeted APGD-DLR (the attacks of AutoAttack's standard version); an estimate.

    Every run after the first attacks only the examples not yet broken when
    ``stop_early`` (their margin is already negative: nothing left to find).
    The targeted DLR loss needs at least 4 classes; with fewer it is the untargeted one.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5))
    >>> x, y = torch.rand(6, 4), torch.zeros(6, dtype=torch.long)
    >>> res = apgd_ensemble(net, x, y, 1.0, generator=torch.Generator().manual_seed(0))
    >>> bool((res.margin <= min_margin(net(x), y)).all())
    True
    """
    cfg = config or ApgdConfig()
    p = parse_norm(norm)
    check_eps(eps)
    for name in losses:
        if name not in APGD_LOSSES:
            raise ValueError(f"unknown APGD loss {name!r}: use one of {', '.join(APGD_LOSSES)}")
    check_finite(x)
    x = x.detach().to(model_dtype(model))  # attacked in the model's own precision
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(x.shape[0]).clone() if eps_t.dim() == 0 else eps_t.to(x.dtype)
    with torch.no_grad():
        logits = logits_of(model(x), len(x))
    best = _Best(x, min_margin(logits, y).detach())
    for name in losses:
        targeted = name == "dlr-targeted" and logits.shape[1] >= 4
        targets: list[torch.Tensor | None] = list(_targets(logits, y, cfg.targets(logits.shape[1]))) \
            if targeted else [None]
        for target in targets:
            for _ in range(cfg.restarts):
                rows = torch.nonzero(best.margin > 0).flatten() if stop_early else torch.arange(len(y))
                if len(rows) == 0:
                    return AttackResult(x_adv=best.x, margin=best.margin)
                objective = _apgd_objective(model, y[rows], "ce" if name == "ce" else "dlr",
                                            None if target is None else target[rows])
                run = apgd_run(objective, x[rows], eps_t[rows], p, cfg, generator)
                best.update(run.x, run.margin, rows)
    return AttackResult(x_adv=best.x, margin=best.margin)


# --------------------------------------------------------------------------- attack radii

Attack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], AttackResult]
"""``(x, y, eps per example) -> AttackResult``: the attack a radius search calls."""


@dataclass
class AttackRadius:
    """Per-example attack radius (an **estimate**: an upper bound of the true robust radius).

    ``radius``: the smallest ``||x_adv - x||_p`` of an adversarial example found (0 when the
    clean prediction is wrong, ``inf`` when none was found within ``eps_max``);
    ``lower``: the largest eps at which the attack failed (not a bound of anything).
    """

    radius: torch.Tensor  # (B,)
    lower: torch.Tensor  # (B,)
    found: torch.Tensor  # (B,) bool: an adversarial example exists within radius
    eps_max: float
    tol: float


def make_attack(model: torch.nn.Module, norm: str | float = "inf", name: str = "apgd", steps: int = 20,
                restarts: int = 1, target_classes: int = 3, generator: torch.Generator | None = None) -> Attack:
    """The attack of a radius search: ``apgd`` (APGD-CE + targeted APGD-DLR) or ``pgd`` (margin loss).

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> attack = make_attack(net, generator=torch.Generator().manual_seed(0))
    >>> attack(torch.rand(2, 4), torch.zeros(2, dtype=torch.long), torch.full((2,), 0.1)).margin.shape
    torch.Size([2])
    """
    if name == "apgd":
        cfg = ApgdConfig(steps=steps, restarts=restarts, target_classes=target_classes)
        return lambda x, y, eps: apgd_ensemble(model, x, y, eps, norm, config=cfg, generator=generator)
    if name == "pgd":
        return lambda x, y, eps: pgd(model, x, y, eps, norm, steps=steps, restarts=restarts, generator=generator)
    raise ValueError(f"unknown attack {name!r}: use {' or '.join(ATTACKS)}")


def attack_radius(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                  norm: str | float = "inf", tol: float = 1e-3, eps_max: float | None = None) -> AttackRadius:
    """Smallest eps at which ``attack`` finds an adversarial example, by bisection (theory.md §6).

    ``hi`` starts at ``eps_max``; each round attacks every unfinished example at
    ``(lo + hi) / 2``: a success sets ``hi`` to the norm of the adversarial example found
    (at most the midpoint), a failure sets ``lo``; until ``hi - lo <= tol``. A first round
    at ``eps_max`` finds which points can be broken at all. The result
    ``a(x) = hi`` is an upper bound of the true robust radius (an adversarial example
    lies within it), so ``r(x) <= a(x)`` for every certified radius ``r``.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]])); _ = net[1].bias.zero_()
    >>> x, y = torch.tensor([[0.3, 0.5]]), torch.tensor([0])
    >>> res = attack_radius(net, x, y, make_attack(net, steps=10), tol=1e-3)
    >>> abs(float(res.radius) - 0.3) < 2e-3
    True
    """
    p = parse_norm(norm)
    top = default_eps_max(p, x.shape[1:]) if eps_max is None else float(eps_max)
    check_eps(top)
    if not tol > 0:
        raise ValueError(f"the bisection tolerance must be > 0, got {tol}")
    x = x.detach()
    n = len(y)
    with torch.no_grad():
        wrong = min_margin(model(x), y) <= 0
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), top, dtype=torch.float64)
    found = wrong.cpu().clone()
    hi[found] = 0.0
    _attack_at(model, x, y, attack, p, torch.nonzero(~found).flatten(), hi, lo, found, hi.clone())
    hi[~found] = math.inf
    while True:
        rows = torch.nonzero(found & (hi - lo > tol)).flatten()
        if len(rows) == 0:
            break
        _attack_at(model, x, y, attack, p, rows, hi, lo, found, (lo + hi) / 2)
    return AttackRadius(radius=hi, lower=lo, found=found, eps_max=top, tol=float(tol))


def _attack_at(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, p: float,
               rows: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, found: torch.Tensor,
               eps: torch.Tensor) -> None:
    """One bisection round on ``rows`` at ``eps[rows]``: update ``hi``/``lo``/``found`` in place.

    A success counts only when the model misclassifies the returned point (checked here); ``hi``
    becomes that point's distance ``||x_adv - x||_p`` (at most eps, up to float32 rounding).
    """
    if len(rows) == 0:
        return
    idx = rows.to(x.device)
    e = eps[rows]
    res = attack(x[idx], y[idx], e.to(x.dtype).to(x.device))
    with torch.no_grad():
        broken = (min_margin(model(res.x_adv), y[idx]) <= 0).cpu()
    dist = batch_norm((res.x_adv - x[idx]).double(), p).cpu()
    success = broken & (dist <= e + 1e-5)  # float32 rounding of x_adv - x, no more
    hi[rows[success]] = dist[success]
    lo[rows[~success]] = e[~success]
    found[rows[success]] = True


def robust_accuracy_curve(radius: torch.Tensor, eps: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Attack (robust) accuracy at each eps from attack radii: the fraction with ``a(x) > eps``; (E,).

    An estimate: an upper bound of the true robust accuracy.

    Examples
    --------
    >>> robust_accuracy_curve(torch.tensor([0.0, 0.1, 0.3]), [0.0, 0.2]).tolist()
    [0.6666666666666666, 0.3333333333333333]
    """
    e = torch.as_tensor(eps, dtype=torch.float64).view(1, -1)
    return (radius.double().view(-1, 1) > e).double().mean(0)
