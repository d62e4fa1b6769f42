"""The hazard suite: auto_LiRPA 0.3's false certificates are real, and certkd's path never gives one.

Each hazard test first bounds the raw model with auto_LiRPA directly and shows a lower bound
above an attack-found margin (skipped, with the reason, only where the installed auto_LiRPA
no longer shows the hazard), then shows that ``bounds.certify`` gives no such bound or refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import (
    SMALL_FAMILIES,
    affine_layers,
    briefly_trained,
    count_violations,
    exact_min_margin,
    labels_of,
    per_margin_attack,
    raw_lower,
    registered_models,
    require_hazard,
)
from torch import nn

from bounds.attack import margins, pgd
from bounds.certify import BoundEngine
from bounds.errors import UnsupportedModelError
from bounds.nn import Normalize
from certkd.data import load_dataset
from certkd.models import create_model

MEAN, STD = [0.45, 0.5, 0.4], [0.25, 0.3, 0.2]

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


def inputs(shape, n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def depthwise_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)).eval()


def grouped_normalization_cnn(seed: int) -> nn.Module:
    """Input normalization written as a grouped 1x1 convolution (the obvious way to write it)."""
    torch.manual_seed(seed)
    norm = nn.Conv2d(3, 3, 1, groups=3)
    norm.weight.data = (1 / torch.tensor(STD)).view(3, 1, 1, 1)
    norm.bias.data = -torch.tensor(MEAN) / torch.tensor(STD)
    return nn.Sequential(norm, nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).eval()


def normalization_first_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(MEAN, STD), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).eval()


# --------------------------------------------------------------------------- hazard 1

def test_hazard_depthwise_convolution_under_crown():
    model, x = depthwise_cnn(seed=1), inputs((1, 8, 8))
    y = labels_of(model, x)
    eps = 2 / 255
    attack = per_margin_attack(model, x, y, eps, "inf")
    require_hazard(count_violations(raw_lower(model, x, y, eps, "inf", "CROWN"), attack), "depthwise-convolution")
    ours = BoundEngine(model, (1, 8, 8)).margin_bounds(x, y, eps, "inf", "crown").lower
    assert count_violations(ours, attack) == 0


@pytest.mark.parametrize("norm,eps", [("inf", 2 / 255), ("2", 0.25)])
def test_hazard_grouped_normalization(norm, eps):
    model, x = grouped_normalization_cnn(seed=1), inputs((3, 8, 8))
    y = labels_of(model, x)
    attack = per_margin_attack(model, x, y, eps, norm)
    require_hazard(count_violations(raw_lower(model, x, y, eps, norm, "CROWN"), attack), "grouped-normalization")
    ours = BoundEngine(model, (3, 8, 8)).margin_bounds(x, y, eps, norm, "crown").lower
    assert count_violations(ours, attack) == 0


# --------------------------------------------------------------------------- hazard 2

def test_hazard_l2_with_normalization_first():
    model, x = normalization_first_cnn(seed=0), inputs((3, 8, 8))
    y = labels_of(model, x)
    eps = 0.25
    attack = per_margin_attack(model, x, y, eps, "2")
    raw = sum(count_violations(raw_lower(model, x, y, eps, "2", m), attack) for m in ("IBP", "CROWN-IBP"))
    require_hazard(raw, "L2-first-layer")
    engine = BoundEngine(model, (3, 8, 8))
    for method in ("ibp", "crown-ibp", "crown"):
        assert count_violations(engine.margin_bounds(x, y, eps, "2", method).lower, attack) == 0


class ShiftFirst(nn.Module):
    """``(x - 0.5) * 2`` in the forward, before any layer: no view can make it a Linear/Conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv((x - 0.5) * 2.0)).flatten(1))


def test_l2_non_linear_first_layer_folded_and_sound():
    """``(x - 0.5) * 2`` first: raw auto_LiRPA loses the L2 ball; certkd folds it into a 1x1 conv and is sound."""
    model, x = ShiftFirst().eval(), inputs((1, 8, 8))
    y = labels_of(model, x)
    attack = per_margin_attack(model, x, y, 0.5, "2")
    raw = raw_lower(model, x, y, 0.5, "2", "CROWN", {"conv_mode": "matrix"})  # patches mode fails outright
    require_hazard(count_violations(raw, attack), "L2-first-layer")
    engine = BoundEngine(model, (1, 8, 8))
    for method in ("ibp", "crown-ibp", "crown"):
        assert count_violations(engine.margin_bounds(x, y, 0.5, "2", method).lower, attack) == 0


# --------------------------------------------------------------------------- hazard 3

