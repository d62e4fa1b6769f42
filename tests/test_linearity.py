"""Local linearity (bounds.linearity, theory.md §3): PGD estimate <= certified bound, exactness on linear models."""

import pytest
import torch
from torch import nn

from bounds.attack import pgd_maximize
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.linearity import (
    CE,
    MARGIN,
    LinearityBounder,
    gamma_certified,
    gamma_estimate,
    linearity_gap,
    robust_loss_upper,
    scalar_gradients,
    scalar_values,
)
from certkd.models import create_model

SHAPE = (1, 4, 4)
K = 4
# float32 rounding of h(x + delta) - h(x) - delta . c in the PGD estimate
ROUNDING = 2e-5


def small_net(seed: int, family: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    if family == "cnn4":
        model = create_model("cnn4", num_classes=K, input_shape=(1, 8, 8), mean=[0.4], std=[0.3], width=3, linear=8)
    else:
        model = create_model("mlp", num_classes=K, input_shape=SHAPE, mean=[0.5], std=[0.25], hidden=[12, 12])
    return model.eval()


def points(model: nn.Module, n: int, seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def linear_model() -> nn.Module:
    torch.manual_seed(3)
    return create_model("mlp", num_classes=K, input_shape=SHAPE, mean=[0.5], std=[0.25], hidden=[]).eval()


@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("2", 0.3)])
@pytest.mark.usefixtures("lirpa")
def test_linear_model_has_zero_margin_gamma_estimated_and_certified(norm, eps):
    model = linear_model()
    x, y = points(model, 6, 0)
    est = gamma_estimate(model, x, y, eps, norm, MARGIN, steps=10, restarts=1,
                         generator=torch.Generator().manual_seed(0))
    cert = gamma_certified(model, x, y, eps, norm, MARGIN)
    assert est.kind == "estimate" and cert.kind == "certified"
    assert est.gamma.shape == cert.gamma.shape == (6, K - 1)
    assert float(est.gamma.max()) < ROUNDING
    assert float(cert.gamma.max()) < 1e-9


def test_gap_of_convex_loss_is_nonnegative_and_zero_at_zero():
    # CE of a linear model is convex in x, so h(x + d) >= h(x) + d . grad h(x): the gap is >= 0
    model = linear_model()
    x, y = points(model, 8, 1)
    grads = scalar_gradients(model, x, y, CE)
    assert torch.allclose(linearity_gap(model, x, y, torch.zeros_like(x), CE, grads), torch.zeros(8, 1), atol=1e-6)
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.4
    gap = linearity_gap(model, x, y, delta, CE, grads)
    assert gap.shape == (8, 1)
    assert float(gap.min()) >= -1e-6
    assert float(gap.max()) > 1e-4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norm,eps", [("inf", 0.03), ("2", 0.2)])
@pytest.mark.usefixtures("lirpa")
def test_pgd_gamma_never_exceeds_certified_gamma(seed, norm, eps):
    family = "cnn4" if seed == 2 else "mlp"
    model = small_net(seed, family)
    x, y = points(model, 5, 10 + seed, (1, 8, 8) if family == "cnn4" else SHAPE)
    bounder = LinearityBounder(model, tuple(x.shape[1:]), "crown", norm)
    for target in (CE, MARGIN):
        est = gamma_estimate(model, x, y, eps, norm, target, steps=15, restarts=1,
                             generator=torch.Generator().manual_seed(seed))
        cert = bounder.gamma(model, x, y, eps, target)
        assert torch.all(est.gamma <= cert.gamma + ROUNDING), (target, (est.gamma - cert.gamma).max())
        assert float(est.gamma.max()) > 1e-4  # the ReLU net is not linear on these balls


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("2", 0.3)])
@pytest.mark.usefixtures("lirpa")
def test_bounds_with_an_arbitrary_slope_contain_every_attacked_value(method, norm, eps):
    # a large slope c makes delta . c dominate: a method that dropped it (IBP under L2) would fail here
    model = small_net(5)
    x, y = points(model, 4, 3)
    bounder = LinearityBounder(model, SHAPE, method, norm)
    for target in (CE, MARGIN):
        m = 1 if target == CE else K - 1
        slope = torch.randn(4, m, *SHAPE, generator=torch.Generator().manual_seed(4)) * 3
        b = bounder.bounds(x, y, eps, target, slope)
        assert torch.all(b.lower <= b.center) and torch.all(b.center <= b.upper)
        for j in range(m):
            c = slope[:, j].flatten(1)
            for sign in (1.0, -1.0):
                def objective(z, j=j, sign=sign, target=target, c=c):
                    return sign * (scalar_values(model(z), y, target)[:, j] - ((z - x).flatten(1) * c).sum(1))

                _, best = pgd_maximize(objective, x, eps, norm, steps=20, restarts=1,
                                       generator=torch.Generator().manual_seed(j))
                limit = b.upper[:, j] if sign > 0 else -b.lower[:, j]
                assert torch.all(best <= limit + 1e-4), (target, j, sign)


