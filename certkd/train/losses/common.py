"""Pieces shared by the objectives: batch-mean KL, eval mode, the one PGD call site (theory.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bounds import attack
from certkd.train.losses._registry import MethodParams


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
                      params: MethodParams, generator: torch.Generator | None) -> torch.Tensor:
    """``x'`` maximizing the per-example ``objective`` over the ball, by ``bounds.attack.pgd_maximize``
    with exactly the method's --eps, --norm, --attack-steps and --attack-step-size."""
    assert params.eps is not None and params.attack_step_size is not None, "resolve MethodParams first"
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
