"""bounds.view: the verification view computes the model's function, and the allow-list refuses the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL_FAMILIES
from torch import nn

from bounds.backends import current_backend
from bounds.certify import BoundEngine
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.nn import Normalize
from bounds.view import VIEW_ATOL, check_supported, verification_view
from certkd.models import create_model

DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


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
                         **SMALL_FAMILIES[name])
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
@pytest.mark.parametrize("name", list(SMALL_FAMILIES))
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
    if current_backend().bounds_vits:
        pytest.skip("auto_LiRPA 0.7.x bounds ViTs (tests/test_vit_lirpa.py)")
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
    method = "crown-ibp" if current_backend().bounds_vits else "crown"  # 0.7.x bounds softmax with crown
    with pytest.raises(UnsupportedModelError) as info:
        check_supported(verification_view(FunctionalSoftmax().eval(), DIGITS), method, "inf", DIGITS)
    assert_one_sentence(str(info.value), "softmax")
    shift_first = verification_view(ShiftFirst().eval(), DIGITS)  # (x - 0.5) * 2 folded into a 1x1 conv
    assert isinstance(list(shift_first.modules())[1], nn.Conv2d)
    for norm in ("inf", "2"):
        check_supported(shift_first, "crown", norm, DIGITS)
    pool = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(UnsupportedModelError, match="max-pooling"):
        check_supported(verification_view(pool.eval(), DIGITS), "crown", "inf", DIGITS)
    pool[1] = nn.MaxPool2d(2)
    pool[3] = nn.Linear(32, 2)
    check_supported(verification_view(pool.eval(), DIGITS), "crown", "inf", DIGITS)


class ReluFirst(nn.Module):
    """A ReLU reads the input: auto_LiRPA 0.3 would drop the L2 ball; the engine puts an identity conv first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(x - 0.25) + x)).flatten(1))


def test_l2_first_layer_rule_and_identity_first():
    from bounds.certify import bounded_module
    from bounds.graph import check_graph_supported

    view = verification_view(ReluFirst().eval(), DIGITS)
    raw_graph = bounded_module(view, torch.zeros(1, *DIGITS))
    with pytest.raises(UnsupportedModelError) as info:
        check_graph_supported(raw_graph, "crown", "2", "0.3")
    assert_one_sentence(str(info.value), "not Linear or Conv", "L2")
    checked = check_supported(view, "crown", "2", DIGITS)  # graph_of puts an identity 1x1 conv first
    assert isinstance(checked, nn.Sequential) and isinstance(checked[0], nn.Conv2d)
    error, scale = max_error(view, checked, DIGITS)
    assert error <= VIEW_ATOL * scale


# --------------------------------------------------------------------------- exact rewrites

CONV_CASES = [dict(dilation=2, padding=2), dict(dilation=(2, 3), padding=1), dict(padding=(0, 2)),
              dict(padding=(2, 1), stride=2), dict(padding="same", kernel_size=4), dict(padding="same", dilation=2),
              dict(padding="valid", groups=2), dict(groups=4, dilation=2, padding=(1, 3))]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_canonical_conv_is_exact_and_plain(case):
    from bounds.view import canonical_conv

    torch.manual_seed(0)
    kwargs = {"kernel_size": 3, **case}
    conv = nn.Conv2d(4, 8, **kwargs).eval()
    out = canonical_conv(conv)
    x = torch.randn(3, 4, 9, 10)
    with torch.no_grad():
        assert torch.allclose(conv(x), out(x), atol=1e-5)
    assert out.groups == 1 and tuple(out.dilation) == (1, 1) and len(set(out.padding)) == 1


def test_padding_mode_refused_naming_the_attribute():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", dilation=2), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 2)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        verification_view(model, DIGITS)
    assert_one_sentence(str(info.value), "padding_mode='reflect'")


class InlineClamps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.Hardtanh(-0.5, 0.8)
        self.six = nn.ReLU6()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.act(self.conv1(x)).clamp(-0.3, 0.6)
        h = torch.clamp(self.six(self.conv2(h) * 4), min=0.1) + F.hardtanh(h, -0.2, 0.2) + F.relu6(h).clip(max=0.5)
        return self.fc(h.flatten(1))


