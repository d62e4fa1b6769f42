"""Schedules of certified training (theory.md §7) as pure functions of the optimizer step.

The training radius follows a *ramp*: ``eps_t = eps * f(t)`` with ``t`` the ramp progress,
0 during the first ``start`` epochs (natural training at eps 0, the warm-up of Shi et al.
2021), then rising to 1 over ``length`` epochs, 1 afterwards. ``f`` is

- ``linear``: ``f(t) = t`` (Gowal et al. 2018; Zhang et al. 2020);
- ``smoothed``: ``f(t) = a t^p`` for ``t < m``, then linear to ``f(1) = 1`` with the same slope at
  ``m`` (Shi et al. 2021: the exponential-then-linear ramp of auto_LiRPA's ``SmoothedScheduler``,
  ``p = 4``, ``m = 0.25``), so ``a = 1 / (m^(p-1) (p (1 - m) + m))``.

The weights of the certified losses move linearly in ``t`` over the same ramp: ``kappa``
(weight of the clean CE, Gowal et al. 2018) and ``beta`` (weight of the CROWN-IBP bound,
Zhang et al. 2020), from their start to their end value. Every value depends only on the
step, so a run resumed mid-ramp takes the same values as an uninterrupted one.

Example
-------
>>> progress(step=149, steps_per_epoch=100, start=1.0, length=1.0)
0.5
>>> eps_factor("smoothed", 1.0), eps_factor("linear", 0.5)
(1.0, 0.5)
>>> interpolate(1.0, 0.5, 0.5)
0.75
"""

from __future__ import annotations

import math

EPS_SCHEDULES = ("linear", "smoothed")
SMOOTHED_POWER = 4.0
"""Exponent ``p`` of the smoothed ramp's first part (auto_LiRPA's ``beta=4.0``)."""
SMOOTHED_MID = 0.25
"""Fraction ``m`` of the ramp where the smoothed ramp turns linear (auto_LiRPA's ``mid=0.25``)."""

__all__ = ["EPS_SCHEDULES", "SMOOTHED_MID", "SMOOTHED_POWER", "eps_factor", "interpolate", "progress",
           "smoothed_ramp"]


def progress(step: int, steps_per_epoch: int, start: float, length: float) -> float:
    """Ramp progress ``t`` in [0, 1] after optimizer step ``step`` (0-based).

    ``t = clip((step + 1 - start * S) / (length * S), 0, 1)`` with ``S`` steps per epoch;
    ``length`` 0: ``t = 0`` during the first ``start`` epochs, 1 afterwards.

    Parameters
    ----------
    step : the optimizer step, counted from 0 over the whole run
    steps_per_epoch : ``S``
    start : epochs at ``t = 0`` before the ramp
    length : epochs of the ramp

    Returns
    -------
    float
    """
    begin = start * steps_per_epoch
    if length <= 0:
        return 0.0 if step < begin else 1.0
    return min(1.0, max(0.0, (step + 1 - begin) / (length * steps_per_epoch)))


def smoothed_ramp(t: float, power: float = SMOOTHED_POWER, mid: float = SMOOTHED_MID) -> float:
    """The smoothed ramp of Shi et al. (2021) at progress ``t``: ``a t^p`` below ``mid``, then linear to 1.

    The two parts meet at ``mid`` with the same value and slope; ``f(0) = 0``, ``f(1) = 1``,
    non-decreasing.

    Example
    -------
    >>> round(smoothed_ramp(0.25), 4), smoothed_ramp(0.0), smoothed_ramp(1.0)
    (0.0769, 0.0, 1.0)
    """
    t = min(1.0, max(0.0, t))
    a = 1.0 / (mid ** (power - 1.0) * (power * (1.0 - mid) + mid))
    if t < mid:
        ramp: float = a * t ** power
        return ramp
    at_mid: float = a * mid ** power
    return at_mid + (1.0 - at_mid) * (t - mid) / (1.0 - mid)


def eps_factor(schedule: str, t: float) -> float:
    """``f(t)``: the training radius as a fraction of ``--eps`` at ramp progress ``t``."""
    if schedule == "smoothed":
        return smoothed_ramp(t)
    if schedule == "linear":
        return min(1.0, max(0.0, t))
    raise ValueError(f"eps schedule must be one of {', '.join(EPS_SCHEDULES)}, got {schedule!r}")


def interpolate(begin: float, end: float, t: float) -> float:
    """``begin + (end - begin) * t``: a weight (kappa, beta) moving linearly over the ramp."""
    t = min(1.0, max(0.0, t))
    value = begin + (end - begin) * t
    return end if math.isclose(t, 1.0) else value
