"""The ``apgd`` certify method: APGD-CE + targeted APGD-DLR robust accuracy and attack radii (an estimate).

``certkd certify --method apgd`` reports, at each eps, whether the attack of
``bounds.attack.apgd_ensemble`` (Croce & Hein 2020) failed to find an adversarial
example (robust accuracy: an upper bound of the true one), and with ``--radius`` the
attack radius of ``bounds.attack.attack_radius`` (the smallest eps at which it found
one, by bisection; an upper bound of the true radius, theory.md §6). Never certified.
"""

from __future__ import annotations

import torch

from bounds.attack import ATTACKS, ApgdConfig, apgd_ensemble, attack_radius, make_attack
from certkd.certification.methods import ESTIMATE, MODEL, Context, MethodOutput, register_method

APGD = "apgd"


def apgd_config(ctx: Context) -> ApgdConfig:
    """The attack budget of a run: ``--apgd-steps``, ``--apgd-restarts``, ``--apgd-targets``."""
    p = ctx.params
    return ApgdConfig(steps=p.apgd_steps, restarts=p.apgd_restarts, target_classes=p.apgd_targets)


@register_method(APGD, ESTIMATE, MODEL,
                 "APGD-CE + targeted APGD-DLR attack (Croce & Hein 2020): robust accuracy and attack radius, "
                 "empirical upper bounds")
def _apgd(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
          generator: torch.Generator) -> MethodOutput:
    """Robust at eps while the smallest margin APGD finds stays > 0; radius: ``attack_radii``."""
    cfg = apgd_config(ctx)
    margins = [apgd_ensemble(ctx.model, x, y, e, ctx.norm, config=cfg, generator=generator).margin for e in eps]
    ub = torch.stack(margins, dim=1) if margins else torch.zeros(len(y), 0, dtype=x.dtype)
    out = MethodOutput(robust=ub > 0, margin_ub=ub)
    if radius:
        out.radius = attack_radii(ctx, APGD, x, y, generator).to(x.dtype).to(x.device)
    return out


def attack_radii(ctx: Context, attack: str, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Per-example attack radii of ``attack`` (``apgd`` or ``pgd``) on the CPU, shape (B,); an estimate.

    The smallest eps at which the attack found an adversarial example (bisection to
    ``radius_tol``; 0 when misclassified, ``inf`` when none was found): theory.md §6.
    ``apgd`` uses ``apgd_steps``/``apgd_restarts``/``apgd_targets``, ``pgd`` (margin loss)
    ``pgd_steps``/``pgd_restarts``.
    """
    from certkd.errors import CertkdError

    if attack not in ATTACKS:
        raise CertkdError(f"unknown attack {attack!r}: use {' or '.join(ATTACKS)}")
    p = ctx.params
    steps, restarts = (p.apgd_steps, p.apgd_restarts) if attack == APGD else (p.pgd_steps, p.pgd_restarts)
    if steps < 1:
        raise CertkdError("pgd attack radii need --pgd-steps >= 1 (--pgd-steps 0 turns the attack off)")
    x, y = x.to(ctx.device), y.to(ctx.device)
    model = make_attack(ctx.model, ctx.norm, attack, steps=steps, restarts=restarts, target_classes=p.apgd_targets,
                        generator=generator)
    return attack_radius(ctx.model, x, y, model, ctx.norm, tol=p.radius_tol).radius.cpu()
