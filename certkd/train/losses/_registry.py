"""Registry of training objectives (theory.md §4): ``get_loss(name) -> LossSpec``.

Every objective is a function ``fn(batch: LossBatch, params: ObjectiveParams) -> dict``
returning each term under its own name (logged separately) and the total under ``"loss"``.
Objectives live in :data:`LOSSES`, a :class:`certkd.registry.Registry`; installed packages
add their own through the ``certkd.losses`` entry-point group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from bounds.norms import parse_norm
from certkd.certification.methods import NORMS
from certkd.errors import CertkdError
from certkd.registry import Registry

IGA_NORMS = ("2", "1", "inf")
IGA_POINTS = ("clean", "noisy", "adversarial", "pgd", "nfgsm")
IGA_ATTACK_POINTS = ("adversarial", "pgd", "nfgsm")
"""The points that are adversarial for the student (the teacher mask is on there by default)."""
IGA_GRADS = ("exact", "finite-difference")
IGA_SCALES = ("sample", "batch-mean")
CERT_BOUNDS = ("ibp", "crown-ibp")
IGA_STEP_FACTOR = 1.25
"""Default ``--iga-step`` as a multiple of eps: 10/255 at eps 8/255, as in fast AT (Wong et al. 2020)."""
NFGSM_NOISE = 2.0
"""N-FGSM's start: uniform noise in the ball of radius ``2 eps``; its default step is ``eps`` (de Jorge et al. 2022)."""
IGA_FD_STEP = 0.1
"""The L2 length ``h`` of the finite difference of ``--iga-grad finite-difference`` (input units)."""


