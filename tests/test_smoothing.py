"""Randomized smoothing (bounds.smoothing, Cohen et al. 2019, theory.md §2.2)."""

import math

import pytest
import torch
from scipy import stats
from torch import nn

from bounds.attack import pgd
from bounds.errors import BoundsError
from bounds.smoothing import (
    ABSTAIN,
    clopper_pearson_lower,
    noise_counts,
    smoothing_certify,
    smoothing_predict,
)
from certkd.data import load_dataset
from certkd.models import create_model

DIGITS = (1, 8, 8)


class Constant(nn.Module):
    """Always predicts class 0 of 3."""

    def forward(self, x):
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)


class FirstPixel(nn.Module):
    """Class 0 when the first pixel exceeds 0.5, else class 1 (a 50/50 coin at 0.5 under noise)."""

    def forward(self, x):
        s = x.flatten(1)[:, :1] - 0.5
        return torch.cat([s, -s], dim=1)


class LinearBinary(nn.Module):
    """Logits ``(w.x + b, 0)``: the smoothed classifier is known in closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def upper_confidence(k: int, n: int, alpha: float) -> float:
    return 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_radius_matches_hand_computed_values():
    x = torch.rand(2, *DIGITS)
    for n, alpha, sigma in [(100, 0.001, 0.25), (1000, 0.01, 0.5)]:
        cert = smoothing_certify(Constant(), x, sigma, n0=10, n=n, alpha=alpha, batch_size=64, generator=gen(0))
        p_lower = alpha ** (1 / n)  # Clopper-Pearson with all n successes
        assert cert.kind.startswith("certified") and torch.equal(cert.prediction, torch.zeros(2, dtype=torch.long))
        assert torch.allclose(cert.p_lower, torch.full((2,), p_lower, dtype=torch.float64), rtol=1e-9)
        expected = sigma * stats.norm.ppf(p_lower)  # e.g. 0.25 * Phi^-1(0.001^(1/100)) = 0.3751
        assert torch.allclose(cert.radius.double(), torch.full((2,), expected, dtype=torch.float64), rtol=1e-5)
    assert cert.radius_for(torch.tensor([0, 1])).tolist() == [pytest.approx(expected, rel=1e-5), 0.0]


def test_clopper_pearson_lower_bound_has_exact_coverage():
    k = torch.tensor([0, 1, 37, 50, 99, 100])
    lower = clopper_pearson_lower(k, 100, 0.05)
    assert lower[0] == 0.0
    for ki, p in zip(k.tolist()[1:], lower.tolist()[1:], strict=True):
        assert stats.binom.sf(ki - 1, 100, p) == pytest.approx(0.05, rel=1e-6)  # P(Bin(n, p) >= k) = alpha
    assert lower[-1] == pytest.approx(0.05 ** (1 / 100))


def test_abstains_on_a_fifty_fifty_model():
    x = torch.full((3, *DIGITS), 0.5)
    cert = smoothing_certify(FirstPixel(), x, 0.25, n0=50, n=500, alpha=0.001, batch_size=200, generator=gen(1))
    assert torch.equal(cert.prediction, torch.full((3,), ABSTAIN))
    assert bool((cert.radius == 0).all()) and bool((cert.p_lower < 0.5).all())
    assert bool((cert.radius_for(torch.zeros(3, dtype=torch.long)) == 0).all())
    pred = smoothing_predict(FirstPixel(), x, 0.25, n=500, alpha=0.001, batch_size=200, generator=gen(2))
    assert torch.equal(pred.prediction, torch.full((3,), ABSTAIN)) and bool((pred.counts.sum(1) == 500).all())
    clear = smoothing_predict(FirstPixel(), torch.full((2, *DIGITS), 0.9), 0.25, n=200, alpha=0.001,
                              batch_size=200, generator=gen(2))
    assert torch.equal(clear.prediction, torch.zeros(2, dtype=torch.long))


def test_linear_model_radius_is_below_the_true_distance_and_monte_carlo_agrees():
    w = torch.randn(64, generator=gen(3))
    w = w / w.norm()
    x = torch.rand(1, *DIGITS, generator=gen(4))
    sigma, distance = 0.5, 0.5
    model = LinearBinary(w, distance - float(x.flatten() @ w))  # w.x + b = distance, ||w|| = 1
    cert = smoothing_certify(model, x, sigma, n0=100, n=4000, alpha=0.001, batch_size=2000, generator=gen(5))
    assert int(cert.prediction) == 0
    assert 0.8 * distance <= float(cert.radius) <= distance  # sigma * Phi^-1(p_A) is exactly the distance
    moved = x - 0.99 * float(cert.radius) * w.view(1, *DIGITS)  # the worst direction
    counts = noise_counts(model, moved, sigma, 4000, 2000, gen(6))
    guaranteed = stats.norm.cdf(stats.norm.ppf(float(cert.p_lower)) - 0.99 * float(cert.radius) / sigma)
    assert upper_confidence(int(counts[0, 0]), 4000, 0.001) >= guaranteed > 0.5


def test_monte_carlo_does_not_contradict_certificates_of_a_trained_model(digits_trio):
    model = digits_trio.kdiga
    test = load_dataset("digits", "test")
    x, y = test.x[:16], test.y[:16]
    sigma, n = 0.25, 1000
    cert = smoothing_certify(model, x, sigma, n0=64, n=n, alpha=0.001, batch_size=4096, generator=gen(7))
    ok = cert.prediction >= 0
    assert int(ok.sum()) >= 8 and float((cert.prediction[ok] == y[ok]).float().mean()) >= 0.8
    xs, cls, radius, p_lower = x[ok], cert.prediction[ok], cert.radius[ok], cert.p_lower[ok]
    # inside the certified ball: a random direction and the base model's PGD direction, both at the radius
    direction = torch.randn(xs.shape, generator=gen(8))
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    random_point = xs + radius.view(-1, 1, 1, 1) * direction
    attacked = pgd(model, xs, cls, radius, "2", steps=10, generator=gen(9)).x_adv
    for points in (random_point, attacked):
        delta = (points - xs).flatten(1).norm(dim=1).double()
        assert bool((delta <= radius.double() * (1 + 1e-5)).all())
        counts = noise_counts(model, points, sigma, n, 4096, gen(10)).gather(1, cls.view(-1, 1)).squeeze(1)
        for k, p, d in zip(counts.tolist(), p_lower.tolist(), delta.tolist(), strict=True):
            guaranteed = stats.norm.cdf(stats.norm.ppf(p) - d / sigma)  # p_A(x + delta), Cohen et al. Thm 1
            assert upper_confidence(k, n, 0.001) >= guaranteed >= 0.5 - 1e-6


def test_certify_is_reproducible_with_a_fixed_generator():
    model = FirstPixel()
    x = torch.full((5, *DIGITS), 0.5)
    x[:, 0, 0, 0] = torch.linspace(0.45, 0.65, 5)
    a = smoothing_certify(model, x, 0.3, n0=20, n=200, alpha=0.01, batch_size=128, generator=gen(12))
    b = smoothing_certify(model, x, 0.3, n0=20, n=200, alpha=0.01, batch_size=128, generator=gen(12))
    c = smoothing_certify(model, x, 0.3, n0=20, n=200, alpha=0.01, batch_size=128, generator=gen(13))
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.p_lower, b.p_lower)
    assert not torch.equal(a.p_lower, c.p_lower)  # another seed, other samples
    with pytest.raises(BoundsError):
        smoothing_certify(model, x, 0.0)
    with pytest.raises(BoundsError):
        smoothing_certify(model, x, 0.3, alpha=1.5)


def test_vit_gets_smoothing_certificates():
    torch.manual_seed(0)
    model = create_model("vit", 10, DIGITS, dim=16, depth=1, heads=2).eval()
    x = torch.rand(3, *DIGITS, generator=gen(15))
    cert = smoothing_certify(model, x, 0.1, n0=16, n=128, alpha=0.01, batch_size=256, generator=gen(16))
    assert cert.prediction.shape == cert.radius.shape == (3,)
    certified = cert.prediction >= 0
    assert bool((cert.radius[certified] > 0).all()) and bool((cert.radius[~certified] == 0).all())
    bound = 0.1 * stats.norm.ppf(0.01 ** (1 / 128))  # the largest radius n = 128 samples can give
    assert bool((cert.radius <= bound + 1e-6).all()) and math.isfinite(float(cert.radius.sum()))
