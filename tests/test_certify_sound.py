"""bounds.certify is sound: exact MILP checks on tiny MLPs, attacks on a PGD-trained CNN, radius brackets."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    affine_layers,
    count_violations,
    exact_min_margin,
    per_margin_attack,
    raw_lower,
    train_natural,
)
from torch import nn

from bounds.attack import min_margin, pgd
from bounds.certify import BOUND_METHODS, BoundEngine, certified_radius, margin_bounds, margin_spec
from bounds.errors import BoundsError
from bounds.evidence import rounding_allowance
from certkd.data import load_dataset
from certkd.models import create_model

FP_SLACK = 1e-4  # float32 bound propagation against float64 MILP / attack values

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "test")


# --------------------------------------------------------------------------- exact MILP

@pytest.mark.parametrize("hidden", [(8,), (5, 5)], ids=["mlp8", "mlp5x5"])
def test_every_method_below_exact_milp(digits, hidden):
    """100 points per MLP, L-inf eps 0.01-0.04: every method's min lower bound <= the exact minimum margin."""
    train = load_dataset("digits", "train")
    info = digits.info
    model = train_natural(create_model("mlp", 10, info.input_shape, info.mean, info.std, hidden=hidden),
                          train.x, train.y)
    x, y = digits.x[:100], digits.y[:100]
    eps = torch.tensor([0.01, 0.02, 0.04]).repeat(34)[:100]
    engine = BoundEngine(model, info.input_shape)
    lower = {m: engine.margin_bounds(x, y, eps, "inf", m).min_lower for m in BOUND_METHODS}
    attack = pgd(model, x, y, eps, "inf", steps=30, restarts=1, generator=torch.Generator().manual_seed(0)).margin
    layers = affine_layers(model)
    exact = torch.tensor([exact_min_margin(layers, x[i].flatten().double().numpy(), int(y[i]), float(eps[i]))
                          for i in range(len(y))], dtype=torch.float32)
    assert bool((exact <= attack + FP_SLACK).all())  # the MILP is a true minimum: no attack goes below it
    for method, lb in lower.items():
        violations = int((lb > exact + FP_SLACK).sum())
        assert violations == 0, f"{method}: {violations} lower bounds above the exact minimum margin"
    assert float(lower["crown"].mean()) >= float(lower["ibp"].mean())
    assert bool((lower["alpha-crown"] >= lower["crown"] - 1e-3).all())  # optimized from CROWN's start
    assert 0 < int((lower["crown"] > 0).sum()) < len(y)  # some certified, some not: the check has teeth


# --------------------------------------------------------------------------- a PGD-trained CNN

@pytest.fixture(scope="module")
def teacher(digits_trio):
    """The PGD-AT cnn4 teacher of the shared ``digits_trio`` fixture (tests/conftest.py)."""
    return digits_trio.teacher.eval()


@pytest.fixture(scope="module")
def teacher_engine(teacher, digits):
    return BoundEngine(teacher, digits.info.input_shape)


