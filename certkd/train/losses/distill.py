"""Distillation: KD (Hinton et al. 2015) and KDIGA (KD + input-gradient alignment), theory.md §4."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bounds.norms import batch_norm, parse_norm, random_in_ball
from certkd.train.losses._registry import IGA_FD_STEP, NFGSM_NOISE, LossBatch, ObjectiveParams, register_loss
from certkd.train.losses.common import (
    ce_objective,
    craft_adversarial,
    eval_mode,
    kl_per_example,
    one_step_point,
)


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``sum_i keep_i * v_i / max(1, sum_i keep_i)``: the mean over the kept examples (all when ``keep`` is None).

    Example
    -------
    >>> masked_mean(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True]))
    tensor(3.5000)
    """
    if keep is None:
        return values.mean()
    weights = keep.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _kd_terms(teacher_logits: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor,
              params: ObjectiveParams, keep: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, ce, alpha * tau^2 * kl + (1 - alpha) * ce)`` on the same inputs.

    ``kl`` is summed over the classes and averaged over the kept examples (batchmean, theory.md §4);
    ``ce`` over the whole batch.
    """
    kl = masked_mean(kl_per_example(teacher_logits.detach(), student_logits, params.tau), keep)
    ce = F.cross_entropy(student_logits, y)
    return kl, ce, params.alpha * params.tau ** 2 * kl + (1 - params.alpha) * ce


@register_loss("kd", needs_teacher=True, uses_attack=False, select="clean_acc",
               summary="alpha tau^2 KL(T(x)/tau || S(x)/tau) + (1 - alpha) CE(S(x), y)")
def kd_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``alpha * tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) + (1 - alpha) * CE(z_S, y)`` on clean x."""
    with torch.no_grad():
        teacher_logits = batch.frozen_teacher()(batch.x)
    kl, ce, total = _kd_terms(teacher_logits, batch.student(batch.x), batch.y, params)
    return {"kl": kl.detach(), "ce": ce.detach(), "loss": total}


def input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   create_graph: bool, retain_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, grad_x CE(model(x_i), y_i))``: per-sample gradients of the per-sample CE.

    The CE is summed (not averaged) before differentiating, so each row is exactly the
    gradient of its own example's loss, not shrunk by 1/B (theory.md §4). With
    ``create_graph`` the gradient stays differentiable in the parameters (double backprop); with
    ``retain_graph`` (only) the logits keep their graph for a later backward.
    A BatchNorm layer in training mode couples the examples through the batch statistics; its
    rows then include that coupling (as in the authors' code). The frozen teacher is in eval mode.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(ce, x, create_graph=create_graph, retain_graph=retain_graph)
    return logits, grad


def iga_term(student_grad: torch.Tensor, teacher_grad: torch.Tensor, norm: str,
             keep: torch.Tensor | None = None, scale: str = "sample", batch_rows: int | None = None) -> torch.Tensor:
    """``mean_i ||g_S(x_i) - g_T(x_i)||_p`` with the teacher gradient a constant (theory.md §4).

    ``g`` are per-sample gradients. ``scale="batch-mean"`` divides every row by the batch size
    ``B`` (the gradients of the batch-mean CE, the authors' scale; ``batch_rows`` when the rows are
    a subset of the batch); ``keep`` averages over the kept examples only.
    """
    gaps = batch_norm(student_grad - teacher_grad.detach(), parse_norm(norm))
    if scale == "batch-mean":
        gaps = gaps / (batch_rows or len(gaps))
    return masked_mean(gaps, keep)


def iga_fd_surrogate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                     student_grad: torch.Tensor, teacher_grad: torch.Tensor, norm: str,
                     keep: torch.Tensor | None = None, scale: str = "sample", h: float = IGA_FD_STEP,
                     batch_rows: int | None = None) -> torch.Tensor:
    """The IGA term (value of :func:`iga_term`) whose parameter gradient is a finite difference.

    With ``u_i = g_S,i - g_T,i``, ``v_i = d||u_i||_p / du_i`` (detached), ``s_i = ||v_i||_2`` and
    ``d_i = v_i / s_i``, the term's parameter gradient ``sum_i w_i J_i^T v_i`` (``J_i`` the Jacobian
    of ``g_S,i`` in the parameters, ``w_i`` the weights of the masked mean) is
    ``grad_theta sum_i w_i s_i (CE_i(x_i + h d_i) - CE_i(x_i)) / h`` up to ``O(h)`` (Finlay and
    Oberman 2019): one more forward instead of a double backward. ``logits`` are the student's at
    ``x`` with their graph; ``student_grad`` may be detached.
    """
    gap = (student_grad - teacher_grad).detach().requires_grad_(True)
    with torch.enable_grad():
        (v,) = torch.autograd.grad(batch_norm(gap, parse_norm(norm)).sum(), gap)
    s = batch_norm(v, 2.0)
    d = v / s.clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))
    ce_moved = F.cross_entropy(model(x.detach() + h * d), y, reduction="none")
    ce_here = F.cross_entropy(logits, y, reduction="none")
    weights = torch.ones_like(s) if keep is None else keep.to(s.dtype)
    weights = weights / weights.sum().clamp_min(1.0)
    if scale == "batch-mean":
        weights = weights / (batch_rows or len(weights))
    surrogate = (weights * s * (ce_moved - ce_here)).sum() / h
    value = iga_term(student_grad.detach(), teacher_grad, norm, keep, scale, batch_rows)
    return value + (surrogate - surrogate.detach())