def test_hazard_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Softmax(dim=1)).eval()
    with torch.no_grad():
        model[3].weight.mul_(6)
    x = inputs((1, 8, 8), n=16, seed=0)
    y = labels_of(model, x)
    eps = 0.01
    attack = per_margin_attack(model, x, y, eps, "inf")
    raw = raw_lower(model, x, y, eps, "inf", "CROWN-IBP", {"fixed_reducemax_index": True})
    require_hazard(count_violations(raw, attack), "softmax")
    with pytest.raises(UnsupportedModelError, match="softmax"):
        BoundEngine(model, (1, 8, 8)).margin_bounds(x, y, eps, "inf", "crown-ibp")


# --------------------------------------------------------------------------- the registry

SWEEP = {**SMALL_FAMILIES, "mobilenet_v2": {"width_mult": 0.25, "depth": 1}}  # digits-shaped inputs
SWEEP_EPS = {"inf": 0.02, "2": 0.15}


ALPHA_SWEEP = ("mlp", "cnn4")  # alpha-CROWN is allowed for their operators (Linear, Conv, ReLU, Flatten)


class PoolingCNN(nn.Module):
    """Max-pooling (stride = kernel), average pooling and a spatial mean: the pooling nodes of the allow-list."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize([0.3], [0.35])
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(self.pool(torch.relu(self.conv1(self.norm(x))))))
        return self.fc(self.avg(h).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained(digits_test):
    """Every sweep family, briefly trained on 300 digits (full-batch Adam; 75-95 % test accuracy)."""
    train = load_dataset("digits", "train")
    x, y = train.x[:300], train.y[:300]
    info = digits_test.info
    models = {}
    for name in [*SWEEP, "pooling"]:
        torch.manual_seed(0)
        model = PoolingCNN() if name == "pooling" else create_model(name, 10, info.input_shape, info.mean,
                                                                     info.std, **SWEEP[name])
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        models[name] = model.eval()
    return models


def test_soundness_sweep(trained, digits_test, capsys):
    """Every supported family x {L-inf, L2} x {IBP, CROWN-IBP, CROWN (, alpha-CROWN)}, per-example eps: none above PGD.

    (The exact MILP check of tiny MLPs is tests/test_certify_sound.py::test_every_method_below_exact_milp.)
    """
    checked, violations = 0, []
    x = digits_test.x[:8]
    spread = 0.5 + torch.rand(8, generator=torch.Generator().manual_seed(0))  # one radius per example
    for name, model in trained.items():
        y = labels_of(model, x)
        engine = BoundEngine(model, (1, 8, 8))
        for norm, base in SWEEP_EPS.items():
            eps = base * spread
            attack = per_margin_attack(model, x, y, eps, norm, steps=30, restarts=1)
            methods = ("ibp", "crown-ibp", "crown", "alpha-crown")[:4 if name in ALPHA_SWEEP else 3]
            for method in methods:
                lower = engine.margin_bounds(x, y, eps, norm, method).lower
                checked += lower.numel()
                bad = count_violations(lower, attack)
                if bad:
                    violations.append(f"{name} L{norm} {method}: {bad}")
    with capsys.disabled():
        print(f"\nsoundness sweep: {checked} margin lower bounds checked against PGD, "
              f"{len(violations)} configurations with violations")
    assert checked >= 1000
    assert violations == []


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("name", ["mobilenet_v2", "cnn7"])
def test_normalization_first_models_certify_soundly(trained, digits_test, name, norm):
    """Certified radii of registry models (normalization first; mobilenet_v2's depthwise convolutions) survive PGD."""
    model = trained[name]
    x, y = digits_test.x[:16], digits_test.y[:16]
    engine = BoundEngine(model, (1, 8, 8))
    res = engine.certified_radius(x, y, norm, tol=SWEEP_EPS[norm] / 20, generator=torch.Generator().manual_seed(0))
    ok = res.correct
    x, y, radius = x[ok], y[ok], res.radius[ok]
    assert len(y) >= 10 and bool((radius > 0).all())
    assert bool((res.upper[ok] < (1.0 if norm == "inf" else 8.0)).all())  # attacks break them: the check has teeth
    attack = pgd(model, x, y, radius, norm, steps=50, restarts=3, generator=torch.Generator().manual_seed(3))
    assert bool((attack.margin > 0).all())
    eps = float(radius.median())
    certified = engine.margin_bounds(x, y, eps, norm, "crown").certified
    assert 0 < int(certified.sum())
    attack = pgd(model, x[certified], y[certified], eps, norm, steps=50, restarts=3,
                 generator=torch.Generator().manual_seed(4))
    assert bool((attack.margin > 0).all())


def test_alpha_crown_refused_where_untested(trained):
    """alpha-CROWN is allowed only for the operators the suite checks it on; a residual addition is refused."""
    engine = BoundEngine(trained["resnet_small"], (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedModelError, match="addition with alpha-crown.*use the crown method"):
        engine.margin_bounds(x, torch.tensor([0, 1]), 0.01, "inf", "alpha-crown")


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("inf", 1 / 255), ("2", 0.05)])
def test_deeper_mobilenet_sound_on_cifar_shapes(norm, eps):
    """The registry's mobilenet_v2 with two stages (depthwise convolutions, residuals) on 3x16x16: slow under CROWN."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 10, (3, 16, 16), MEAN, STD, width_mult=0.25, depth=2).eval()
    x = inputs((3, 16, 16), n=4)
    y = labels_of(model, x)
    attack = per_margin_attack(model, x, y, eps, norm)
    lower = BoundEngine(model, (3, 16, 16)).margin_bounds(x, y, eps, norm, "crown").lower
    assert count_violations(lower, attack) == 0


# --------------------------------------------------------------------------- the four families

@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


def pooled_gap(pool: nn.Module) -> nn.Module:
    """Conv 2x2 (7x7 maps), the pooling under test, a global-average-pool head: shapes fit whatever 0.3 drops."""
    return nn.Sequential(nn.Conv2d(1, 8, 2), nn.ReLU(), pool, nn.Conv2d(8, 12, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


POOLING_FAMILY = {
    "maxpool_dilation": lambda: nn.MaxPool2d(2, dilation=2),
    "maxpool_ceil_mode": lambda: nn.MaxPool2d(2, ceil_mode=True),
    "avgpool_ceil_mode": lambda: nn.AvgPool2d(2, ceil_mode=True),
    "avgpool_divisor_override": lambda: nn.AvgPool2d(2, divisor_override=3),
    "avgpool_count_include_pad": lambda: nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
}


@pytest.mark.parametrize("name", list(POOLING_FAMILY))
def test_hazard_pooling_options_dropped(name, digits_train, digits_test, capsys):
    """0.3 bounds a different function: at eps = 0 its IBP/CROWN lower bounds exceed the exact margins."""
    torch.manual_seed(0)
    model = briefly_trained(pooled_gap(POOLING_FAMILY[name]()), digits_train)
    x = digits_test.x[:64]
    y = digits_test.y[:64]
    with torch.no_grad():
        exact = margins(model(x), y)
    raw = sum(count_violations(raw_lower(model, x, y, 0.0, "inf", m), exact) for m in ("IBP", "CROWN"))
    require_hazard(raw, f"{name} pooling")
    capsys.readouterr()
    with pytest.raises(UnsupportedModelError) as info:
        BoundEngine(model, (1, 8, 8)).margin_bounds(x, y, 0.0, "inf", "crown")
    message = str(info.value)
    assert "\n" not in message and "the lipschitz, smoothing or clever methods" in message
    assert capsys.readouterr().out == ""  # nothing of auto_LiRPA's chatter


def conv_family(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    first = nn.Conv2d(1, 8, 3, padding=2, dilation=2) if kind == "dilated" else nn.Conv2d(1, 8, 3, padding=(0, 2))
    features = 8 * 4 * 4 if kind == "dilated" else 8 * 3 * 5
    return nn.Sequential(first, nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(features, 10))


@pytest.mark.parametrize("kind,norm,eps", [("dilated", "inf", 0.02), ("dilated", "2", 0.2), ("unequal", "2", 0.2)])
def test_hazard_dilated_and_unequally_padded_convolutions(kind, norm, eps, digits_train, digits_test):
    """Raw CROWN exceeds PGD margins (84 of 144 for dilated, L-inf); certkd's rewritten view never does."""
    model = briefly_trained(conv_family(kind), digits_train)
    x = digits_test.x[:16]
    y = labels_of(model, x)
    attack = per_margin_attack(model, x, y, eps, norm)
    require_hazard(count_violations(raw_lower(model, x, y, eps, norm, "CROWN"), attack), f"{kind} convolution")
    engine = BoundEngine(model, (1, 8, 8))
    for method in ("ibp", "crown-ibp", "crown"):
        assert count_violations(engine.margin_bounds(x, y, eps, norm, method).lower, attack) == 0, method