@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("inf", 0.1), ("2", 0.3)])
def test_certified_points_survive_pgd(teacher, teacher_engine, digits, norm, eps):
    x, y = digits.x[:64], digits.y[:64]
    for method in ("ibp", "crown-ibp", "crown"):
        certified = teacher_engine.margin_bounds(x, y, eps, norm, method).certified
        if method == "crown":
            assert int(certified.sum()) >= 16
        if certified.any():
            attack = pgd(teacher, x[certified], y[certified], eps, norm, steps=50, restarts=3,
                         generator=torch.Generator().manual_seed(1))
            assert bool((attack.margin > 0).all()), f"{method} certified a point PGD breaks at {norm} {eps}"


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_radius_is_certified_bracketed_and_survives_pgd(teacher, teacher_engine, digits, norm):
    x, y = digits.x[64:96].clone(), digits.y[64:96].clone()
    y[:2] = (y[:2] + 1) % 10  # two wrong labels: clean-misclassified, radius 0
    tol = 2e-3
    res = teacher_engine.certified_radius(x, y, norm, tol=tol, generator=torch.Generator().manual_seed(0))
    assert not bool(res.correct[:2].any()) and bool((res.radius[:2] == 0).all())
    ok = res.correct
    assert int(ok.sum()) >= 25
    assert bool((res.uncertified[ok] - res.radius[ok] <= tol + 1e-7).all())
    assert bool((res.radius[ok] > 0).all()) and bool((res.radius <= res.upper).all())
    at_radius = teacher_engine.margin_bounds(x[ok], y[ok], res.radius[ok], norm)
    assert bool(at_radius.certified.all())  # the radius was certified by the method itself
    at_upper_end = teacher_engine.margin_bounds(x[ok], y[ok], res.uncertified[ok], norm)
    assert not bool(at_upper_end.certified.any())
    attack = pgd(teacher, x[ok], y[ok], res.radius[ok], norm, steps=50, restarts=3,
                 generator=torch.Generator().manual_seed(2))
    assert bool((attack.margin > 0).all())
    broken = pgd(teacher, x[ok], y[ok], res.upper[ok], norm, steps=20, restarts=1,
                 generator=torch.Generator().manual_seed(0))
    eps_max = 1.0 if norm == "inf" else math.sqrt(64)
    found = res.upper[ok] < eps_max  # where the search's attack found an adversarial example
    assert float((broken.margin[found] <= 0).float().mean()) >= 0.8


def test_module_functions_match_engine(teacher, teacher_engine, digits):
    x, y = digits.x[:8], digits.y[:8]
    direct = margin_bounds(teacher, x, y, 0.05, "inf", "crown")
    assert torch.allclose(direct.lower, teacher_engine.margin_bounds(x, y, 0.05).lower, atol=1e-6)
    bounded = teacher_engine.bounded
    teacher_engine.margin_bounds(x, y, 0.02, "2", "crown-ibp")
    assert teacher_engine.bounded is bounded  # built once, reused across eps, norms and methods
    res = certified_radius(teacher, x, y, "inf", tol=5e-3)
    assert bool((res.uncertified - res.radius <= 5e-3 + 1e-7).all())


def test_per_example_eps_equals_one_at_a_time(teacher_engine, digits):
    """A (B,) eps tensor (the radius search's passes) gives each example its own ball, also under L2."""
    x, y = digits.x[:6], digits.y[:6]
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
    for norm in ("inf", "2"):
        for method in ("ibp", "crown-ibp", "crown"):
            batch = teacher_engine.margin_bounds(x, y, eps, norm, method).lower
            single = torch.cat([teacher_engine.margin_bounds(x[i:i + 1], y[i:i + 1], float(eps[i]), norm,
                                                             method).lower for i in range(6)])
            assert torch.allclose(batch, single, atol=1e-5), (norm, method)


def test_spec_and_zero_eps(teacher_engine, teacher, digits):
    x, y = digits.x[:5], digits.y[:5]
    spec = margin_spec(y, 10)
    with torch.no_grad():
        logits = teacher(x)
    expected = (spec @ logits.unsqueeze(2)).squeeze(2)
    assert torch.allclose(expected.amin(1), min_margin(logits, y), atol=1e-6)
    at_zero = teacher_engine.margin_bounds(x, y, 0.0, "inf", "crown")
    # no perturbation: the exact margins, lowered by no more than the float32 rounding allowance
    allowance = rounding_allowance(teacher_engine.bounded, x, spec, teacher_engine.version)
    assert bool((at_zero.lower <= expected).all())
    assert bool((expected - at_zero.lower <= allowance + 1e-4).all())
    assert float(allowance.max()) < 1e-2 * float(expected.abs().max())