def iga_rows(params: ObjectiveParams, batch_size: int) -> int:
    """How many rows of a batch the IGA term is estimated on: the first ``ceil(iga_fraction * B)``, at least one.

    The trainer shuffles the training set every epoch, so the first rows of a batch are a uniform draw
    from it and their mean gap estimates the batch's without bias (theory.md §4).

    Example
    -------
    >>> iga_rows(ObjectiveParams(iga_fraction=0.25), 128), iga_rows(ObjectiveParams(), 128)
    (32, 128)
    """
    return max(1, math.ceil(params.iga_fraction * batch_size))


def iga_point(batch: LossBatch, params: ObjectiveParams) -> torch.Tensor:
    """Where KDIGA aligns gradients: ``x`` (clean), ``clip(x + u)`` (noisy, ``u`` uniform in the ball),
    the student's fast-AT point (adversarial: :func:`one_step_point` with step ``--iga-step``), its
    K-step PGD point on its CE (pgd: ``--attack-steps``, ``--attack-step-size``, as ARD) or its
    N-FGSM point (nfgsm: noise ``2 eps``, step ``--iga-step``, default ``eps``, no projection to the
    ball; theory.md §8)."""
    if params.iga_on == "clean":
        return batch.x
    assert params.eps is not None, f"iga_on={params.iga_on!r} needs eps"
    if params.iga_on == "noisy":
        noise = random_in_ball(batch.x.shape, parse_norm(params.norm), params.eps, batch.generator,
                               batch.x.device, batch.x.dtype)
        return (batch.x + noise).clamp(0.0, 1.0)
    assert params.iga_step is not None, "resolve ObjectiveParams first"
    with eval_mode(batch.student_bare):
        if params.iga_on == "pgd":
            return craft_adversarial(ce_objective(batch.student_bare, batch.y), batch.x, params, batch.generator)
        nfgsm = params.iga_on == "nfgsm"
        return one_step_point(batch.student_bare, batch.x, batch.y, params.eps, params.norm, params.iga_step,
                              batch.generator, noise=NFGSM_NOISE if nfgsm else 1.0, project_to_ball=not nfgsm)


@register_loss("kdiga", needs_teacher=True, uses_attack=False, select="pgd_acc",
               summary="KD + iga_weight * mean_i ||grad_x CE_S(x_i) - grad_x CE_T(x_i)||", weight_option="--iga-weight")
def kdiga_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """KD ``+ iga_weight * mean_i ||G_S,i - G_T,i||_p``, ``G`` = input gradients of the CE (theory.md §4).

    ``iga_on``: ``"clean"`` aligns at ``x`` (one student forward serves KD and IGA); ``"noisy"`` at
    ``x + u`` with KD still on clean ``x``; ``"adversarial"`` (the authors' recipe) evaluates every
    term at the student's fast-AT point ``x'``::

        (1 - alpha) CE(S(x'), y) + alpha tau^2 KL(T(x') || S(x')) + iga_weight * mean_i ||G_S,i(x') - G_T,i(x')||

    With ``teacher_mask`` the KL and IGA means run over the examples the teacher classifies
    correctly at the point each term uses (CE stays on the whole batch). ``iga_scale`` picks the
    row scale of ``G`` (:func:`iga_term`). ``iga_grad="finite-difference"`` takes the IGA term's
    parameter gradient by :func:`iga_fd_surrogate` instead of double backprop. ``iga_fraction < 1``
    estimates the IGA term on the first :func:`iga_rows` rows of the batch (KD and CE stay on all of
    it). Returns the terms ``kl, ce, iga`` (as in the loss), ``kd_term`` and ``iga_weighted`` (the two
    parts of the loss), ``teacher_right`` (with the mask) and ``loss``.
    """
    teacher = batch.frozen_teacher()
    x_iga = iga_point(batch, params)
    rows, size = iga_rows(params, len(batch.y)), len(batch.y)
    y_iga = batch.y[:rows]
    teacher_logits, teacher_grad = input_gradient(teacher, x_iga[:rows], y_iga, create_graph=False)
    exact = params.iga_grad == "exact"
    student_logits, student_grad = input_gradient(batch.student, x_iga[:rows], y_iga, create_graph=exact,
                                                  retain_graph=True)
    logits_at_point = student_logits
    keep_iga = teacher_logits.argmax(1) == y_iga if params.teacher_mask else None
    if params.iga_on == "noisy":  # KD on clean x
        with torch.no_grad():
            teacher_logits = teacher(batch.x)
        student_logits = batch.student(batch.x)
    elif rows < size:  # KD on the whole batch: the IGA rows' logits and those of the rest
        with torch.no_grad():
            teacher_rest = teacher(x_iga[rows:])
        teacher_logits = torch.cat([teacher_logits.detach(), teacher_rest])
        student_logits = torch.cat([student_logits, batch.student(x_iga[rows:])])
    keep_kd = teacher_logits.argmax(1) == batch.y if params.teacher_mask else None
    kl, ce, kd = _kd_terms(teacher_logits, student_logits, batch.y, params, keep_kd)
    if exact:
        iga = iga_term(student_grad, teacher_grad, params.iga_norm, keep_iga, params.iga_scale, size)
    else:
        iga = iga_fd_surrogate(batch.student, x_iga[:rows], y_iga, logits_at_point, student_grad, teacher_grad,
                               params.iga_norm, keep_iga, params.iga_scale, batch_rows=size)
    weighted = params.iga_weight * iga
    out = {"kl": kl.detach(), "ce": ce.detach(), "iga": iga.detach(), "kd_term": kd.detach(),
           "iga_weighted": weighted.detach(), "loss": kd + weighted}
    if keep_iga is not None:
        out["teacher_right"] = keep_iga.float().mean()
    return out