class ClampNet(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.Hardtanh(-0.5, 1.0)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        h = self.conv(x)
        h = self.act(h) if self.style == "hardtanh" else h.clamp(-0.5, 1.0)
        return self.fc(h.flatten(1))


CRASHES = {
    "hardtanh": lambda: ClampNet("hardtanh"),
    "clamp": lambda: ClampNet("clamp"),
    "same_even_kernel": lambda: nn.Sequential(nn.Conv2d(1, 8, 4, padding="same"), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(512, 10)),
    "avgpool_ceil_flatten": lambda: nn.Sequential(nn.Conv2d(1, 8, 2), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                                                  nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_crash_cases_rewritten_or_refused_in_one_sentence(name, digits_train, digits_test, capsys):
    """Raw auto_LiRPA raises a foreign exception; certkd bounds soundly (rewritten) or refuses in one sentence."""
    torch.manual_seed(0)
    model = briefly_trained(CRASHES[name](), digits_train)
    x = digits_test.x[:8]
    y = labels_of(model, x)
    with pytest.raises(Exception) as raw:  # noqa: B017 - any foreign exception is the hazard
        raw_lower(model, x, y, 0.02, "inf", "CROWN")
    assert not isinstance(raw.value, UnsupportedModelError)
    capsys.readouterr()
    if name == "avgpool_ceil_flatten":
        with pytest.raises(UnsupportedModelError) as info:
            BoundEngine(model, (1, 8, 8))
        assert "\n" not in str(info.value) and "ceil_mode" in str(info.value)
    else:
        engine = BoundEngine(model, (1, 8, 8))
        for norm, eps in (("inf", 0.02), ("2", 0.2)):
            attack = per_margin_attack(model, x, y, eps, norm, steps=30, restarts=1)
            assert count_violations(engine.margin_bounds(x, y, eps, norm, "crown").lower, attack) == 0
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- the same cases through the CLI

def _cli_makers() -> dict[str, Callable[[], nn.Module]]:
    """Model makers for the refusal and rewrite cases, by registry name ``hazard16_<case>``."""
    cases = {**{f"pool_{k}": (lambda f=f: pooled_gap(f())) for k, f in POOLING_FAMILY.items()},
             **{f"crash_{k}": v for k, v in CRASHES.items()}}
    return {f"hazard16_{case}": make for case, make in cases.items()}


@pytest.fixture(scope="module")
def cli_checkpoints(tmp_path_factory, digits_train, digits_test):
    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.models import create_model

    out = tmp_path_factory.mktemp("hazard16")
    paths = {}
    makers = _cli_makers()
    with registered_models(makers):
        for name in makers:
            model = briefly_trained(create_model(name, 10, (1, 8, 8)), digits_train, steps=10)
            paths[name.removeprefix("hazard16_")] = save_checkpoint(
                make_checkpoint(model, name, {}, digits_test.info), out / f"{name}.pt")
        yield paths


@pytest.mark.parametrize("case", [f"pool_{k}" for k in POOLING_FAMILY] + ["crash_avgpool_ceil_flatten"])
def test_cli_refusals_one_line_exit_2(case, cli_checkpoints, tmp_path):
    from click.testing import CliRunner

    from certkd.cli import main

    result = CliRunner().invoke(main, ["certify", str(cli_checkpoints[case]), "-n", "4", "--method", "crown",
                                       "--eps", "0.01", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "s.json").exists()


def test_cli_rewritten_model_certifies(cli_checkpoints, tmp_path):
    from click.testing import CliRunner

    from certkd.cli import main

    result = CliRunner().invoke(main, ["certify", str(cli_checkpoints["crash_hardtanh"]), "-n", "4", "--method",
                                       "crown", "--eps", "0.01", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.json").exists()


def test_float32_rounding_allowance(trained, digits_test):
    """The sweep's mlp: float32 CROWN bounds a few ulps above the exact (float64 MILP) per-margin minimum;
    the rounding allowance (``bounds.evidence.rounding_allowance``) puts certkd's below it (what
    test_soundness_sweep used to flag)."""

    model, x = trained["mlp"], digits_test.x[:8]
    y = labels_of(model, x)
    eps = SWEEP_EPS["inf"] * (0.5 + torch.rand(8, generator=torch.Generator().manual_seed(0)))
    engine = BoundEngine(model, (1, 8, 8))
    ours = engine.margin_bounds(x, y, eps, "inf", "crown").lower
    raw = torch.cat([raw_lower(engine.view, x[i:i + 1], y[i:i + 1], float(eps[i]), "inf", "CROWN")
                     for i in range(8)])
    layers = affine_layers(model)
    exact = torch.zeros(8, 9, dtype=torch.float64)
    for i in range(8):
        others = [j for j in range(10) if j != int(y[i])]
        w, b = layers[-1]
        for k, j in enumerate(others):  # the margin f_y - f_j alone: a two-output last layer
            pair = layers[:-1] + [(w[[int(y[i]), j]], b[[int(y[i]), j]])]
            exact[i, k] = exact_min_margin(pair, x[i].flatten().double().numpy(), 0, float(eps[i]))
    above = raw.double() - exact
    assert float(above.max()) < 1e-4  # the raw excess is rounding, not a wrong relaxation
    assert bool((ours.double() <= exact).all())
