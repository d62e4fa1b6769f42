"""Adversarial training: PGD-AT (Madry et al. 2018) and TRADES (Zhang et al. 2019), theory.md §4."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certkd.train.losses._registry import LossBatch, ObjectiveParams, register_loss
from certkd.train.losses.common import ce_objective, craft_adversarial, eval_mode, kl_batchmean, kl_objective


@register_loss("pgd-at", needs_teacher=False, uses_attack=True, select="pgd_acc",
               summary="CE(S(x'), y), x' = PGD on CE")
def pgd_at_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``CE(z(x'), y)`` with ``x'`` = PGD on the student's CE within the ball (theory.md §4)."""
    with eval_mode(batch.student_bare):
        x_adv = craft_adversarial(ce_objective(batch.student_bare, batch.y), batch.x, params, batch.generator)
    ce_adv = F.cross_entropy(batch.student(x_adv), batch.y)
    return {"ce_adv": ce_adv.detach(), "loss": ce_adv}


@register_loss("trades", needs_teacher=False, uses_attack=True, select="pgd_acc",
               summary="CE(S(x), y) + beta KL(S(x) || S(x'))", weight_option="--beta")
def trades_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``CE(z(x), y) + beta * KL(softmax z(x) || softmax z(x'))``, ``x'`` maximizes the KL (theory.md §4)."""
    with eval_mode(batch.student_bare):
        with torch.no_grad():
            clean_eval = batch.student_bare(batch.x)
        x_adv = craft_adversarial(kl_objective(batch.student_bare, clean_eval), batch.x, params, batch.generator)
    logits = batch.student(batch.x)
    ce = F.cross_entropy(logits, batch.y)
    kl = kl_batchmean(logits, batch.student(x_adv))
    return {"ce": ce.detach(), "kl_adv": kl.detach(), "loss": ce + params.beta * kl}
