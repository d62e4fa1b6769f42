"""Per-example input gradients of the loss and of the margins (theory.md §1, §2.2).

Examples are independent (the model must be in eval mode: no batch statistics),
so the gradient of a sum of per-example values is the stack of per-example
gradients. Several margins of the same points are differentiated in ONE
batched backward pass (``torch.autograd.grad(..., is_grads_batched=True)``,
vmap over the cotangents), on whatever device the inputs are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bounds.errors import BoundsError


@dataclass
class InputGradients:
    """Values and their input gradients: ``value`` (N,) or (N, M); ``grad`` (N, *input) or (N, M, *input)."""

    value: torch.Tensor
    grad: torch.Tensor


def other_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The classes ``j != y_i`` of every example in increasing order, shape (N, K-1)."""
    classes = torch.arange(num_classes, device=y.device).expand(len(y), num_classes)
    return classes[classes != y.view(-1, 1)].view(len(y), num_classes - 1)


def loss_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> InputGradients:
    """``CE(f(x_i), y_i)`` and ``grad_x CE`` per example (one forward and one backward)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return InputGradients(loss.detach(), grad)


def margin_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     targets: torch.Tensor | None = None) -> InputGradients:
    """Margins ``m_j = f_y - f_j`` and their input gradients (theory.md §1).

    ``targets`` (N, M) lists the classes j per example (default: every j != y,
    M = K-1); a (N,) tensor means one target per example (M = 1). All M
    gradients come from one forward and one batched backward pass.
    Returns ``value`` (N, M) and ``grad`` (N, M, *x.shape[1:]).
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if targets is None:
        targets = other_classes(y, logits.shape[1])
    targets = targets.view(len(y), -1).to(logits.device)
    if bool((targets == y.view(-1, 1)).any()):
        raise BoundsError("a target class equals the true label: margins need j != y")
    value = logits.gather(1, y.view(-1, 1)) - logits.gather(1, targets)
    m = value.shape[1]
    if m == 1:
        (grad,) = torch.autograd.grad(value.sum(), x)
        return InputGradients(value.detach(), grad.unsqueeze(1))
    cotangents = torch.eye(m, dtype=value.dtype, device=value.device).unsqueeze(1).expand(m, *value.shape)
    (grad,) = torch.autograd.grad(value, x, cotangents, is_grads_batched=True)
    return InputGradients(value.detach(), grad.transpose(0, 1))