def test_hardtanh_and_clamp_rewritten_with_relus():
    model = InlineClamps().eval()
    view = verification_view(model, DIGITS)
    assert not any(isinstance(m, (nn.Hardtanh, nn.ReLU6)) for m in view.modules())
    assert "clamp" not in view.code and "clip" not in view.code and "hardtanh" not in view.code  # an fx module
    x = torch.rand(4, *DIGITS) * 2 - 0.5  # wide enough to reach every clamp end
    with torch.no_grad():
        assert torch.allclose(model(x), view(x), atol=1e-5)
    for norm in ("inf", "2"):
        check_supported(view, "crown", norm, DIGITS)


class BufferNormalize(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        if self.style == "buffers":
            x = (x - self.mean) / self.std
        elif self.style == "torch":
            x = torch.div(torch.sub(x, self.mean), self.std)
        elif self.style == "reciprocal":
            x = (x - self.mean) * (1.0 / self.std)
        elif self.style == "constants":
            x = (x - torch.tensor([0.4, 0.5, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
        elif self.style == "scalars":
            x = 2.0 * (0.5 - x) / 0.3 + 1.0
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("style", ["buffers", "torch", "reciprocal", "constants", "scalars"])
def test_user_written_normalization_folded(style):
    model = BufferNormalize(style).eval()
    view = verification_view(model, (3, 8, 8))
    placeholder = next(n for n in view.graph.nodes if n.op == "placeholder")
    readers = [view.get_submodule(n.target) for n in placeholder.users]
    assert [(type(m), m.kernel_size, m.groups) for m in readers] == [(nn.Conv2d, (1, 1), 1)]  # the dense 1x1 form
    assert "sub" not in view.code and "div" not in view.code and "truediv" not in view.code
    error, scale = max_error(model, view, (3, 8, 8))
    assert error <= VIEW_ATOL * scale
    for norm in ("inf", "2"):
        check_supported(view, "crown", norm, (3, 8, 8))


class FunctionalPool(nn.Module):
    """A pooling call no module check sees: the graph's attribute allow-list names it."""

    def __init__(self, ceil_mode: bool = False):
        super().__init__()
        self.ceil_mode = ceil_mode

    def forward(self, x):
        if self.ceil_mode:
            return F.max_pool2d(x, 2, 2, ceil_mode=True)
        return F.max_pool2d(x, 2, 2, dilation=2)


POOL_REFUSALS = {
    "MaxPool2d dilation": (nn.MaxPool2d(2, dilation=2), "dilation=2"),
    "MaxPool2d ceil_mode": (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
    "AvgPool2d ceil_mode": (nn.AvgPool2d(2, ceil_mode=True), "ceil_mode=True"),
    "AvgPool2d count_include_pad": (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), "count_include_pad"),
    "AvgPool2d divisor_override": (nn.AvgPool2d(2, divisor_override=3), "divisor_override=3"),
    "F.max_pool2d dilation": (FunctionalPool(), "dilations=[2,2]"),
}


@pytest.mark.parametrize("name", list(POOL_REFUSALS))
def test_pooling_attributes_refused(name):
    pool, attribute = POOL_REFUSALS[name]
    model = nn.Sequential(nn.Conv2d(1, 3, 2), pool, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        BoundEngine(model, (1, 7, 7)).margin_bounds(torch.rand(2, 1, 7, 7), torch.tensor([0, 1]), 0.01, "inf", "ibp")
    assert_one_sentence(str(info.value), attribute)


def test_graph_check_catches_what_the_allow_list_lets_through(monkeypatch):
    """With the allow-list told to accept ceil_mode, the graph check still refuses, naming the node."""
    import dataclasses

    from bounds import graph

    rule = graph.ALLOW_03.operators["BoundMaxPool"]
    loose = dataclasses.replace(rule, attributes={**rule.attributes, "ceil_mode": graph._any})
    allowed = graph.allow_list()
    monkeypatch.setitem(graph.ALLOW_LISTS, allowed.backend,
                        dataclasses.replace(allowed, operators={**allowed.operators, "BoundMaxPool": loose}))
    model = nn.Sequential(nn.Conv2d(1, 3, 2), FunctionalPool(ceil_mode=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        BoundEngine(model, (1, 8, 8))  # 7x7 feature maps: ceil_mode gives 4x4, auto_LiRPA 0.3 3x3
    assert_one_sentence(str(info.value), "computes a different function", "max-pooling, MaxPool")