def test_robust_loss_upper_is_above_the_attacked_loss():
    model = small_net(6)
    x, y = points(model, 6, 4)
    upper = robust_loss_upper(model, x, y, 0.05, "inf")

    def ce(z):
        return nn.functional.cross_entropy(model(z), y, reduction="none")

    _, attacked = pgd_maximize(ce, x, 0.05, "inf", steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.all(attacked <= upper + 1e-5)
    assert torch.all(torch.isfinite(upper))


def test_estimate_is_reproducible_and_zero_at_eps_zero():
    model = small_net(7)
    x, y = points(model, 4, 5)
    a = gamma_estimate(model, x, y, 0.05, "inf", MARGIN, steps=5, generator=torch.Generator().manual_seed(3))
    b = gamma_estimate(model, x, y, 0.05, "inf", MARGIN, steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.gamma, b.gamma)
    zero = gamma_estimate(model, x, y, 0.0, "inf", CE, steps=3)
    assert float(zero.gamma.max()) == 0.0


@pytest.mark.usefixtures("lirpa")
def test_bad_arguments_raise_bounds_errors():
    model = small_net(8)
    x, y = points(model, 2, 6)
    with pytest.raises(BoundsError):
        gamma_estimate(model, x, y, 0.1, "inf", "logits")
    with pytest.raises(BoundsError):
        gamma_estimate(model, x, y, -0.1, "inf", CE)
    with pytest.raises(BoundsError):  # IBP drops the linear term under L2: refused for every norm
        LinearityBounder(model, SHAPE, "ibp", "inf")


@pytest.mark.parametrize("name,kwargs", [("cnn7", {"width": 4, "linear": 16}), ("resnet_small", {"width": 4})])
@pytest.mark.usefixtures("lirpa")
def test_batchnorm_and_residual_models_pgd_gamma_below_certified(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=K, input_shape=(3, 8, 8), mean=[0.5] * 3, std=[0.25] * 3, **kwargs)
    model.train()
    with torch.no_grad():  # running statistics that differ from the identity
        model(torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    model.eval()
    x, y = points(model, 3, 2, (3, 8, 8))
    cert = gamma_certified(model, x, y, 2 / 255, "inf", MARGIN)
    est = gamma_estimate(model, x, y, 2 / 255, "inf", MARGIN, steps=10, restarts=1,
                         generator=torch.Generator().manual_seed(0))
    assert torch.all(est.gamma <= cert.gamma + ROUNDING)
    assert torch.all(torch.isfinite(cert.gamma))


@pytest.mark.usefixtures("lirpa")
def test_attention_models_are_refused_by_the_allow_list():
    model = create_model("vit", num_classes=K, input_shape=(3, 8, 8), mean=[0.5] * 3, std=[0.25] * 3, dim=8,
                         depth=1, heads=2).eval()
    x, y = points(model, 2, 0, (3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="attention"):
        gamma_certified(model, x, y, 0.01, "inf", CE)
    # the estimate needs no bound propagation
    assert gamma_estimate(model, x, y, 0.01, "inf", CE, steps=3).gamma.shape == (2, 1)
