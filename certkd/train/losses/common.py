"""Pieces shared by the objectives: batch-mean KL, eval mode, the one PGD call site, the one-step point (theory.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bounds import attack
from bounds.norms import parse_norm, project, random_in_ball, steepest_step
from certkd.train.losses._registry import ObjectiveParams


def kl_per_example(target_logits: torch.Tensor, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``KL(softmax(t/tau) || softmax(z/tau))`` summed over classes, one value per example; (B,)."""
    log_p = F.log_softmax(target_logits / tau, dim=1)
    log_q = F.log_softmax(logits / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kl_batchmean(target_logits: torch.Tensor, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL summed over classes and averaged over the batch, always (theory.md §4)."""
    return kl_per_example(target_logits, logits, tau).mean()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BatchNorm running statistics, no dropout), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def craft_adversarial(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      params: ObjectiveParams, generator: torch.Generator | None) -> torch.Tensor:
    """``x'`` maximizing the per-example ``objective`` over the ball, by ``bounds.attack.pgd_maximize``
    with exactly the method's --eps, --norm, --attack-steps and --attack-step-size."""
    assert params.eps is not None and params.attack_step_size is not None, "resolve ObjectiveParams first"
    x_adv, _ = attack.pgd_maximize(objective, x, eps=params.eps, norm=params.norm, steps=params.attack_steps,
                                   step_size=params.attack_step_size, generator=generator)
    return x_adv


def ce_objective(model: nn.Module, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-example cross-entropy of ``model`` at a point (the PGD-AT / ARD attack objective)."""
    return lambda z: F.cross_entropy(model(z), y, reduction="none")


def kl_objective(model: nn.Module, target_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-example ``KL(softmax(target) || softmax(model(z)))`` (the TRADES / RSLAD attack objective)."""
    target = target_logits.detach()
    return lambda z: kl_per_example(target, model(z))


def one_step_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, step: float,
                   generator: torch.Generator | None, noise: float = 1.0, project_to_ball: bool = True
                   ) -> torch.Tensor:
    """The fast-AT point (FGSM with a random start, Wong et al. 2020) of ``model`` at ``(x, y)``, detached.

    ``x0 = clip(x + u)`` with ``u`` uniform in the ``noise * eps`` ball; one steepest-ascent step of size
    ``step`` on the summed CE at ``x0`` (``sign`` of the gradient for L-inf, the unit gradient for L2);
    ``x' = clip(x + proj_eps(x0 + step * d - x))``, ``clip`` to the box ``[0, 1]`` (theory.md §4).
    N-FGSM (de Jorge et al. 2022, theory.md §8) is ``noise=2``, ``step=eps``, ``project_to_ball=False``:
    ``x' = clip(x0 + step * d)``, up to ``3 eps`` from ``x``, which resists catastrophic overfitting.
    One forward and one backward of ``model``; no parameter gradients are kept.

    Example
    -------
    >>> net = nn.Linear(2, 3)
    >>> x = torch.rand(4, 2)
    >>> x_adv = one_step_point(net, x, torch.zeros(4, dtype=torch.long), 0.1, "inf", 0.125, None)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-7)
    True
    """
    p = parse_norm(norm)
    x = x.detach()
    u = random_in_ball(x.shape, p, noise * eps, generator, x.device, x.dtype)
    x0 = (x + u).clamp(0.0, 1.0).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    with torch.no_grad():
        moved = x0 + step * steepest_step(grad, p)
        if not project_to_ball:
            return moved.clamp(0.0, 1.0)
        return (x + project(moved - x, p, eps)).clamp(0.0, 1.0)
