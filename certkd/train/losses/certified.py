"""Certified training: IBP (Gowal et al. 2018), CROWN-IBP (Zhang et al. 2020), MTL-IBP (De Palma et al. 2024).

theory.md §7. The margins ``m_j = z_y - z_j`` of the student are bounded over the L-inf ball
by auto_LiRPA (:class:`bounds.train_bounds.TrainingBounds`, differentiable in the weights);
the *bound logits* ``zb_y = 0, zb_j = -lb_j`` give ``CE(zb, y)``, an upper bound of the worst-case
CE over the ball. The radius ramps (``--eps-start``, ``--eps-warmup``, ``--eps-schedule``) and
the weights ``kappa`` and ``beta`` move linearly over the same ramp (certkd.train.schedules).
The warm-up regularizers of Shi et al. (2021) (``--bound-reg``) act while the radius ramps.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from bounds.train_bounds import TrainingBounds, TrainingMarginBounds
from certkd.errors import CertkdError
from certkd.train.losses._registry import LossBatch, ObjectiveParams, register_loss
from certkd.train.losses.common import ce_objective, craft_adversarial, eval_mode
from certkd.train.schedules import interpolate

REG_TOLERANCE = 0.5
"""``tau`` of the warm-up regularizers of Shi et al. (2021)."""

_ENGINES: weakref.WeakKeyDictionary[nn.Module, TrainingBounds] = weakref.WeakKeyDictionary()


def training_bounds(model: nn.Module, x: torch.Tensor) -> TrainingBounds:
    """The auto_LiRPA graph of ``model`` (built on first use, then reused at every step)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = TrainingBounds(model, tuple(x.shape[1:]))
        _ENGINES[model] = engine
    return engine


