"""Randomized smoothing (Cohen et al. 2019): PREDICT and CERTIFY (theory.md §2.2).

The smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``.
Noise is added to the inputs in [0, 1] (the model carries its own
normalization) and is not clipped. CERTIFY's radius is **certified for g**,
with probability at least ``1 - alpha`` over the sampling, not for the base
model f.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from bounds.errors import BoundsError

ABSTAIN = -1


@dataclass
class SmoothingPrediction:
    """PREDICT: ``prediction`` (B,) class of g, or -1 (abstain); ``counts`` (B, K)."""

    prediction: torch.Tensor
    counts: torch.Tensor


@dataclass
class SmoothingCertificate:
    """CERTIFY: ``prediction`` (B,) (-1 = abstain), L2 ``radius`` (B,) (0 where abstaining),
    ``p_lower`` the one-sided Clopper-Pearson lower bound of ``P(f(x + e) = prediction)``.
    Certified for the smoothed classifier g at confidence ``1 - alpha``."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    sigma: float
    alpha: float
    kind: str = "certified (smoothed classifier)"

    def radius_for(self, y: torch.Tensor) -> torch.Tensor:
        """Certified L2 radius of g for the labels ``y``: ``radius`` where g predicts y, else 0."""
        return torch.where(self.prediction == y.to(self.prediction.device), self.radius,
                           torch.zeros_like(self.radius))


def noise_counts(model: torch.nn.Module, x: torch.Tensor, sigma: float, n: int, batch_size: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``counts[i, c]`` = how many of ``n`` noisy copies ``x_i + N(0, sigma^2)`` f classifies as c.

    Copies of all examples are stacked into forward passes of ``batch_size``
    points; the noise is drawn on the generator's device (by default a
    generator on x's device, seed 0), so a generator state reproduces the counts.
    """
    if sigma <= 0 or n < 1 or batch_size < 1 or len(x) < 1:
        raise BoundsError("smoothing needs sigma > 0, n >= 1, batch_size >= 1 and at least one example")
    generator = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    counts: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(x) * n, batch_size):
            example = torch.arange(start, min(start + batch_size, len(x) * n), device=x.device) // n
            noise = torch.randn((len(example), *x.shape[1:]), generator=generator, device=generator.device,
                                dtype=x.dtype)
            logits = model(x[example] + sigma * noise.to(x.device))
            if counts is None:
                counts = torch.zeros(len(x), logits.shape[1], dtype=torch.long, device=x.device)
            counts.index_put_((example, logits.argmax(dim=1)), torch.ones_like(example), accumulate=True)
    assert counts is not None  # x is not empty: the loop ran at least once
    return counts


def clopper_pearson_lower(successes: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """One-sided ``1 - alpha`` lower confidence bound of a binomial proportion:
    ``Beta(alpha; k, n - k + 1)`` quantile (0 when k = 0)."""
    k = successes.detach().cpu().double().numpy()
    lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    return torch.as_tensor(lower, dtype=torch.float64)


def smoothing_predict(model: torch.nn.Module, x: torch.Tensor, sigma: float, n: int, alpha: float,
                      batch_size: int = 1000, generator: torch.Generator | None = None) -> SmoothingPrediction:
    """PREDICT: the top class if a two-sided binomial test of ``n_A`` vs ``n_B`` (top two counts)
    rejects p = 1/2 at level alpha (``scipy.stats.binomtest``), else abstain (Cohen et al. 2019)."""
    counts = noise_counts(model, x, sigma, n, batch_size, generator)
    top2 = counts.topk(2, dim=1)
    prediction = top2.indices[:, 0].clone()
    for i, (n_a, n_b) in enumerate(top2.values.tolist()):
        if stats.binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            prediction[i] = ABSTAIN
    return SmoothingPrediction(prediction, counts)


def smoothing_certify(model: torch.nn.Module, x: torch.Tensor, sigma: float, n0: int = 100, n: int = 100_000,
                      alpha: float = 0.001, batch_size: int = 1000,
                      generator: torch.Generator | None = None) -> SmoothingCertificate:
    """CERTIFY (Cohen et al. 2019): pick ``c_A`` from ``n0`` noisy samples, bound
    ``p_A >= p_lower`` with ``n`` fresh samples (one-sided Clopper-Pearson at level
    alpha); if ``p_lower > 1/2`` return ``c_A`` and the L2 radius ``sigma * Phi^-1(p_lower)``,
    else abstain. theory.md §2.2.
    """
    if not 0 < alpha < 1:
        raise BoundsError(f"alpha must be in (0, 1), got {alpha}")
    generator = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    selection = noise_counts(model, x, sigma, n0, batch_size, generator).argmax(dim=1)  # independent of counts
    counts = noise_counts(model, x, sigma, n, batch_size, generator)
    p_lower = clopper_pearson_lower(counts.gather(1, selection.view(-1, 1)).squeeze(1), n, alpha)
    certified = p_lower > 0.5
    radius = torch.where(certified, sigma * torch.special.ndtri(p_lower), torch.zeros_like(p_lower))
    prediction = torch.where(certified.to(x.device), selection, torch.full_like(selection, ABSTAIN))
    return SmoothingCertificate(prediction, radius.to(device=x.device, dtype=x.dtype), p_lower.to(x.device),
                                float(sigma), float(alpha))
