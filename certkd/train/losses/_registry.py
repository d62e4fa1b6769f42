"""Registry of training objectives (theory.md §4): ``get_loss(name) -> LossSpec``.

Every objective is a function ``fn(batch: LossBatch, params: MethodParams) -> dict``
returning each term under its own name (logged separately) and the total under ``"loss"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from bounds.norms import parse_norm
from certkd.errors import CertkdError

IGA_NORMS = ("2", "1", "inf")
IGA_POINTS = ("clean", "noisy")


@dataclass(frozen=True)
class MethodParams:
    """Hyperparameters of the objectives (theory.md §4); each method reads the ones it needs.

    ``attack_step_size`` ``None`` resolves to ``2.5 * eps / attack_steps`` (``resolved()``).
    """

    alpha: float = 0.5
    tau: float = 1.0
    beta: float = 6.0
    iga_weight: float = 10.0
    iga_norm: str = "2"
    iga_on: str = "clean"
    eps: float | None = None
    norm: str = "inf"
    attack_steps: int = 10
    attack_step_size: float | None = None

    def resolved(self) -> MethodParams:
        """Check every value and fill in the default step size; raises ``CertkdError``."""
        if not 0.0 <= self.alpha <= 1.0:
            raise CertkdError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise CertkdError(f"--tau must be a positive number, got {self.tau}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise CertkdError(f"--beta must be a number >= 0, got {self.beta}")
        if not (math.isfinite(self.iga_weight) and self.iga_weight >= 0):
            raise CertkdError(f"--iga-weight must be a number >= 0, got {self.iga_weight}")
        if str(self.iga_norm) not in IGA_NORMS:
            raise CertkdError(f"--iga-norm must be one of {', '.join(IGA_NORMS)}, got {self.iga_norm!r}")
        if self.iga_on not in IGA_POINTS:
            raise CertkdError(f"--iga-on must be clean or noisy, got {self.iga_on!r}")
        if parse_norm(self.norm) not in (math.inf, 2.0):
            raise CertkdError(f"--norm must be inf or 2 for training attacks, got {self.norm!r}")
        if self.attack_steps < 1:
            raise CertkdError(f"--attack-steps must be >= 1, got {self.attack_steps}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps >= 0):
            raise CertkdError(f"--eps must be a finite number >= 0, got {self.eps}")
        step = self.attack_step_size
        if step is None and self.eps is not None:
            step = 2.5 * self.eps / self.attack_steps
        if step is not None and not (math.isfinite(step) and step >= 0):
            raise CertkdError(f"--attack-step-size must be a finite number >= 0, got {step}")
        return replace(self, iga_norm=str(self.iga_norm), attack_step_size=step)


@dataclass
class LossBatch:
    """One training batch and the models an objective needs.

    ``student`` is the forward used for the loss (a DistributedDataParallel wrapper under
    torchrun); ``student_bare`` is the same network unwrapped, used to craft attacks.
    """

    x: torch.Tensor
    y: torch.Tensor
    student: nn.Module
    student_bare: nn.Module
    teacher: nn.Module | None = None
    generator: torch.Generator | None = None


LossFn = Callable[[LossBatch, MethodParams], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A registered objective: its function, whether it distils a teacher, which options it reads.

    ``uses_attack``: crafts PGD points with --eps/--norm/--attack-steps/--attack-step-size.
    ``select``: the validation metric that picks the best checkpoint (``clean_acc`` or ``pgd_acc``).
    """

    name: str
    fn: LossFn
    needs_teacher: bool
    uses_attack: bool
    select: str
    summary: str


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_teacher: bool, uses_attack: bool, select: str,
                  summary: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        _LOSSES[name] = LossSpec(name, fn, needs_teacher, uses_attack, select, summary)
        return fn
    return deco


def list_methods() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str) -> LossSpec:
    if name not in _LOSSES:
        raise CertkdError(f"unknown training method {name!r}; available: {', '.join(list_methods())}")
    return _LOSSES[name]