@dataclass(frozen=True)
class ObjectiveParams:
    """Hyperparameters of the objectives (theory.md §4); each method reads the ones it needs.

    ``resolved()`` fills the defaults that depend on other values: ``attack_step_size``
    ``None`` becomes ``2.5 * eps / attack_steps``; ``iga_step`` ``None`` becomes
    ``1.25 * eps`` (``eps`` for ``nfgsm``); ``teacher_mask`` ``None`` becomes true at the points
    adversarial for the student (``adversarial``, ``pgd``, ``nfgsm``).

    ``iga_grad`` says how the IGA term's parameter gradient is taken: ``"exact"`` by double
    backprop, ``"finite-difference"`` along the gradient gap (Finlay and Oberman 2019, theory.md §4).

    ``iga_scale`` says what a row of the aligned gradients is: ``"sample"`` the gradient of
    the example's own CE (certkd's scale), ``"batch-mean"`` the gradient of the batch-mean
    CE, ``1/B`` times smaller, as in the authors' code. A weight ``w`` on the batch-mean scale
    equals ``w / B`` on the sample scale.

    Certified methods (theory.md §7): ``kappa_start``/``kappa_end`` (weight of the clean CE)
    and ``crown_beta_start``/``crown_beta_end`` (weight of the CROWN-IBP bound) move linearly
    over the eps ramp; ``mtl_alpha`` weighs MTL-IBP's IBP loss; ``bound_reg`` the warm-up
    regularizers of Shi et al. (2021); ``cert_bound`` is the certified loss of the ``cert-*``
    distillation methods.

    Example
    -------
    >>> ObjectiveParams(eps=0.1, iga_on="adversarial").resolved().iga_step
    0.125
    """

    alpha: float = field(default=0.5, metadata={"help": "KD/KDIGA/ARD weight of the KL term."})
    tau: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    beta: float = field(default=6.0, metadata={"help": "TRADES weight of the robust KL term."})
    iga_weight: float = field(default=1.0, metadata={
        "help": "KDIGA weight of the input-gradient alignment term, on the --iga-scale scale."})
    iga_norm: str = field(default="2", metadata={
        "choices": IGA_NORMS, "help": "Norm of the per-sample gradient difference in KDIGA."})
    iga_on: str = field(default="clean", metadata={
        "choices": IGA_POINTS, "help": "Where KDIGA works: at x; gradients at x plus uniform noise in the --eps "
        "ball (KD at x); or every term at the student's fast-AT point (random start, one signed step of --iga-step "
        "on its CE, projected to ball and box), the authors' recipe; at its PGD point (--attack-steps, "
        "--attack-step-size, as ARD); or at its N-FGSM point (noise 2 eps, a step of eps, not projected to the "
        "ball), which resists catastrophic overfitting (theory.md §8)."})
    iga_step: float | None = field(default=None, metadata={
        "parse": "number", "help": "Step of the adversarial point [default: 1.25 * eps]."})
    iga_scale: str = field(default="sample", metadata={
        "choices": IGA_SCALES, "help": "sample: each aligned row is the gradient of its example's own CE (certkd's "
        "scale); batch-mean: of the batch-mean CE, 1/B of it, as in the authors' code. A batch-mean weight w "
        "equals w/B on the sample scale (B the per-process batch; the paper's gamma 1 at B=126 is 0.0079, at "
        "B=128 0.0078); the checkpoint records both."})
    iga_grad: str = field(default="exact", metadata={
        "choices": IGA_GRADS, "help": "How the IGA term's parameter gradient is taken: exact double backprop, or a "
        "finite difference of the student's loss along the gradient gap (Finlay and Oberman 2019; one more "
        "forward instead of a double backward; on ReLU networks an approximation: docs/theory.md §4)."})
    iga_fraction: float = field(default=1.0, metadata={
        "help": "Share of each batch the IGA term is estimated on (its first rows: a uniform draw, since batches are "
        "shuffled); an unbiased estimate of the term's mean at that share of its cost (KD and CE stay on the "
        "whole batch). With BatchNorm in training mode the two parts are normalized by their own statistics."})
    teacher_mask: bool | None = field(default=None, metadata={
        "option": "--teacher-mask/--no-teacher-mask", "help": "Average KD and IGA only over the examples the "
        "teacher classifies correctly at the point used [default: on at the points adversarial for the student]."})
    eps: float | None = field(default=None, metadata={
        "parse": "number", "help": "Attack radius for pgd-at, trades, ard, rslad (and kdiga --iga-on "
        "noisy/adversarial/pgd/nfgsm), the L-inf radius bounded by the certified methods (ibp, crown-ibp, "
        "mtl-ibp, cert-*); also the validation PGD radius. Fractions allowed: 8/255."})
    norm: str = field(default="inf", metadata={
        "choices": NORMS, "help": "Threat model: L-inf or L2 ball, intersected with [0, 1]^d."})
    attack_steps: int = field(default=10, metadata={"help": "PGD steps of the training attack."})
    attack_step_size: float | None = field(default=None, metadata={
        "parse": "number", "help": "PGD step size [default: 2.5 * eps / steps]."})
    kappa_start: float = field(default=1.0, metadata={
        "help": "Certified methods: weight of the clean CE at the start of the ramp (the bound CE gets 1 - kappa)."})
    kappa_end: float = field(default=0.5, metadata={
        "help": "Certified methods: weight of the clean CE after the ramp (Gowal et al. 0.5; Shi et al. 0)."})
    crown_beta_start: float = field(default=1.0, metadata={
        "help": "crown-ibp: weight of the CROWN-IBP bound (against IBP's) at the start of the ramp."})
    crown_beta_end: float = field(default=0.0, metadata={
        "help": "crown-ibp: weight of the CROWN-IBP bound after the ramp (0: pure IBP, no CROWN pass)."})
    mtl_alpha: float = field(default=0.5, metadata={
        "help": "mtl-ibp: weight of the IBP loss against the adversarial loss."})
    bound_reg: float = field(default=0.0, metadata={
        "help": "Certified methods: weight of the warm-up regularizers of Shi et al. 2021 (bound tightness and "
        "ReLU balance), times 1 - eps_t/eps, while the radius ramps; 0 turns them off (Shi et al.: 0.5)."})
    cert_bound: str = field(default="ibp", metadata={
        "choices": CERT_BOUNDS, "help": "cert-kd, cert-kdiga, cert-advkd: the certified loss of the student (the "
        "ibp or crown-ibp method's)."})

    def resolved(self) -> ObjectiveParams:
        """Check every value and fill in the dependent defaults; raises ``CertkdError``."""
        self._check_weights()
        self._check_attack()
        self._check_certified()
        step = self.attack_step_size
        if step is None and self.eps is not None:
            step = 2.5 * self.eps / self.attack_steps
        if step is not None and not (math.isfinite(step) and step >= 0):
            raise CertkdError(f"--attack-step-size must be a finite number >= 0, got {step}")
        iga_step = self.iga_step
        if iga_step is None and self.eps is not None:
            iga_step = (1.0 if self.iga_on == "nfgsm" else IGA_STEP_FACTOR) * self.eps
        if iga_step is not None and not (math.isfinite(iga_step) and iga_step >= 0):
            raise CertkdError(f"--iga-step must be a finite number >= 0, got {iga_step}")
        mask = self.iga_on in IGA_ATTACK_POINTS if self.teacher_mask is None else bool(self.teacher_mask)
        return replace(self, iga_norm=str(self.iga_norm), attack_step_size=step, iga_step=iga_step,
                       teacher_mask=mask)

    def _check_weights(self) -> None:
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
            raise CertkdError(f"--iga-on must be one of {', '.join(IGA_POINTS)}, got {self.iga_on!r}")
        if self.iga_grad not in IGA_GRADS:
            raise CertkdError(f"--iga-grad must be one of {', '.join(IGA_GRADS)}, got {self.iga_grad!r}")
        if not (math.isfinite(self.iga_fraction) and 0.0 < self.iga_fraction <= 1.0):
            raise CertkdError(f"--iga-fraction must lie in (0, 1], got {self.iga_fraction}")
        if self.iga_scale not in IGA_SCALES:
            raise CertkdError(f"--iga-scale must be one of {', '.join(IGA_SCALES)}, got {self.iga_scale!r}")

    def _check_certified(self) -> None:
        for name in ("kappa_start", "kappa_end", "crown_beta_start", "crown_beta_end", "mtl_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise CertkdError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
        if not (math.isfinite(self.bound_reg) and self.bound_reg >= 0):
            raise CertkdError(f"--bound-reg must be a number >= 0, got {self.bound_reg}")
        if self.cert_bound not in CERT_BOUNDS:
            raise CertkdError(f"--cert-bound must be one of {', '.join(CERT_BOUNDS)}, got {self.cert_bound!r}")

    def _check_attack(self) -> None:
        if parse_norm(self.norm) not in (math.inf, 2.0):
            raise CertkdError(f"--norm must be inf or 2 for training attacks, got {self.norm!r}")
        if self.attack_steps < 1:
            raise CertkdError(f"--attack-steps must be >= 1, got {self.attack_steps}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps >= 0):
            raise CertkdError(f"--eps must be a finite number >= 0, got {self.eps}")

    def eps_scaled(self, factor: float) -> ObjectiveParams:
        """The radius and both step sizes times ``factor`` (the ``--eps-warmup`` ramp); resolved params only.

        Example
        -------
        >>> ObjectiveParams(eps=0.2).resolved().eps_scaled(0.5).iga_step
        0.125
        """
        if self.eps is None or factor == 1.0:
            return self
        assert self.attack_step_size is not None and self.iga_step is not None, "resolve the params first"
        return replace(self, eps=self.eps * factor, attack_step_size=self.attack_step_size * factor,
                       iga_step=self.iga_step * factor)


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
    ramp: float = 1.0
    """Progress ``t`` in [0, 1] of the eps ramp at this step (certkd.train.schedules); 1 outside training."""
    eps_factor: float = 1.0
    """``eps_t / eps`` at this step (the ramp's shape applied to ``ramp``); 1 outside training."""

    def frozen_teacher(self) -> nn.Module:
        """The teacher; an objective that distils calls this (the trainer refuses a missing teacher first)."""
        if self.teacher is None:
            raise CertkdError("this objective distils a teacher: give --teacher t.pt")
        return self.teacher


LossFn = Callable[[LossBatch, ObjectiveParams], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """A registered objective: its function, whether it distils a teacher, which options it reads.

    ``uses_attack``: crafts PGD points with --eps/--norm/--attack-steps/--attack-step-size.
    ``select``: the validation metric that picks the best checkpoint (``clean_acc`` or ``pgd_acc``).
    ``weight_option``: the option to lower when training collapses or diverges.
    ``needs_eps``: bounds or attacks within the --eps ball even without crafting PGD points.
    """

    name: str
    fn: LossFn
    needs_teacher: bool
    uses_attack: bool
    select: str
    summary: str
    weight_option: str = "--lr"
    needs_eps: bool = False


LOSSES: Registry[LossSpec] = Registry("training method", group="certkd.losses")
"""Every training objective, by name (built-in ones register on import of ``certkd.train.losses``)."""


def register_loss(name: str, *, needs_teacher: bool, uses_attack: bool, select: str, summary: str,
                  weight_option: str = "--lr", needs_eps: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn`` in :data:`LOSSES` under ``name`` with its :class:`LossSpec` fields."""
    def deco(fn: LossFn) -> LossFn:
        LOSSES.add(name, LossSpec(name, fn, needs_teacher, uses_attack, select, summary, weight_option,
                                  needs_eps or uses_attack))
        return fn
    return deco


def list_methods() -> list[str]:
    """Every registered training method, sorted."""
    return LOSSES.names()


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name``; an unknown name raises ``CertkdError`` listing the known ones."""
    return LOSSES.get(name)