def test_alpha_crown_leaves_no_gradients(digits):
    info = digits.info
    model = create_model("mlp", 10, info.input_shape, info.mean, info.std, hidden=(8,)).eval()
    engine = BoundEngine(model, info.input_shape)
    x = digits.x[:4]
    with torch.no_grad():
        y = model(x).argmax(1)
    alpha = engine.margin_bounds(x, y, 0.02, "inf", "alpha-crown")
    crown = engine.margin_bounds(x, y, 0.02, "inf", "crown")
    assert bool((alpha.lower >= crown.lower - 1e-4).all())
    assert all(p.grad is None for p in engine.bounded.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_raise_one_line(teacher_engine, digits):
    x, y = digits.x[:2], digits.y[:2]
    cases = [
        lambda: teacher_engine.margin_bounds(x, y, -0.1),
        lambda: teacher_engine.margin_bounds(x, y, 0.1, "inf", "deepz"),
        lambda: teacher_engine.margin_bounds(x, y, 0.1, "1"),
        lambda: teacher_engine.margin_bounds(x, y, 0.1, "7"),
        lambda: teacher_engine.margin_bounds(torch.rand(2, 1, 4, 4), y, 0.1),
        lambda: teacher_engine.margin_bounds(x * 3 - 1, y, 0.1),
        lambda: teacher_engine.margin_bounds(x, torch.tensor([0, 12]), 0.1),
        lambda: teacher_engine.margin_bounds(x, y, torch.tensor([0.1, 0.2, 0.3])),
        lambda: teacher_engine.certified_radius(x, y, tol=0.0),
    ]
    for case in cases:
        with pytest.raises(BoundsError) as info:
            case()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- max-pooling and batch composition

def lenet_small() -> nn.Module:
    """The advertorch MNIST LeNet5 layout (3x3 convs, two MaxPool2d(2), fc) at 8x8 and small widths."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_maxpool_bound_independent_of_batch_and_sound(digits):
    """Raw auto_LiRPA 0.3: a point's CROWN bound changes with its batch neighbours (IBP-kept stable neurons feed
    MaxPool's relaxation, see ``bounds.certify.batch_independent``); certkd's is the same at batch 1, 4 and 8."""

    train = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = train_natural(lenet_small(), train.x[:300], train.y[:300], epochs=60)
    x = digits.x[:8]
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.03
    raw8 = raw_lower(model, x, y, eps, "inf", "CROWN")
    raw1 = torch.cat([raw_lower(model, x[i:i + 1], y[i:i + 1], eps, "inf", "CROWN") for i in range(8)])
    assert float((raw8 - raw1).abs().max()) > 1e-2  # the dependence is real on this stack
    engine = BoundEngine(model, digits.info.input_shape)
    at8 = engine.margin_bounds(x, y, eps, "inf", "crown").lower
    at1 = torch.cat([engine.margin_bounds(x[i:i + 1], y[i:i + 1], eps, "inf", "crown").lower for i in range(8)])
    at4 = torch.cat([engine.margin_bounds(x[i:i + 4], y[i:i + 4], eps, "inf", "crown").lower for i in (0, 4)])
    assert float((at8 - at1).abs().max()) <= 1e-4 and float((at4 - at1).abs().max()) <= 1e-4
    assert count_violations(at8, per_margin_attack(model, x, y, eps, "inf")) == 0


def test_pgd_steps_zero_radius_search_runs_no_attack(monkeypatch):
    """``--pgd-steps 0`` is honoured by radius searches: no attack, the bracket's upper end is eps_max."""
    import bounds.certify as certify_module
    from certkd.certification.methods import CertifyOptions, evaluate_batch, get_method, prepare_methods

    def no_attack(*args, **kwargs):
        raise AssertionError("an attack ran with --pgd-steps 0")

    monkeypatch.setattr(certify_module, "pgd", no_attack)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    ctx = prepare_methods(net, (1, 2, 2), ["crown"], "inf", CertifyOptions(pgd_steps=0))
    _, out = evaluate_batch(ctx, get_method("crown"), x, y, [0.0], True, torch.Generator().manual_seed(0))
    assert out.radius is not None and out.radius_upper is not None
    assert bool((out.radius > 0).all()) and len(set(out.radius_upper.tolist())) == 1
