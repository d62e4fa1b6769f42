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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy import stats

from bounds.errors import BoundsError
from bounds.gradients import margin_gradients, other_classes
from bounds.norms import batch_norm, dual_norm, parse_norm, random_in_ball

INITIAL_SHAPES = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # the initial shapes of Weng et al.'s code
MIN_P_VALUE = 0.001  # below this Kolmogorov-Smirnov p-value no fit is accepted (as in Weng et al.)
COMPACT_EVERY = 16  # Nelder-Mead iterations between drops of finished fits
SCALE_PENALTY = 0.01  # the "mle_reg" penalty of Weng et al.'s code, on the rescaled sample


@dataclass
class WeibullFit:
    """Estimated right end points of batch maxima; where ``fitted`` is False the sample maximum is used."""

    location: torch.Tensor
    p_value: torch.Tensor
    fitted: torch.Tensor


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


def nelder_mead(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], start: torch.Tensor, max_calls: int, tol: float = 1e-4) -> torch.Tensor:
    """``scipy.optimize.fmin`` (Nelder-Mead, ``xtol = ftol = tol``, ``maxfun = max_calls``) on P
    independent problems at once. ``objective(points (R, D), rows (R,))`` returns the (R,) values of
    problems ``rows`` at those points; ``start`` (P, D). Each iteration evaluates the reflection and
    the one further point (expansion or contraction) its value calls for; finished problems are
    dropped every ``COMPACT_EVERY`` iterations. Returns the best vertex of every problem."""
    n_problems, dim = start.shape
    rows = torch.arange(n_problems, device=start.device)
    best = start.clone()
    simplex = start.unsqueeze(1).repeat(1, dim + 1, 1)
    simplex[:, 1:] += torch.diag_embed(torch.where(start != 0, 0.05 * start, torch.full_like(start, 2.5e-4)))
    values = torch.stack([objective(simplex[:, j], rows) for j in range(dim + 1)], dim=1)
    calls = torch.full((n_problems,), dim + 1, device=start.device)
    for iteration in range(max_calls + 1):
        values, order = values.sort(dim=1)
        simplex = simplex.gather(1, order.unsqueeze(2).expand(-1, -1, dim))
        spread_x = (simplex[:, 1:] - simplex[:, :1]).abs().amax(dim=(1, 2))
        spread_f = (values[:, 1:] - values[:, :1]).abs().amax(dim=1)
        active = ~((spread_x <= tol) & (spread_f <= tol)) & (calls < max_calls)
        if iteration % COMPACT_EVERY == 0 or iteration == max_calls:
            best[rows[~active]] = simplex[~active, 0]
            if iteration == max_calls or not bool(active.any()):
                break
            rows, simplex, values, calls, active = (t[active] for t in (rows, simplex, values, calls, active))
        centroid, worst = simplex[:, :-1].mean(dim=1), simplex[:, -1]
        reflected = 2 * centroid - worst
        f_r = objective(reflected, rows)
        expand, below_worst = f_r < values[:, 0], f_r < values[:, -1]
        contract = ~expand & ~(f_r < values[:, -2])
        step = torch.where(expand, 2.0, torch.where(below_worst, 0.5, -0.5)).to(centroid.dtype)
        second = centroid + step[:, None] * (centroid - worst)  # expansion, outside or inside contraction
        f_s = objective(second, rows)
        use_second = ((expand & (f_s < f_r)) | (contract & below_worst & (f_s <= f_r))
                      | (contract & ~below_worst & (f_s < values[:, -1])))
        shrink = active & contract & ~use_second
        replace = active & ~shrink
        simplex[:, -1] = torch.where(replace[:, None], torch.where(use_second[:, None], second, reflected), worst)
        values[:, -1] = torch.where(replace, torch.where(use_second, f_s, f_r), values[:, -1])
        if bool(shrink.any()):
            shrunk = simplex[:, :1] + 0.5 * (simplex[:, 1:] - simplex[:, :1])
            f_shrunk = torch.stack([objective(shrunk[:, j], rows) for j in range(dim)], dim=1)
            simplex[:, 1:] = torch.where(shrink[:, None, None], shrunk, simplex[:, 1:])
            values[:, 1:] = torch.where(shrink[:, None], f_shrunk, values[:, 1:])
        calls += active.long() * (1 + (expand | contract).long() + dim * shrink.long())
    return best