def bound_logits(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``zb`` (B, K) from margin lower bounds (B, K-1): ``zb_y = 0``, ``zb_j = -lb_j`` (theory.md §7).

    ``CE(zb, y) = log(1 + sum_j exp(-lb_j)) >= max_{x' in ball} CE(z(x'), y)``; a point is
    certified when ``argmax zb = y``.

    Example
    -------
    >>> bound_logits(torch.tensor([[1.0, -2.0]]), torch.tensor([1]))
    tensor([[-1.,  0.,  2.]])
    """
    batch, k = lower.shape[0], lower.shape[1] + 1
    out = torch.zeros(batch, k, dtype=lower.dtype, device=lower.device)
    others = torch.ones(batch, k, dtype=torch.bool, device=lower.device)
    others[torch.arange(batch, device=lower.device), y] = False
    return out.masked_scatter(others, -lower)


def warmup_regularizer(bounds: TrainingMarginBounds, tol: float = REG_TOLERANCE) -> torch.Tensor:
    """Shi et al. (2021): ``L_tightness + L_relu``, averaged over the ReLU layers.

    For each ReLU with IBP input interval ``[l, u]``, centre ``c`` and half-width ``r``:
    ``L_tightness = relu(tol - r_0 / mean(r)) / tol`` (``r_0`` the input box's mean half-width)
    and ``L_relu = (relu(tol - rho_mean) + relu(tol - rho_var)) / tol``, ``rho`` the ratio (or
    its inverse, the smaller) of the mean and of the variance of ``c`` over the active (l > 0)
    and inactive (u < 0) neurons: wide bounds and unbalanced ReLUs are penalized.
    """
    tight = relu_term = torch.zeros((), device=bounds.input_halfwidth.device)
    count = 0
    for lower, upper in bounds.relu_inputs:
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        tight = tight + F.relu(tol - bounds.input_halfwidth / radius.mean().clamp_min(1e-12)) / tol
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        spread = (centre - centre.mean()) ** 2
        mean_ratio = (centre * active).mean() / -(centre * inactive).mean()
        var_ratio = (spread * active).sum() / (spread * inactive).sum()
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp_min(1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp_min(1e-12))
        term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if bool(torch.isfinite(term)):
            relu_term = relu_term + term
        count += 1
    return (tight + relu_term) / max(count, 1)


def _check(params: ObjectiveParams) -> float:
    if params.eps is None:
        raise CertkdError("certified training bounds a ball: give --eps > 0 (e.g. 0.1 on MNIST)")
    if params.norm not in ("inf", "linf", "Linf"):
        raise CertkdError(f"certified training bounds the L-inf ball only; got --norm {params.norm}")
    return float(params.eps)


def certified_terms(batch: LossBatch, params: ObjectiveParams, bound: str) -> dict[str, torch.Tensor]:
    """The student's certified loss of ``bound`` (``ibp`` or ``crown-ibp``) with its parts.

    ``kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(zb(x, eps_t), y) + reg``, with ``lb`` the IBP
    bound (``ibp``) or ``beta_t * lb_CROWN-IBP + (1 - beta_t) * lb_IBP`` (``crown-ibp``);
    ``kappa_t``, ``beta_t`` interpolated over the ramp; ``reg`` = ``bound_reg * (1 - eps_t/eps)``
    times :func:`warmup_regularizer` while the radius ramps (Shi et al. 2021).
    Returns ``logits`` (the student's clean logits, for a teacher term), ``ce``, ``ce_bound``,
    ``kappa``, ``beta``, ``reg``, ``cert_loss`` and ``loss`` (= ``cert_loss``).
    """
    eps = _check(params)
    engine = training_bounds(batch.student_bare, batch.x)  # first: building the graph bumps parameter versions
    logits = batch.student(batch.x)
    ce = F.cross_entropy(logits, batch.y)
    beta = interpolate(params.crown_beta_start, params.crown_beta_end, batch.ramp) if bound == "crown-ibp" else 0.0
    out = engine.margins(batch.x, batch.y, eps, crown_ibp=beta > 0)
    lower = out.ibp if out.crown_ibp is None else beta * out.crown_ibp + (1 - beta) * out.ibp
    ce_bound = F.cross_entropy(bound_logits(lower, batch.y), batch.y)
    kappa = interpolate(params.kappa_start, params.kappa_end, batch.ramp)
    reg = torch.zeros((), device=ce.device)
    if params.bound_reg > 0 and 0 < batch.eps_factor < 1:
        reg = params.bound_reg * (1 - batch.eps_factor) * warmup_regularizer(out)
    total = kappa * ce + (1 - kappa) * ce_bound + reg
    return {"logits": logits, "ce": ce.detach(), "ce_bound": ce_bound.detach(), "kappa": torch.tensor(kappa, device=ce.device),
            "beta": torch.tensor(beta, device=ce.device), "reg": reg.detach(), "cert_loss": total.detach(), "loss": total}


def _public(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in terms.items() if k != "logits"}


@register_loss("ibp", needs_teacher=False, uses_attack=False, needs_eps=True, select="pgd_acc",
               summary="kappa CE(S(x), y) + (1 - kappa) CE(zb_IBP(x, eps), y) (Gowal et al. 2018)")
def ibp_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``kappa_t * CE(z(x), y) + (1 - kappa_t) * CE(zb_IBP(x, eps_t), y)`` (theory.md §7, Gowal et al. 2018)."""
    return _public(certified_terms(batch, params, "ibp"))


@register_loss("crown-ibp", needs_teacher=False, uses_attack=False, needs_eps=True, select="pgd_acc",
               summary="IBP loss with lb = beta lb_CROWN-IBP + (1 - beta) lb_IBP (Zhang et al. 2020)")
def crown_ibp_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """The IBP loss with ``lb = beta_t * lb_CROWN-IBP + (1 - beta_t) * lb_IBP`` (theory.md §7, Zhang et al. 2020)."""
    return _public(certified_terms(batch, params, "crown-ibp"))


@register_loss("mtl-ibp", needs_teacher=False, uses_attack=True, select="pgd_acc", weight_option="--mtl-alpha",
               summary="(1 - a) CE(S(x'), y) + a CE(zb_IBP(x, eps), y), x' = PGD (De Palma et al. 2024)")
def mtl_ibp_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``(1 - a) * CE(z(x'), y) + a * CE(zb_IBP(x, eps_t), y)``, ``x'`` PGD on the CE, ``a`` = ``--mtl-alpha``.

    theory.md §7 (De Palma et al. 2024, "Expressive losses for verified robustness"). The
    warm-up regularizers apply as in :func:`certified_terms`.
    """
    eps = _check(params)
    engine = training_bounds(batch.student_bare, batch.x)
    with eval_mode(batch.student_bare):
        x_adv = craft_adversarial(ce_objective(batch.student_bare, batch.y), batch.x, params, batch.generator)
    ce_adv = F.cross_entropy(batch.student(x_adv), batch.y)
    out = engine.margins(batch.x, batch.y, eps)
    ce_bound = F.cross_entropy(bound_logits(out.ibp, batch.y), batch.y)
    reg = torch.zeros((), device=ce_adv.device)
    if params.bound_reg > 0 and 0 < batch.eps_factor < 1:
        reg = params.bound_reg * (1 - batch.eps_factor) * warmup_regularizer(out)
    total = (1 - params.mtl_alpha) * ce_adv + params.mtl_alpha * ce_bound + reg
    return {"ce_adv": ce_adv.detach(), "ce_bound": ce_bound.detach(), "reg": reg.detach(), "loss": total}
