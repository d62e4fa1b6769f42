"""Paired teacher-versus-student comparison of per-example radii over the same points (theory.md §2.1, §6).

One *part* compares radii of one kind on the same points: the **certified** part
(certified radii ``r``; certified accuracy at ``eps`` is the fraction correctly
classified with ``r >= eps``, theory.md §2.1) or the **empirical** part (attack radii
``a``, the smallest eps where an attack found an adversarial example; attack accuracy
at ``eps`` is the fraction with ``a > eps``, an estimate). Numbers and decisions only: each
part's ``verdict`` with the ``evidence`` that decided it; the sentences, and the headline that
combines both parts (theory.md §6), are certkd's (``certkd.verdict``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from bounds.errors import BoundsError

YES = "yes"
NO = "no"
INCONCLUSIVE = "inconclusive"
CERTIFIED_PART = "certified"
EMPIRICAL_PART = "empirical"
#: what each part's accuracy is called in reasons and tables
PART_QUANTITY = {CERTIFIED_PART: "certified accuracy", EMPIRICAL_PART: "attack accuracy"}
COVERAGE_QUANTILE = 0.9
#: what decided a part's verdict, in the order the rule checks it (``paired_comparison``)
CI_BELOW = "ci_below"
SMALLER = "wilcoxon_smaller"
FRACTION = "fraction"
LARGER = "wilcoxon_larger"
NO_EVIDENCE = "none"


@dataclass
class PairedComparison:
    """Paired statistics of student (S) and teacher (T) radii, and the part's verdict (theory.md §6).

    Per-eps fields are (E,); ``ci_low`` / ``ci_high`` bound ``accuracy_student - accuracy_teacher``
    (paired percentile bootstrap at level ``1 - alpha``).
    """

    eps: torch.Tensor
    radius_student: torch.Tensor  # (B,)
    radius_teacher: torch.Tensor  # (B,)
    at_least_fraction: float  # fraction with r_S >= r_T - tol
    accuracy_student: torch.Tensor
    accuracy_teacher: torch.Tensor
    difference: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    wilcoxon_statistic: float
    wilcoxon_p_less: float  # H1: the student's radii are smaller
    wilcoxon_p_greater: float  # H1: the student's radii are larger
    wilcoxon_p_two_sided: float
    median_difference: float  # median of r_S - r_T
    verdict: str
    evidence: str  # CI_BELOW, SMALLER, FRACTION, LARGER or NO_EVIDENCE
    deficit_eps: list[float]  # the eps whose CI lies below -margin (evidence CI_BELOW)
    tol: float
    margin: float
    alpha: float
    fraction_threshold: float
    part: str = CERTIFIED_PART
    n_boot: int = 2000


def certified_accuracy(radius: torch.Tensor, eps: Sequence[float] | torch.Tensor,
                       correct: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction with ``correct & (radius >= eps)`` at every eps, shape (E,) (theory.md §2.1)."""
    return _certified(radius, torch.as_tensor(eps, dtype=torch.float64), correct).double().mean(0)


def _certified(radius: torch.Tensor, eps: torch.Tensor, correct: torch.Tensor | None,
               strict: bool = False) -> torch.Tensor:
    """(B, E) bool: ``radius >= eps`` (certified radii) or ``radius > eps`` (``strict``: attack radii)."""
    r, e = radius.double().view(-1, 1), eps.view(1, -1)
    ok = r > e if strict else r >= e
    return ok if correct is None else ok & correct.bool().view(-1, 1)


def _wilcoxon(diff: np.ndarray) -> tuple[float, float, float, float]:
    """(statistic, p_less, p_greater, p_two_sided) of the signed-rank test, zeros split between the signs."""
    if diff.size == 0 or not np.any(diff != 0):  # no evidence either way
        return 0.0, 1.0, 1.0, 1.0
    tests = {alt: stats.wilcoxon(diff, zero_method="zsplit", alternative=alt)
             for alt in ("less", "greater", "two-sided")}
    return (float(tests["less"].statistic), float(tests["less"].pvalue), float(tests["greater"].pvalue),
            float(tests["two-sided"].pvalue))


