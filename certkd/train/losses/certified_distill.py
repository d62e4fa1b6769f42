"""Certified distillation: the student's certified loss plus a teacher term (theory.md §7, §4).

``L_cert`` is the loss of :func:`certkd.train.losses.certified.certified_terms` with
``--cert-bound`` (``ibp``: IBP with the kappa schedule; ``crown-ibp``: with the beta schedule):

- ``cert-kd``: ``(1 - alpha) L_cert + alpha tau^2 KL(T(x)/tau || S(x)/tau)``: KD on logits
  (Hinton et al. 2015) with the CE replaced by the certified loss;
- ``cert-kdiga``: ``cert-kd + iga_weight * mean_i ||grad_x CE_S(x_i) - grad_x CE_T(x_i)||``: the
  KDIGA alignment of input gradients (Shao et al. 2021) at ``--iga-on``;
- ``cert-advkd``: ``(1 - alpha) L_cert + alpha tau^2 KL(T(x')/tau || S(x')/tau)``, ``x'`` PGD on the
  student's CE in the ball: the teacher's outputs at adversarial points distilled into certified
  training (De Palma et al. 2026; AD-CERT 2026 distil an adversarially trained teacher at
  adversarial points into a certified loss; here the teacher's logits).
"""

from __future__ import annotations

import torch

from certkd.train.losses._registry import LossBatch, ObjectiveParams, register_loss
from certkd.train.losses.certified import certified_terms
from certkd.train.losses.common import ce_objective, craft_adversarial, eval_mode, kl_per_example
from certkd.train.losses.distill import iga_point, iga_rows, iga_term, input_gradient


def _with_teacher(terms: dict[str, torch.Tensor], teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``(1 - alpha) L_cert + alpha tau^2 KL(T || S)`` and its parts, from :func:`certified_terms`."""
    kl = kl_per_example(teacher_logits.detach(), student_logits, params.tau).mean()
    total = (1 - params.alpha) * terms["loss"] + params.alpha * params.tau ** 2 * kl
    out = {k: v for k, v in terms.items() if k not in ("logits", "loss")}
    return {**out, "kl": kl.detach(), "loss": total}


@register_loss("cert-kd", needs_teacher=True, uses_attack=False, needs_eps=True, select="pgd_acc",
               summary="(1 - alpha) L_cert(S) + alpha tau^2 KL(T(x)/tau || S(x)/tau), L_cert the --cert-bound loss")
def cert_kd_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * L_cert + alpha * tau^2 * KL(softmax(z_T(x)/tau) || softmax(z_S(x)/tau))`` (theory.md §7)."""
    terms = certified_terms(batch, params, params.cert_bound)
    with torch.no_grad():
        teacher_logits = batch.frozen_teacher()(batch.x)
    return _with_teacher(terms, teacher_logits, terms["logits"], params)


@register_loss("cert-kdiga", needs_teacher=True, uses_attack=False, needs_eps=True, select="pgd_acc",
               weight_option="--iga-weight",
               summary="cert-kd + iga_weight mean_i ||grad_x CE_S(x_i) - grad_x CE_T(x_i)||")
def cert_kdiga_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """cert-kd ``+ iga_weight * mean_i ||G_S,i - G_T,i||_p`` at the ``--iga-on`` point (theory.md §4, §7)."""
    terms = certified_terms(batch, params, params.cert_bound)
    teacher = batch.frozen_teacher()
    with torch.no_grad():
        teacher_logits = teacher(batch.x)
    out = _with_teacher(terms, teacher_logits, terms["logits"], params)
    rows = iga_rows(params, len(batch.y))
    x_iga, y_iga = iga_point(batch, params)[:rows], batch.y[:rows]
    _, teacher_grad = input_gradient(teacher, x_iga, y_iga, create_graph=False)
    _, student_grad = input_gradient(batch.student, x_iga, y_iga, create_graph=True)
    iga = iga_term(student_grad, teacher_grad, params.iga_norm, None, params.iga_scale, len(batch.y))
    return {**out, "iga": iga.detach(), "loss": out["loss"] + params.iga_weight * iga}


@register_loss("cert-advkd", needs_teacher=True, uses_attack=True, select="pgd_acc",
               summary="(1 - alpha) L_cert(S) + alpha tau^2 KL(T(x')/tau || S(x')/tau), x' = PGD on S's CE")
def cert_advkd_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * L_cert + alpha * tau^2 * KL(T(x') || S(x'))``, ``x'`` PGD on the student's CE (theory.md §7)."""
    terms = certified_terms(batch, params, params.cert_bound)
    with eval_mode(batch.student_bare):
        x_adv = craft_adversarial(ce_objective(batch.student_bare, batch.y), batch.x, params, batch.generator)
    with torch.no_grad():
        teacher_logits = batch.frozen_teacher()(x_adv)
    return _with_teacher(terms, teacher_logits, batch.student(x_adv), params)
