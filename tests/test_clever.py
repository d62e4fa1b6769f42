"""Input gradients (bounds.gradients) and CLEVER estimates (bounds.clever, theory.md §2.2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import nn

from bounds.clever import clever, fit_reverse_weibull, nelder_mead
from bounds.errors import BoundsError
from bounds.gradients import loss_gradient, margin_gradients, other_classes
from bounds.nn import Normalize
from bounds.norms import dual_norm, parse_norm
from certkd.models import create_model

DIGITS = (1, 8, 8)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.4], [0.3]), nn.Flatten(), nn.Linear(64, 5)).eval()


def test_margin_and_loss_gradients_match_one_backward_per_example_and_class():
    torch.manual_seed(0)
    model = create_model("cnn4", 10, DIGITS, width=4, linear=16).eval()
    x = torch.rand(6, *DIGITS)
    y = torch.randint(0, 10, (6,))
    batched = margin_gradients(model, x, y)
    others = other_classes(y, 10)
    assert batched.grad.shape == (6, 9, *DIGITS) and bool((others != y.view(-1, 1)).all())
    for i in range(6):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = model(xi)[0]
        for k, j in enumerate(others[i].tolist()):
            (g,) = torch.autograd.grad(logits[y[i]] - logits[j], xi, retain_graph=True)
            assert torch.allclose(batched.grad[i, k], g[0], atol=1e-6)
            assert float(batched.value[i, k]) == pytest.approx(float((logits[y[i]] - logits[j]).detach()), abs=1e-5)
        (g,) = torch.autograd.grad(F.cross_entropy(logits[None], y[i:i + 1]), xi)
        assert torch.allclose(loss_gradient(model, x, y).grad[i], g[0], atol=1e-6)
    targeted = margin_gradients(model, x, y, targets=others[:, 2])
    assert targeted.grad.shape == (6, 1, *DIGITS)
    assert torch.allclose(targeted.grad[:, 0], batched.grad[:, 2], atol=1e-6)
    with pytest.raises(BoundsError):
        margin_gradients(model, x, y, targets=y)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_clever_recovers_the_exact_lipschitz_constant_of_a_linear_model(norm):
    model = linear_model()
    x = torch.rand(4, *DIGITS, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    radius = 0.5
    result = clever(model, x, y, norm, radius, n_batches=5, batch_size=16, generator=torch.Generator().manual_seed(0))
    w = model[2].weight.detach().double() / 0.3  # gradient of f w.r.t. the [0, 1] input
    q = dual_norm(parse_norm(norm))
    exact = (w[y].unsqueeze(1) - w[result.targets]).norm(p=q, dim=2)  # ||w_y - w_j||_q, constant
    assert result.kind == "estimate" and result.lipschitz.shape == (4, 4)
    assert torch.allclose(result.lipschitz.double(), exact, rtol=1e-5)
    assert bool(result.fallback.all())  # constant gradients: nothing to fit, the sample maximum is exact
    expected = (result.margin.double() / exact).amin(1).clamp(0, radius)
    assert torch.allclose(result.score.double(), expected, rtol=1e-5)


def test_targeted_clever_and_score_cap():
    model = linear_model()
    x = torch.rand(3, *DIGITS, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    targets = (y + 1) % 5
    result = clever(model, x, y, "2", 10.0, n_batches=3, batch_size=4, targets=targets)
    w = model[2].weight.detach().double() / 0.3
    exact = (w[y] - w[targets]).norm(dim=1)
    assert result.targets.shape == (3, 1) and torch.equal(result.targets[:, 0], targets)
    assert torch.allclose(result.lipschitz[:, 0].double(), exact, rtol=1e-5)
    assert torch.allclose(result.score.double(), (result.margin[:, 0].double() / exact).clamp(max=10.0), rtol=1e-5)
    tiny = clever(model, x, y, "2", 1e-4, n_batches=3, batch_size=4, targets=targets)
    assert torch.allclose(tiny.score, torch.full((3,), 1e-4))  # capped at R
    wrong = clever(model, x, (y + 2) % 5, "2", 1.0, n_batches=3, batch_size=4)
    assert bool((wrong.score == 0).all())  # misclassified: score 0


def test_vectorized_nelder_mead_is_scipy_fmin():
    starts = np.array([[-1.2, 1.0], [0.5, -0.7], [2.0, 2.0], [0.0, 0.3]])
    shifts = np.array([1.0, 2.0, 0.5, -1.0])

    def rosenbrock(point, shift):
        return (shift - point[0]) ** 2 + 10 * (point[1] - point[0] ** 2) ** 2

    def objective(points, rows):
        return rosenbrock(points.T, torch.as_tensor(shifts)[rows])

    batched = nelder_mead(objective, torch.as_tensor(starts), max_calls=400).numpy()
    for start, shift, got in zip(starts, shifts, batched, strict=True):
        expected = optimize.fmin(rosenbrock, start, (shift,), maxfun=400, disp=False)
        assert got == pytest.approx(expected, abs=1e-9)


def test_weibull_fit_recovers_the_end_point_and_falls_back_when_it_cannot():
    rng = np.random.default_rng(0)
    good = stats.weibull_max(3.0, loc=2.0, scale=1.0).rvs((2, 200), random_state=rng)
    bimodal = np.concatenate([np.full(100, 1.0), np.full(100, 2.0)]) + rng.normal(0, 1e-3, 200)
    fit = fit_reverse_weibull(torch.as_tensor(np.stack([good[0], good[1], bimodal, np.full(200, 3.5)])))
    assert fit.fitted.tolist() == [True, True, False, False]  # the bimodal and constant samples fall back
    for i in range(2):
        assert good[i].max() <= float(fit.location[i]) <= 2.1 and float(fit.p_value[i]) >= 0.001
        shape, loc, scale = stats.weibull_max.fit(good[i])  # scipy's own fit agrees on the end point
        assert float(fit.location[i]) == pytest.approx(loc, abs=0.02)
        assert float(fit.p_value[i]) == pytest.approx(stats.kstest(good[i], "weibull_max",
                                                                   (shape, loc, scale)).pvalue, abs=0.2)
    assert float(fit.location[2]) == bimodal.max() and float(fit.location[3]) == 3.5
    assert float(fit.p_value[2]) < 0.001


def test_clever_on_a_nonlinear_model_is_at_least_the_sampled_maximum():
    torch.manual_seed(0)
    model = create_model("mlp", 4, DIGITS, mean=[0.3], std=[0.4], hidden=[32]).eval()
    x = torch.rand(2, *DIGITS, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    generator = torch.Generator().manual_seed(5)
    result = clever(model, x, y, "inf", 0.2, n_batches=20, batch_size=32, generator=generator)
    again = clever(model, x, y, "inf", 0.2, n_batches=20, batch_size=32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(result.score, again.score)  # a seed reproduces the run
    assert bool((result.lipschitz >= result.sample_max * (1 - 1e-6)).all())
    assert bool((result.score > 0).all()) and bool((result.score <= 0.2).all())
    assert bool(torch.equal(result.lipschitz[result.fallback], result.sample_max[result.fallback]))


def test_vit_gets_clever_scores():
    torch.manual_seed(0)
    model = create_model("vit", 10, DIGITS, dim=16, depth=1, heads=2).eval()
    x = torch.rand(2, *DIGITS, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1)
    result = clever(model, x, y, "2", 0.5, n_batches=8, batch_size=16)
    assert result.lipschitz.shape == (2, 9)
    assert bool(torch.isfinite(result.lipschitz).all()) and bool((result.lipschitz > 0).all())
    assert bool((result.score > 0).all()) and bool((result.score <= 0.5).all())
    assert bool((result.lipschitz >= result.sample_max * (1 - 1e-6)).all())
