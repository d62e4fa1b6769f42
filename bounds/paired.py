"""Paired teacher-versus-student comparison of per-example radii over the same points (theory.md §2.1, §3).

Both radii come from the same method (certified or estimate: the verdict inherits
that kind). Certified accuracy at ``eps`` is the fraction of points that are
correctly classified with radius ``r >= eps`` (theory.md §2.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from bounds.errors import BoundsError

YES = "yes"
NO = "no"
INCONCLUSIVE = "inconclusive"
QUESTION = "the student certifies at least as robustly as the teacher"


@dataclass
class PairedComparison:
    """Paired statistics of student (S) and teacher (T) radii, and the verdict on ``QUESTION``.

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
    reason: str
    tol: float
    margin: float
    alpha: float
    fraction_threshold: float


def certified_accuracy(radius: torch.Tensor, eps: Sequence[float] | torch.Tensor,
                       correct: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction with ``correct & (radius >= eps)`` at every eps, shape (E,) (theory.md §2.1)."""
    return _certified(radius, torch.as_tensor(eps, dtype=torch.float64), correct).double().mean(0)


def _certified(radius: torch.Tensor, eps: torch.Tensor, correct: torch.Tensor | None) -> torch.Tensor:
    ok = radius.double().view(-1, 1) >= eps.view(1, -1)
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
                      fraction_threshold: float = 0.9, n_boot: int = 2000, seed: int = 0) -> PairedComparison:
    """Compare per-example radii of student and teacher on the same points; decide the verdict.

    Decision rule (checked in this order):

    - differences ``d_i = r_S,i - r_T,i`` with ``|d_i| <= tol`` (the radius tolerance) count as 0;
    - **no** if at some eps the bootstrap CI of ``acc_S - acc_T`` lies entirely below
      ``-margin`` (the student certifies fewer points by more than ``margin``, significantly),
      or the one-sided Wilcoxon signed-rank test (zeros split, H1: the student's radii are
      smaller) has ``p < alpha``;
    - **yes** if the fraction with ``r_S >= r_T - tol`` is at least ``fraction_threshold``,
      or the one-sided Wilcoxon test the other way (H1: the student's radii are larger)
      has ``p < alpha``;
    - **inconclusive** otherwise.
    """
    rs = radius_student.detach().double().cpu().flatten()
    rt = radius_teacher.detach().double().cpu().flatten()
    if rs.shape != rt.shape or rs.numel() == 0:
        raise BoundsError(f"paired comparison needs radii of the same points, got {rs.numel()} and {rt.numel()}")
    check_rule(tol, margin, alpha, fraction_threshold, n_boot)
    if bool(torch.isnan(rs).any() | torch.isnan(rt).any()):
        raise BoundsError("paired comparison got a NaN radius")
    eps_t = torch.as_tensor(list(eps), dtype=torch.float64)
    cert_s = _certified(rs, eps_t, correct_student)
    cert_t = _certified(rt, eps_t, correct_teacher)
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
        verdict, reason = NO, (f"at eps {', '.join(f'{e:g}' for e in below)} the {1 - alpha:.0%} CI of the "
                               f"certified-accuracy difference lies below -{margin:g}")
    elif p_less < alpha:
        verdict, reason = NO, f"Wilcoxon signed-rank: the student's radii are smaller (p = {p_less:.3g} < {alpha:g})"
    elif fraction >= fraction_threshold:
        verdict, reason = YES, (f"{fraction:.1%} of points have r_S >= r_T - {tol:g} (>= {fraction_threshold:.0%}) "
                                f"and no eps shows a significant deficit")
    elif p_greater < alpha:
        verdict, reason = YES, (f"Wilcoxon signed-rank: the student's radii are larger (p = {p_greater:.3g} < "
                                f"{alpha:g}) and no eps shows a significant deficit")
    else:
        verdict, reason = INCONCLUSIVE, (f"only {fraction:.1%} of points have r_S >= r_T - {tol:g} "
                                         f"(< {fraction_threshold:.0%}) and the radii do not differ significantly")
    return PairedComparison(
        eps=eps_t, radius_student=rs, radius_teacher=rt, at_least_fraction=fraction, accuracy_student=acc_s,
        accuracy_teacher=acc_t, difference=acc_s - acc_t, ci_low=low, ci_high=high, wilcoxon_statistic=statistic,
        wilcoxon_p_less=p_less, wilcoxon_p_greater=p_greater, wilcoxon_p_two_sided=p_two,
        median_difference=float(diff.median()),
        verdict=verdict, reason=reason, tol=float(tol), margin=float(margin), alpha=float(alpha),
        fraction_threshold=float(fraction_threshold))
