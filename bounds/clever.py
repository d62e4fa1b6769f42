"""CLEVER scores (Weng et al. 2018): sampled local Lipschitz constants, an **estimate** (theory.md §2.2).

For a margin ``m_j = f_y - f_j`` and the ball ``B_p(x, R)`` (clipped to [0, 1]),
``m_j(x + delta) >= m_j(x) - ||delta||_p L_q`` with ``L_q = max ||grad m_j||_q``
over the ball (q the dual norm). CLEVER estimates ``L_q`` from ``n_batches``
batches of ``batch_size`` uniform samples: the maximum gradient norm of every
batch, then the location of a reverse-Weibull fit of those maxima (the
distribution's finite right end point). The score ``min(min_j m_j(x) / L_j, R)``
is NOT a certificate: sampling can miss the largest gradients.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, stats

from bounds.errors import BoundsError
from bounds.gradients import margin_gradients, other_classes
from bounds.norms import batch_norm, dual_norm, parse_norm, random_in_ball

INITIAL_SHAPES = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # the initial shapes of Weng et al.'s code
MIN_P_VALUE = 0.001  # below this Kolmogorov-Smirnov p-value no fit is accepted (as in Weng et al.)
SCALE_PENALTY = 0.01  # the "mle_reg" penalty of Weng et al.'s code, on the rescaled sample


@dataclass
class WeibullFit:
    """Estimated right end point of the batch maxima; ``fitted=False`` means the sample maximum is used."""

    location: float
    p_value: float
    fitted: bool


@dataclass
class CleverResult:
    """CLEVER scores, an **estimate** (never a certificate).

    ``score`` (B,) ``= clamp(min_j margin_j / lipschitz_j, 0, R)``; per target class
    (B, M): ``targets``, ``margin`` at x, ``lipschitz`` (the estimated ``L_q``),
    ``sample_max`` (largest sampled gradient norm) and ``fallback`` (True where
    no Weibull fit was acceptable and the sample maximum was used).
    """

    score: torch.Tensor
    targets: torch.Tensor
    margin: torch.Tensor
    lipschitz: torch.Tensor
    sample_max: torch.Tensor
    fallback: torch.Tensor
    norm: float
    radius: float
    kind: str = "estimate"


def _reverse_weibull_nll(theta: np.ndarray, sample: np.ndarray) -> float:
    """Negative log-likelihood of ``weibull_max(c, loc, scale)`` plus ``SCALE_PENALTY * scale^2``."""
    shape, loc, scale = theta
    z = (loc - sample) / scale
    if shape <= 0 or scale <= 0 or z.min() <= 0:
        return math.inf
    nll = -(np.log(shape / scale) + (shape - 1) * np.log(z) - z**shape).sum()
    return float(nll + SCALE_PENALTY * scale**2)


def fit_reverse_weibull(maxima: np.ndarray, initial_shapes: tuple[float, ...] = INITIAL_SHAPES,
                        min_p_value: float = MIN_P_VALUE) -> WeibullFit:
    """Location of the best reverse-Weibull (``scipy.stats.weibull_max``) fit of batch maxima.

    As in Weng et al.'s code: the sample is rescaled to [-1, 0]; for every
    initial shape a maximum-likelihood fit (Nelder-Mead, ``scipy.optimize.fmin``,
    started from ``weibull_max.fit_loc_scale``; a tiny scale penalty stops it
    from diverging) is tested with Kolmogorov-Smirnov, and the best p-value
    kept. It is rejected (sample maximum returned, ``fitted=False``) when that
    p-value is below ``min_p_value``, when its location lies below the sample
    maximum, or when the maxima are (numerically) all equal.
    """
    maxima = np.asarray(maxima, dtype=np.float64)
    top, spread = float(maxima.max()), float(maxima.max() - maxima.min())
    if spread <= 1e-6 * abs(top) or spread == 0.0:
        return WeibullFit(top, math.nan, False)
    rescaled = (maxima - top) / spread
    best = WeibullFit(top, math.nan, False)
    for shape0 in initial_shapes:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            loc0, scale0 = stats.weibull_max.fit_loc_scale(rescaled, shape0)
            start = (shape0, max(float(loc0), 0.05), max(float(scale0), 0.05))
            shape, loc, scale = optimize.fmin(_reverse_weibull_nll, start, (rescaled,), disp=False)
            loc, scale = top + loc * spread, scale * spread
            p_value = float(stats.kstest(maxima, stats.weibull_max(shape, loc, scale).cdf).pvalue)
        if math.isfinite(p_value) and (not best.fitted or p_value > best.p_value):
            best = WeibullFit(loc, p_value, True)
    if not best.p_value >= min_p_value or not best.location >= top:
        return WeibullFit(top, best.p_value, False)
    return best


def clever(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str | float, radius: float,
           n_batches: int = 50, batch_size: int = 128, targets: torch.Tensor | None = None,
           generator: torch.Generator | None = None, points_per_step: int = 4096,
           initial_shapes: tuple[float, ...] = INITIAL_SHAPES, min_p_value: float = MIN_P_VALUE) -> CleverResult:
    """Untargeted (``targets=None``: every j != y) or targeted (``targets`` (B,) or (B, M)) CLEVER.

    Points are drawn uniformly in ``B_p(x, radius)`` (``bounds.norms.random_in_ball``,
    on the generator's device; default generator: CPU, seed 0) and clipped to
    [0, 1]. The batches of all examples are stacked so that each step is one
    forward and one batched backward over about ``points_per_step`` points; the
    Weibull fits of an example run on a worker thread as soon as its batches are
    done, while the next gradients are computed. The model must be in eval mode.
    theory.md §2.2.
    """
    p = parse_norm(norm)
    if not radius > 0 or n_batches < 2 or batch_size < 1:
        raise BoundsError("CLEVER needs radius > 0, n_batches >= 2 and batch_size >= 1")
    q = dual_norm(p)
    device = x.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(x)
    y = y.to(device)
    targets = other_classes(y, logits.shape[1]) if targets is None else targets.view(len(y), -1).to(device)
    margin = logits.gather(1, y.view(-1, 1)) - logits.gather(1, targets)
    n_examples, n_targets = targets.shape
    n_cells = n_examples * n_batches  # one cell = one batch of one example, example-major

    def fit_example(maxima: np.ndarray) -> list[WeibullFit]:
        return [fit_reverse_weibull(maxima[:, j], initial_shapes, min_p_value) for j in range(n_targets)]

    maxima = torch.empty(n_cells, n_targets, device=device)
    cells_per_step = max(1, points_per_step // batch_size)
    with ThreadPoolExecutor(max_workers=1) as fitter:
        fits = []
        for start in range(0, n_cells, cells_per_step):
            stop = min(start + cells_per_step, n_cells)
            example = (torch.arange(start, stop, device=device) // n_batches).repeat_interleave(batch_size)
            centers = x[example]
            noise = random_in_ball(centers.shape, p, radius, generator, generator.device, x.dtype)
            points = (centers + noise.to(device)).clamp(0.0, 1.0)
            grads = margin_gradients(model, points, y[example], targets[example]).grad
            norms = batch_norm(grads.flatten(0, 1), q).view(stop - start, batch_size, n_targets)
            maxima[start:stop] = norms.amax(dim=1)
            for i in range(len(fits), stop // n_batches):  # examples whose batches are all done
                sample = maxima[i * n_batches:(i + 1) * n_batches].double().cpu().numpy()
                fits.append(fitter.submit(fit_example, sample))
        fits = [f.result() for f in fits]

    lipschitz = torch.tensor([[f.location for f in row] for row in fits], dtype=margin.dtype, device=device)
    fallback = torch.tensor([[not f.fitted for f in row] for row in fits], device=device)
    ratio = torch.where(margin > 0, margin / lipschitz, torch.zeros_like(margin))  # m / 0 = inf, capped at R
    score = ratio.amin(dim=1).clamp(0.0, radius)
    sample_max = maxima.view(n_examples, n_batches, n_targets).amax(dim=1).to(margin.dtype)
    return CleverResult(score, targets, margin, lipschitz, sample_max, fallback, p, float(radius))
