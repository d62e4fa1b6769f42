"""bounds.view: the verification view computes the model's function, and the allow-list refuses the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bounds.certify import BoundEngine
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.nn import Normalize
from bounds.view import VIEW_ATOL, check_supported, verification_view
from certkd.models import create_model

DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)
# every registry family auto_LiRPA 0.3 bounds, at a size a CPU test can afford
FAMILIES = {
    "mlp": {"hidden": (32, 16)},
    "cnn4": {"width": 4, "linear": 16},
    "cnn7": {"width": 4, "linear": 16},
    "resnet_small": {"width": 4},
    "wide_resnet": {"depth": 10, "widen": 1},
    "mobilenet_v2": {"width_mult": 0.25, "depth": 3},
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def registry_model(name: str, shape, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    c = shape[0]
    model = create_model(name, 10, shape, [0.2 + 0.1 * i for i in range(c)], [0.3 + 0.05 * i for i in range(c)],
                         **FAMILIES[name])
    return randomize_batchnorm(model, seed).eval()


def max_error(a: nn.Module, b: nn.Module, shape, n: int = 16, seed: int = 1) -> tuple[float, float]:
    x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()), max(1.0, float(ya.abs().max()))


def rewritten_away(view: nn.Module) -> list[str]:
    """Modules the view must not contain."""
    bad = []
    for m in view.modules():
        if isinstance(m, (Normalize, nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            bad.append(type(m).__name__)
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            bad.append("grouped Conv2d")
    return bad


@pytest.mark.parametrize("shape", [DIGITS, CIFAR], ids=["digits", "cifar"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_view_equals_registry_model(name, shape):
    model = registry_model(name, shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = verification_view(model, shape)
    error, scale = max_error(model, view, shape)
    assert error <= VIEW_ATOL * scale
    assert rewritten_away(view) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    if shape == DIGITS:  # the allow-list accepts every family under both norms (first layer Linear/Conv)
        for norm in ("inf", "2"):
            check_supported(view, "crown", norm, shape)


def test_view_of_training_model_is_eval_and_model_mode_kept():
    model = registry_model("cnn7", DIGITS).train()
    model.append(nn.Dropout(0.5))
    view = verification_view(model, DIGITS)
    assert model.training and not view.training
    assert rewritten_away(view) == []
    model.eval()
    error, scale = max_error(model, view, DIGITS)
    assert error <= VIEW_ATOL * scale


class TwoBranch(nn.Module):
    """Grouped (not depthwise) conv, a standalone BatchNorm2d, a BatchNorm1d after a Linear and a lone one."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize([0.5, 0.4], [0.2, 0.3])
        self.grouped = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.lone = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.grouped(self.norm(x))
        h = torch.relu(self.bn(h)) + h  # BN not right after the conv in a Sequential: exact affine layer
        return self.out(self.lone(self.fc(h)))


def test_view_rewrites_custom_module():
    model = randomize_batchnorm(TwoBranch()).eval()
    view = verification_view(model, (2, 5, 5))
    error, scale = max_error(model, view, (2, 5, 5))
    assert error <= VIEW_ATOL * scale
    assert rewritten_away(view) == []
    assert isinstance(view.lone, nn.Linear) and isinstance(view.bn, nn.Conv2d)
    assert isinstance(view.fc[2], nn.Identity)  # folded into the Linear before it


class ReusesConvOutput(nn.Module):
    """Folding the BN into the conv would change the conv's other use: the check must catch it."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x):
        return self.fc((self.seq(x) + self.seq[0](x)).flatten(1))


def test_view_check_refuses_inexact_rewrite():
    model = randomize_batchnorm(ReusesConvOutput()).eval()
    with pytest.raises(BoundsError, match="differs from the model"):
        verification_view(model, (1, 8, 8))


def assert_one_sentence(message: str, *names: str) -> None:
    assert "\n" not in message and message.endswith(".")
    assert ". " not in message.replace("nn.", "nn_")  # one sentence
    assert "the lipschitz, smoothing or clever methods" in message and "--" not in message
    for name in names:
        assert name in message


def test_vit_refused_with_one_sentence():
    model = create_model("vit", 10, DIGITS, [0.3], [0.4], dim=16, depth=1, heads=2).eval()
    view = verification_view(model, DIGITS)
    for method in ("ibp", "crown"):
        with pytest.raises(UnsupportedModelError) as info:
            check_supported(view, method, "inf", DIGITS)
        assert_one_sentence(str(info.value), "LayerNorm", "attention", "GELU")
    with pytest.raises(UnsupportedModelError):  # the engine cannot bypass it
        BoundEngine(model, DIGITS)


class FunctionalSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return F.softmax(self.fc(x.flatten(1)), dim=1)


class ShiftFirst(nn.Module):
    """``(x - 0.5) * 2`` before the first conv: fine under L-inf, loses the L2 ball in auto_LiRPA 0.3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv((x - 0.5) * 2.0)).flatten(1))


def test_graph_allow_list():
    with pytest.raises(UnsupportedModelError) as info:
        check_supported(verification_view(FunctionalSoftmax().eval(), DIGITS), "crown", "inf", DIGITS)
    assert_one_sentence(str(info.value), "softmax")
    shift_first = verification_view(ShiftFirst().eval(), DIGITS)
    check_supported(shift_first, "crown", "inf", DIGITS)
    for method in ("ibp", "crown"):
        with pytest.raises(UnsupportedModelError) as info:
            check_supported(shift_first, method, "2", DIGITS)
        assert_one_sentence(str(info.value), "not Linear or Conv", "L2")
    pool = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(UnsupportedModelError, match="max-pooling"):
        check_supported(verification_view(pool.eval(), DIGITS), "crown", "inf", DIGITS)
    pool[1] = nn.MaxPool2d(2)
    pool[3] = nn.Linear(32, 2)
    check_supported(verification_view(pool.eval(), DIGITS), "crown", "inf", DIGITS)
