"""APGD-CE / targeted APGD-DLR, attack radii by bisection and their curves (bounds.attack, theory.md §6)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from bounds.attack import (
    ApgdConfig,
    apgd,
    apgd_ensemble,
    attack_radius,
    dlr_loss,
    make_attack,
    min_margin,
    pgd,
    robust_accuracy_curve,
)
from bounds.norms import batch_norm
from certkd.data import load_dataset


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits_test():
    data = load_dataset("digits", "test")
    return data.x, data.y


def linear_net(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        net[1].weight.copy_(weight)
        net[1].bias.copy_(bias)
    return net.eval()


def test_dlr_loss_is_shift_and_scale_invariant():
    z = torch.randn(8, 10, generator=gen())
    y = torch.randint(0, 10, (8,), generator=gen(1))
    t = (y + 1) % 10
    for target in (None, t):
        assert torch.allclose(dlr_loss(3.0 * z + 7.0, y, target), dlr_loss(z, y, target), atol=1e-5)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_points_stay_in_ball_and_box_and_margins_are_real(digits_test, digits_trio, norm):
    x, y = digits_test[0][:64], digits_test[1][:64]
    eps = 0.1 if norm == "inf" else 1.0
    res = apgd_ensemble(digits_trio.teacher, x, y, eps, norm, config=ApgdConfig(steps=10), generator=gen())
    p = math.inf if norm == "inf" else 2.0
    assert bool((batch_norm(res.x_adv - x, p) <= eps + 1e-5).all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        recomputed = min_margin(digits_trio.teacher(res.x_adv), y)
        clean = min_margin(digits_trio.teacher(x), y)
    assert torch.allclose(recomputed, res.margin, atol=1e-5)
    assert bool((res.margin <= clean + 1e-6).all())


def test_apgd_is_fixed_by_its_generator(digits_test, digits_trio):
    x, y = digits_test[0][:40], digits_test[1][:40]
    a = apgd(digits_trio.kd, x, y, 0.15, loss="dlr-targeted", generator=gen(3))
    b = apgd(digits_trio.kd, x, y, 0.15, loss="dlr-targeted", generator=gen(3))
    assert torch.equal(a.margin, b.margin) and torch.equal(a.x_adv, b.x_adv)


@pytest.mark.parametrize("eps", [0.1, 0.15, 0.2])
def test_apgd_finds_at_least_as_many_adversarial_examples_as_pgd_with_the_same_budget(digits_test, digits_trio,
                                                                                       eps):
    """On the digits teacher (450 points): APGD-CE + 3 targeted APGD-DLR runs of 10 steps vs PGD-44 (CW loss)."""
    x, y = digits_test
    cfg = ApgdConfig(steps=10, target_classes=3)
    budget = cfg.budget(("ce", "dlr-targeted"), 10)
    assert budget == 44
    ours = apgd_ensemble(digits_trio.teacher, x, y, eps, config=cfg, generator=gen())
    baseline = pgd(digits_trio.teacher, x, y, eps, steps=budget, generator=gen())
    found, found_pgd = int((ours.margin <= 0).sum()), int((baseline.margin <= 0).sum())
    assert found >= found_pgd, (found, found_pgd)


def test_attack_radius_of_a_linear_model_is_its_exact_radius():
    """f = Wx + b, 2 classes, L-inf: the radius is m(x) / ||w_0 - w_1||_1 when the box does not bind."""
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.5, -0.25, 0.5]])
    net = linear_net(w, torch.zeros(2))
    x = 0.4 + 0.2 * torch.rand(30, 4, generator=gen())
    with torch.no_grad():
        y = net(x).argmax(1)
        margin = min_margin(net(x), y)
    exact = margin / (w[0] - w[1]).abs().sum()
    res = attack_radius(net, x, y, make_attack(net, steps=10, generator=gen()), tol=1e-4)
    inside = exact < 0.39  # the ball stays inside the box
    assert inside.sum() > 5
    assert bool((res.radius[inside] >= exact[inside].double() - 1e-5).all())  # an upper bound
    assert bool((res.radius[inside] <= exact[inside].double() + 2e-4).all())  # found within the tolerance
    assert bool(res.found.all())


def test_attack_radius_is_zero_when_misclassified_and_inf_when_nothing_is_found():
    net = linear_net(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]))  # constant: class 0
    x = torch.rand(4, 2, generator=gen())
    res = attack_radius(net, x, torch.tensor([0, 1, 0, 1]), make_attack(net, steps=5), eps_max=0.5)
    assert res.radius.tolist() == [math.inf, 0.0, math.inf, 0.0]
    assert res.found.tolist() == [False, True, False, True]
    assert robust_accuracy_curve(res.radius, [0.0, 0.4]).tolist() == [0.5, 0.5]


@pytest.mark.usefixtures("lirpa")
def test_attack_radii_bound_certified_radii_from_above(digits_test, digits_trio):
    """Soundness cross-check: every CROWN radius is at most the APGD radius of the same point."""
    from bounds.certify import BoundEngine

    x, y = digits_test[0][:24], digits_test[1][:24]
    engine = BoundEngine(digits_trio.teacher, tuple(x.shape[1:]))
    certified = engine.certified_radius(x, y, "inf", "crown", tol=1e-3, generator=gen())
    attack = attack_radius(digits_trio.teacher, x, y, make_attack(digits_trio.teacher, generator=gen()), tol=1e-3)
    assert bool((certified.radius.double() <= attack.radius + 1e-6).all())
    assert float(attack.radius.median()) > 1.5 * float(certified.radius.double().median())  # CROWN is loose here


def test_apgd_radii_are_not_larger_than_pgd_radii_on_most_points(digits_test, digits_trio):
    x, y = digits_test[0][:100], digits_test[1][:100]
    model = digits_trio.kdiga
    ours = attack_radius(model, x, y, make_attack(model, "inf", "apgd", steps=10, generator=gen()))
    theirs = attack_radius(model, x, y, make_attack(model, "inf", "pgd", steps=44, generator=gen()))
    assert float((ours.radius <= theirs.radius + 2e-3).double().mean()) >= 0.9
    assert float(ours.radius.median()) <= float(theirs.radius.median())


HAS_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None


@pytest.mark.skipif(not HAS_TORCHATTACKS, reason="torchattacks is not installed (optional; pip install torchattacks "
                                                 "--no-deps to run this comparison)")
def test_apgd_finds_at_least_as_many_as_torchattacks_apgd(digits_test, digits_trio):
    import torchattacks

    x, y = digits_test
    model, eps = digits_trio.teacher, 0.15
    theirs = torchattacks.APGD(model, norm="Linf", eps=eps, steps=10, n_restarts=1, seed=0, loss="ce")(x, y)
    with torch.no_grad():
        found_theirs = int((model(theirs).argmax(1) != y).sum())
    ours = apgd(model, x, y, eps, loss="ce", config=ApgdConfig(steps=10), generator=gen())
    assert int((ours.margin <= 0).sum()) >= found_theirs - 2  # the same algorithm: within a couple of points
    ens = apgd_ensemble(model, x, y, eps, config=ApgdConfig(steps=10), generator=gen())
    assert int((ens.margin <= 0).sum()) >= found_theirs
