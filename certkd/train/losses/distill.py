"""Distillation: KD (Hinton et al. 2015) and KDIGA (KD + input-gradient alignment), theory.md §4."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bounds.norms import batch_norm, parse_norm, random_in_ball
from certkd.train.losses._registry import LossBatch, MethodParams, register_loss
from certkd.train.losses.common import kl_batchmean


def _kd_terms(teacher_logits: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor,
              params: MethodParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, ce, alpha * tau^2 * kl + (1 - alpha) * ce)`` on the same inputs."""
    kl = kl_batchmean(teacher_logits.detach(), student_logits, params.tau)
    ce = F.cross_entropy(student_logits, y)
    return kl, ce, params.alpha * params.tau ** 2 * kl + (1 - params.alpha) * ce


@register_loss("kd", needs_teacher=True, uses_attack=False, select="clean_acc",
               summary="alpha tau^2 KL(T(x)/tau || S(x)/tau) + (1 - alpha) CE(S(x), y)")
def kd_loss(batch: LossBatch, params: MethodParams) -> dict[str, torch.Tensor]:
    """``alpha * tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) + (1 - alpha) * CE(z_S, y)`` on clean x."""
    with torch.no_grad():
        teacher_logits = batch.teacher(batch.x)
    kl, ce, total = _kd_terms(teacher_logits, batch.student(batch.x), batch.y, params)
    return {"kl": kl.detach(), "ce": ce.detach(), "loss": total}


def input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, grad_x CE(model(x_i), y_i))``: per-sample gradients of the per-sample CE.

    The CE is summed (not averaged) before differentiating, so each row is exactly the
    gradient of its own example's loss, not shrunk by 1/B (theory.md §4). With
    ``create_graph`` the gradient stays differentiable in the parameters (double backprop).
    A BatchNorm layer in training mode couples the examples through the batch statistics; its
    rows then include that coupling (as in the authors' code). The frozen teacher is in eval mode.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(ce, x, create_graph=create_graph)
    return logits, grad


def iga_term(student_grad: torch.Tensor, teacher_grad: torch.Tensor, norm: str) -> torch.Tensor:
    """``mean_i ||g_S(x_i) - g_T(x_i)||_p`` with the teacher gradient a constant (theory.md §4)."""
    return batch_norm(student_grad - teacher_grad.detach(), parse_norm(norm)).mean()


@register_loss("kdiga", needs_teacher=True, uses_attack=False, select="pgd_acc",
               summary="KD + iga_weight * mean_i ||grad_x CE_S(x_i) - grad_x CE_T(x_i)||")
def kdiga_loss(batch: LossBatch, params: MethodParams) -> dict[str, torch.Tensor]:
    """KD ``+ iga_weight * mean_i ||grad_x CE(z_S(x_i), y_i) - grad_x CE(z_T(x_i), y_i)||_p`` (theory.md §4).

    ``iga_on="clean"`` aligns gradients at ``x`` (one student forward serves KD and IGA);
    ``"noisy"`` at ``x + u``, ``u`` uniform in the --eps ball (clipped to [0, 1]), KD still on clean ``x``.
    """
    if params.iga_on == "noisy":
        assert params.eps is not None, "iga_on='noisy' needs eps"
        noise = random_in_ball(batch.x.shape, parse_norm(params.norm), params.eps, batch.generator,
                               batch.x.device, batch.x.dtype)
        x_iga = (batch.x + noise).clamp(0.0, 1.0)
    else:
        x_iga = batch.x
    teacher_logits, teacher_grad = input_gradient(batch.teacher, x_iga, batch.y, create_graph=False)
    student_logits, student_grad = input_gradient(batch.student, x_iga, batch.y, create_graph=True)
    if params.iga_on == "noisy":
        student_logits = batch.student(batch.x)
        with torch.no_grad():
            teacher_logits = batch.teacher(batch.x)
    kl, ce, kd = _kd_terms(teacher_logits, student_logits, batch.y, params)
    iga = iga_term(student_grad, teacher_grad, params.iga_norm)
    return {"kl": kl.detach(), "ce": ce.detach(), "iga": iga.detach(), "loss": kd + params.iga_weight * iga}
