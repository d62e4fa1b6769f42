"""Robust distillation: ARD (Goldblum et al. 2020) and RSLAD (Zi et al. 2021), theory.md §4."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from certkd.train.losses._registry import LossBatch, ObjectiveParams, register_loss
from certkd.train.losses.common import ce_objective, craft_adversarial, eval_mode, kl_batchmean, kl_objective

Objective = Callable[[torch.Tensor], torch.Tensor]


def teacher_logits_and_point(batch: LossBatch, params: ObjectiveParams,
                             objective: Callable[[torch.Tensor], Objective]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T(x), x')``: the frozen teacher's clean logits and the student's PGD point maximizing
    ``objective(T(x))`` (a per-example objective of the student's input)."""
    with torch.no_grad():
        teacher_logits = batch.frozen_teacher()(batch.x)
    with eval_mode(batch.student_bare):
        x_adv = craft_adversarial(objective(teacher_logits), batch.x, params, batch.generator)
    return teacher_logits, x_adv


@register_loss("ard", needs_teacher=True, uses_attack=True, select="pgd_acc",
               summary="alpha tau^2 KL(T(x)/tau || S(x')/tau) + (1 - alpha) CE(S(x), y), x' = PGD on S's CE")
def ard_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``alpha * tau^2 * KL(T(x) || S(x')) + (1 - alpha) * CE(S(x), y)``, ``x'`` = PGD on the student's CE."""
    teacher_logits, x_adv = teacher_logits_and_point(batch, params, lambda _: ce_objective(batch.student_bare, batch.y))
    kl_adv = kl_batchmean(teacher_logits, batch.student(x_adv), params.tau)
    ce = F.cross_entropy(batch.student(batch.x), batch.y)
    total = params.alpha * params.tau ** 2 * kl_adv + (1 - params.alpha) * ce
    return {"kl_adv": kl_adv.detach(), "ce": ce.detach(), "loss": total}


@register_loss("rslad", needs_teacher=True, uses_attack=True, select="pgd_acc",
               summary="5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)), x' maximizes KL(T(x) || S(x'))")
def rslad_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``5/6 * KL(T(x) || S(x')) + 1/6 * KL(T(x) || S(x))``, ``x'`` maximizes ``KL(T(x) || S(x'))``."""
    teacher_logits, x_adv = teacher_logits_and_point(batch, params,
                                                     lambda logits: kl_objective(batch.student_bare, logits))
    kl_adv = kl_batchmean(teacher_logits, batch.student(x_adv))
    kl_clean = kl_batchmean(teacher_logits, batch.student(batch.x))
    return {"kl_adv": kl_adv.detach(), "kl_clean": kl_clean.detach(),
            "loss": 5 / 6 * kl_adv + 1 / 6 * kl_clean}