def fit_reverse_weibull(maxima: torch.Tensor, initial_shapes: tuple[float, ...] = INITIAL_SHAPES,
                        min_p_value: float = MIN_P_VALUE) -> WeibullFit:
    """Right end point of the best reverse-Weibull (``scipy.stats.weibull_max``) fit of each sample.

    ``maxima`` (..., n): one sample per leading index. As in Weng et al.'s code,
    every sample is rescaled to [-1, 0]; for every initial shape a regularized
    maximum-likelihood fit (Nelder-Mead, exactly ``scipy.optimize.fmin`` but run
    for all samples and shapes at once; started like ``weibull_max.fit``, from
    the moment estimates moved to cover the data) is scored by the exact
    Kolmogorov-Smirnov p-value (``scipy.stats.kstwo``); the best is kept. A fit
    is rejected (sample maximum used, ``fitted=False``) when its p-value is
    below ``min_p_value`` or the maxima are (numerically) all equal.
    """
    sample = torch.as_tensor(maxima).double()
    batch_shape, n = sample.shape[:-1], sample.shape[-1]
    sample = sample.reshape(-1, n)
    top = sample.amax(dim=1)
    spread = top - sample.amin(dim=1)
    todo = spread > 1e-6 * top.abs()  # (numerically) constant samples: nothing to fit
    location, p_value = top.clone(), torch.full_like(top, math.nan)
    if bool(todo.any()):
        rescaled = ((sample[todo] - top[todo, None]) / spread[todo, None]).sort(dim=1).values
        end_point, p_value[todo] = _fit_rescaled(rescaled, initial_shapes)
        location[todo] = top[todo] + end_point * spread[todo]
    fitted = todo & (p_value >= min_p_value) & (location >= top)
    location = torch.where(fitted, location, top)
    return WeibullFit(location.view(batch_shape), p_value.view(batch_shape), fitted.view(batch_shape))