def bootstrap_difference(cert_student: torch.Tensor, cert_teacher: torch.Tensor, n_boot: int, alpha: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile CI of the certified-accuracy difference S - T per eps, resampling points in pairs.

    ``cert_*`` are (B, E) bool; one seeded ``torch.Generator`` draws every resample.
    """
    n = cert_student.shape[0]
    diff = (cert_student.double() - cert_teacher.double())  # (B, E)
    gen = torch.Generator().manual_seed(int(seed))
    stats_boot = []
    for start in range(0, n_boot, 256):
        idx = torch.randint(0, n, (min(256, n_boot - start), n), generator=gen)
        stats_boot.append(diff[idx].mean(1))  # (chunk, E)
    boot = torch.cat(stats_boot)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(boot, q, dim=0)
    return low, high


def check_rule(tol: float, margin: float, alpha: float, fraction_threshold: float, n_boot: int) -> None:
    """Raise ``BoundsError`` (one sentence) for parameters of the decision rule that make no sense."""
    if not (0 < alpha < 1 and 0 < fraction_threshold <= 1 and tol >= 0 and margin >= 0 and n_boot >= 1):
        raise BoundsError("paired comparison needs 0 < alpha < 1, 0 < fraction <= 1, tol >= 0, margin >= 0 "
                          "and n_boot >= 1")


def paired_comparison(radius_student: torch.Tensor, radius_teacher: torch.Tensor, eps: Sequence[float],
                      correct_student: torch.Tensor | None = None, correct_teacher: torch.Tensor | None = None,
                      tol: float = 1e-3, margin: float = 0.02, alpha: float = 0.05,
                      fraction_threshold: float = 0.9, n_boot: int = 2000, seed: int = 0,
                      part: str = CERTIFIED_PART) -> PairedComparison:
    """Compare per-example radii of student and teacher on the same points; decide the part's verdict.

    ``part`` is ``"certified"`` (certified radii, accuracy ``r >= eps``) or ``"empirical"``
    (attack radii, accuracy ``a > eps``). Decision rule (checked in this order):

    - differences ``d_i = r_S,i - r_T,i`` with ``|d_i| <= tol`` (the radius tolerance) count as 0;
    - **no** if at some eps the bootstrap CI of ``acc_S - acc_T`` lies entirely below
      ``-margin`` (the student is robust on fewer points by more than ``margin``, significantly),
      or the one-sided Wilcoxon signed-rank test (zeros split, H1: the student's radii are
      smaller) has ``p < alpha``;
    - **yes** if the fraction with ``r_S >= r_T - tol`` is at least ``fraction_threshold``,
      or the one-sided Wilcoxon test the other way (H1: the student's radii are larger)
      has ``p < alpha``;
    - **inconclusive** otherwise.

    Examples
    --------
    >>> r = torch.linspace(0.0, 0.1, 50, dtype=torch.float64)
    >>> paired_comparison(0.5 * r, r, [0.02, 0.05]).verdict
    'no'
    """
    if part not in PART_QUANTITY:
        raise BoundsError(f"unknown part {part!r}: use {CERTIFIED_PART} or {EMPIRICAL_PART}")
    rs = radius_student.detach().double().cpu().flatten()
    rt = radius_teacher.detach().double().cpu().flatten()
    if rs.shape != rt.shape or rs.numel() == 0:
        raise BoundsError(f"paired comparison needs radii of the same points, got {rs.numel()} and {rt.numel()}")
    check_rule(tol, margin, alpha, fraction_threshold, n_boot)
    if bool(torch.isnan(rs).any() | torch.isnan(rt).any()):
        raise BoundsError("paired comparison got a NaN radius")
    eps_t = torch.as_tensor(list(eps), dtype=torch.float64)
    strict = part == EMPIRICAL_PART
    cert_s = _certified(rs, eps_t, correct_student, strict)
    cert_t = _certified(rt, eps_t, correct_teacher, strict)
    acc_s, acc_t = cert_s.double().mean(0), cert_t.double().mean(0)
    low, high = bootstrap_difference(cert_s, cert_t, n_boot, alpha, seed) if len(eps_t) else (eps_t, eps_t)
    diff = rs - rt
    finite = torch.isfinite(diff)
    diff = torch.where(finite, diff, torch.sign(torch.nan_to_num(diff)))  # inf radii: only the sign counts
    diff = torch.where(diff.abs() <= tol, torch.zeros_like(diff), diff)
    statistic, p_less, p_greater, p_two = _wilcoxon(diff.numpy())
    fraction = float((rs >= rt - tol).double().mean())
    below = [float(e) for e, h in zip(eps_t.tolist(), high.tolist(), strict=True) if h < -margin]
    if below:
        verdict, evidence = NO, CI_BELOW
    elif p_less < alpha:
        verdict, evidence = NO, SMALLER
    elif fraction >= fraction_threshold:
        verdict, evidence = YES, FRACTION
    elif p_greater < alpha:
        verdict, evidence = YES, LARGER
    else:
        verdict, evidence = INCONCLUSIVE, NO_EVIDENCE
    return PairedComparison(
        eps=eps_t, radius_student=rs, radius_teacher=rt, at_least_fraction=fraction, accuracy_student=acc_s,
        accuracy_teacher=acc_t, difference=acc_s - acc_t, ci_low=low, ci_high=high, wilcoxon_statistic=statistic,
        wilcoxon_p_less=p_less, wilcoxon_p_greater=p_greater, wilcoxon_p_two_sided=p_two,
        median_difference=float(diff.median()),
        verdict=verdict, evidence=evidence, deficit_eps=below, tol=float(tol), margin=float(margin), alpha=float(alpha),
        fraction_threshold=float(fraction_threshold), part=part, n_boot=int(n_boot))


def _median(values: torch.Tensor) -> float:
    """The median (mean of the two middle values for an even count; ``inf`` stays ``inf``)."""
    v = values.double().flatten().sort().values
    n = v.numel()
    lo, hi = float(v[(n - 1) // 2]), float(v[n // 2])
    return hi if math.isinf(hi) else (lo + hi) / 2


def coverage(radius: torch.Tensor, quantile: float = COVERAGE_QUANTILE) -> float:
    """The eps range ``[0, X]`` a part covers: ``X`` = the ``quantile`` of the teacher's radii.

    Beyond ``X`` fewer than ``1 - quantile`` of the teacher's points are robust (certified,
    or not broken by the attack), so the part's curves carry little information there.
    ``inf`` radii (no adversarial example found) count as larger than every finite one.

    Examples
    --------
    >>> coverage(torch.arange(11, dtype=torch.float64) / 10)
    0.9
    """
    v = radius.double().flatten().sort().values
    return float(v[min(int(math.ceil(quantile * v.numel())) - 1, v.numel() - 1)]) if v.numel() else 0.0


def looseness(radius_certified_teacher: torch.Tensor, radius_attack_teacher: torch.Tensor) -> float | None:
    """Certificate looseness ``rho = median(r_T) / median(a_T)`` (theory.md §6); None when ``median(a_T) = 0``.

    ``r_T <= a_T`` for every point (an attack radius bounds the true radius from above), so
    ``rho`` lies in [0, 1]; near 1 the bounds see the teacher's whole robustness.

    Examples
    --------
    >>> round(looseness(torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.1, 0.2, 0.3])), 6)
    0.1
    """
    a = _median(radius_attack_teacher)
    if a == 0 or math.isnan(a):
        return None
    return _median(radius_certified_teacher) / a


def curve_grid(radius_certified: torch.Tensor, radius_attack_teacher: torch.Tensor, points: int = 11,
               quantile: float = COVERAGE_QUANTILE) -> list[float]:
    """Eps grid of both parts' curves: ``points`` values from 0 to the teacher's empirical robustness.

    The top is the ``quantile`` of the finite ``a_T`` (theory.md §6), and at least the largest
    finite certified radius, so the grid spans what the attack sees, not only what the bounds see.

    Examples
    --------
    >>> curve_grid(torch.tensor([0.01, 0.02]), torch.tensor([0.1, 0.2, 0.3, 0.5]), points=3)
    [0.0, 0.25, 0.5]
    """
    a = radius_attack_teacher.double().flatten()
    r = radius_certified.double().flatten()
    finite_r = r[torch.isfinite(r)]
    top = max(coverage(a[torch.isfinite(a)], quantile), float(finite_r.max()) if finite_r.numel() else 0.0)
    top = top if top > 0 else 1.0
    return [round(v, 10) for v in torch.linspace(0, top, points, dtype=torch.float64).tolist()]