def _fit_rescaled(rescaled: torch.Tensor, initial_shapes: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (Kolmogorov-Smirnov) location and p-value of sorted samples (S, n) with maximum 0."""
    n_samples, n = rescaled.shape
    data = rescaled.repeat(len(initial_shapes), 1)  # (shapes * samples, n), shape-major
    shape0 = torch.tensor(initial_shapes, dtype=torch.float64, device=data.device).repeat_interleave(n_samples)
    # weibull_max moments: mean -Gamma(1 + 1/c), variance Gamma(1 + 2/c) - Gamma(1 + 1/c)^2
    g1, g2 = torch.lgamma(1 + 1 / shape0), torch.lgamma(1 + 2 / shape0)
    scale0 = data.std(dim=1, correction=0) / torch.sqrt(torch.exp(g2) - torch.exp(2 * g1))
    loc0 = data.mean(dim=1) + scale0 * torch.exp(g1)
    covers = loc0 > 0  # the support (-inf, loc] must contain the sample maximum 0
    loc0, scale0 = torch.where(covers, loc0, 0.1), torch.where(covers, scale0, 1.0)

    def objective(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        shape, loc, scale = (t.unsqueeze(1) for t in theta.unbind(dim=1))
        z = (loc - data[rows]) / scale
        valid = (shape[:, 0] > 0) & (scale[:, 0] > 0) & (z.amin(dim=1) > 0)
        log_z = torch.log(z.clamp_min(1e-300))
        nll = -(torch.log(shape / scale) + (shape - 1) * log_z - torch.exp(shape * log_z)).sum(dim=1)
        return torch.where(valid, nll + SCALE_PENALTY * scale[:, 0] ** 2, torch.inf)

    theta = nelder_mead(objective, torch.stack([shape0, loc0, scale0], dim=1), max_calls=600)
    shape, loc, scale = (t.unsqueeze(1) for t in theta.unbind(dim=1))
    cdf = torch.exp(-((loc - data).clamp_min(0) / scale) ** shape)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=data.device)
    ks = torch.maximum((ranks / n - cdf).amax(dim=1), (cdf - (ranks - 1) / n).amax(dim=1))
    p_value = torch.as_tensor(stats.kstwo.sf(ks.cpu().numpy(), n), device=data.device).nan_to_num(0.0)
    best_p, best = p_value.view(len(initial_shapes), n_samples).max(dim=0)
    return loc[:, 0].view(len(initial_shapes), n_samples).gather(0, best.view(1, -1))[0], best_p


def clever(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str | float, radius: float,
           n_batches: int = 50, batch_size: int = 128, targets: torch.Tensor | None = None,
           generator: torch.Generator | None = None, points_per_step: int = 4096,
           initial_shapes: tuple[float, ...] = INITIAL_SHAPES, min_p_value: float = MIN_P_VALUE) -> CleverResult:
    """Untargeted (``targets=None``: every j != y) or targeted (``targets`` (B,) or (B, M)) CLEVER.

    Points are drawn uniformly in ``B_p(x, radius)`` (``bounds.norms.random_in_ball``,
    on the generator's device; by default a generator on x's device, seed 0) and clipped to
    [0, 1]. The batches of all examples are stacked so that each step is one
    forward and one batched backward over about ``points_per_step`` points; then
    all Weibull fits run together (``fit_reverse_weibull``). The model must be in
    eval mode.
    theory.md §2.2.
    """
    p = parse_norm(norm)
    if not radius > 0 or n_batches < 2 or batch_size < 1:
        raise BoundsError("CLEVER needs radius > 0, n_batches >= 2 and batch_size >= 1")
    q = dual_norm(p)
    device = x.device
    generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        logits = model(x)
    y = y.to(device)
    targets = other_classes(y, logits.shape[1]) if targets is None else targets.view(len(y), -1).to(device)
    margin = logits.gather(1, y.view(-1, 1)) - logits.gather(1, targets)
    n_examples, n_targets = targets.shape
    n_cells = n_examples * n_batches  # one cell = one batch of one example

    maxima = torch.empty(n_cells, n_targets, device=device)
    cells_per_step = max(1, points_per_step // batch_size)
    for start in range(0, n_cells, cells_per_step):
        stop = min(start + cells_per_step, n_cells)
        example = (torch.arange(start, stop, device=device) // n_batches).repeat_interleave(batch_size)
        centers = x[example]
        noise = random_in_ball(centers.shape, p, radius, generator, generator.device, x.dtype)
        points = (centers + noise.to(device)).clamp(0.0, 1.0)
        grads = margin_gradients(model, points, y[example], targets[example]).grad
        norms = batch_norm(grads.flatten(0, 1), q).view(stop - start, batch_size, n_targets)
        maxima[start:stop] = norms.amax(dim=1)

    maxima = maxima.view(n_examples, n_batches, n_targets).transpose(1, 2)  # (B, M, n_batches)
    fit = fit_reverse_weibull(maxima, initial_shapes, min_p_value)
    lipschitz = fit.location.to(margin.dtype)
    ratio = torch.where(margin > 0, margin / lipschitz, torch.zeros_like(margin))  # m / 0 = inf, capped at R
    score = ratio.amin(dim=1).clamp(0.0, radius)
    return CleverResult(score, targets, margin, lipschitz, maxima.amax(dim=2).to(margin.dtype), ~fit.fitted, p,
                        float(radius))
