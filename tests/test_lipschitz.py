"""Certified global Lipschitz bounds (bounds.lipschitz, theory.md §2.2): exact where it can be,
never below a sampled gradient norm or a power-iteration estimate, never broken by PGD."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bounds.attack import pgd
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.gradients import margin_gradients, other_classes
from bounds.lipschitz import conv_operator_norm, lipschitz_bound, lipschitz_radius
from bounds.nn import Normalize
from certkd.models import create_model

DIGITS = (1, 8, 8)


@contextmanager
def one_thread():
    """Small LAPACK and conv work on a shared 2-core machine is far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def residual_net(digits):
    """A tiny pre-activation ResNet (BatchNorm, 1x1 shortcut, average pooling) trained on digits."""
    train, _ = digits
    torch.manual_seed(0)
    model = create_model("resnet_small", 10, DIGITS, mean=train.info.mean, std=train.info.std, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(8):
            for i in torch.randperm(len(train.y)).split(64):
                opt.zero_grad()
                F.cross_entropy(model(train.x[i]), train.y[i]).backward()
                opt.step()
    return model.eval()


def trained_models(request, residual_net) -> dict[str, nn.Module]:
    trio = request.getfixturevalue("digits_trio")
    return {"cnn4 teacher": trio.teacher, "mlp student": trio.kdiga, "resnet_small": residual_net}


def operator_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's linear part as an explicit (d_out, d_in) float64 matrix, by autograd."""
    layer = layer.double()
    x = torch.zeros(1, *in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: layer(z) - layer(torch.zeros_like(z)), x)
    out = layer(x)
    return jac.reshape(out.numel(), x.numel())


def power_iteration(conv: nn.Conv2d, in_shape: tuple[int, ...], steps: int = 100) -> float:
    """A lower estimate of the conv operator norm: power iteration with conv and conv_transpose."""
    v = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = conv.weight.detach().double()
    for _ in range(steps):
        v = v / v.norm()
        u = F.conv2d(v, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        v = F.conv_transpose2d(u, weight, None, conv.stride, conv.padding, groups=conv.groups,
                               dilation=conv.dilation, output_padding=_output_padding(conv, in_shape, u))
    return float(F.conv2d(v / v.norm(), weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).norm())


def _output_padding(conv: nn.Conv2d, in_shape, u) -> tuple[int, int]:
    full = [(u.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            for i in range(2)]
    return tuple(in_shape[1 + i] - full[i] for i in range(2))


def test_linear_model_bound_is_its_exact_spectral_norm():
    torch.manual_seed(1)
    std = 0.3
    model = nn.Sequential(Normalize([0.5], [std]), nn.Flatten(), nn.Linear(64, 10)).eval()
    w = model[2].weight.detach().double() / std
    exact = float(torch.linalg.svdvals(w)[0])
    bound = lipschitz_bound(model, DIGITS)
    assert exact <= bound.logits <= exact * (1 + 1e-4)
    pair = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")  # ||w_y - w_j||: exact per margin
    assert bool((bound.margin >= pair).all()) and torch.allclose(bound.margin, pair, rtol=1e-4)
    # the L2 radius of a linear model is exactly the distance to the nearest decision boundary
    x = torch.rand(5, *DIGITS, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    logits = model(x).double()
    others = other_classes(y, 10)
    distance = ((logits.gather(1, y.view(-1, 1)) - logits.gather(1, others)) / pair[y.view(-1, 1), others]).amin(1)
    radius = lipschitz_radius(model, x, y, "2").radius.double()
    assert bool((radius <= distance).all()) and torch.allclose(radius, distance, rtol=1e-4)
    assert torch.allclose(lipschitz_radius(model, x, y, "inf").radius.double(), radius / 8, rtol=1e-6)


CONV_CASES = [  # (c_in, c_out, kernel, stride, padding, dilation, groups, input size)
    (3, 5, 3, 1, 1, 1, 1, 6), (2, 4, 4, 2, 1, 1, 1, 8), (4, 6, 3, 2, 1, 1, 2, 7), (2, 3, 3, 1, 2, 2, 1, 6),
    (3, 3, 3, 3, 0, 1, 3, 9), (2, 4, 1, 2, 0, 1, 1, 5), (1, 4, 5, 2, 2, 1, 1, 9), (3, 2, 2, 1, 0, 1, 1, 5),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_norm_is_exact_when_explicit_and_an_upper_bound_by_dft(case):
    c_in, c_out, k, stride, padding, dilation, groups, n = case
    torch.manual_seed(sum(case))
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups)
    exact = float(torch.linalg.svdvals(operator_matrix(conv, (c_in, n, n)))[0])
    args = (conv.weight, (n, n), stride, padding, dilation, groups)
    assert conv_operator_norm(*args) == pytest.approx(exact, rel=2e-5)
    dft = conv_operator_norm(*args, exact_max_entries=0)
    assert exact <= dft <= 1.6 * exact


def test_circular_conv_norm_by_dft_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    exact = float(torch.linalg.svdvals(operator_matrix(conv, (3, 6, 6)))[0])
    dft = conv_operator_norm(conv.weight, (6, 6), 1, 1, padding_mode="circular", exact_max_entries=0)
    assert dft == pytest.approx(exact, rel=2e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_large_conv_bound_is_above_and_close_to_power_iteration(stride):
    torch.manual_seed(stride)
    conv = nn.Conv2d(16, 16, 3, stride, 1)
    shape = (16, 24, 24)  # 9216 inputs: too large for the explicit matrix
    estimate = power_iteration(conv, shape)
    bound = conv_operator_norm(conv.weight, shape[1:], stride, 1)
    assert estimate <= bound <= 1.1 * estimate


def test_average_pooling_norms():
    torch.manual_seed(0)
    linear = nn.Linear(16, 2)
    pooled = lipschitz_bound(nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), linear), DIGITS)
    plain = lipschitz_bound(nn.Sequential(nn.Flatten(), linear), (1, 4, 4))
    assert pooled.logits == pytest.approx(0.5 * plain.logits, rel=1e-4)  # 2x2 mean: norm 1/2
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 1, bias=False))
    nn.init.constant_(model[2].weight, 1.0)
    assert lipschitz_bound(model, DIGITS).logits == pytest.approx(1 / 8, rel=1e-4)  # mean of 64: 1/sqrt(64)


def sampled_gradient_ratio(model: nn.Module, x: torch.Tensor, bound) -> float:
    """max over points and margins of ||grad m_j||_2 / L_{y,j}: must be <= 1."""
    y = model(x).argmax(1)
    grads = margin_gradients(model, x, y)
    norms = grads.grad.flatten(2).norm(dim=2).double()
    return float((norms / bound.margin[y.view(-1, 1), other_classes(y, 10)]).max())


def test_bound_dominates_sampled_gradients_of_trained_models(request, residual_net, digits):
    _, test = digits
    noisy = (test.x[:200] + 0.3 * torch.randn(200, *DIGITS, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    points = torch.cat([test.x, noisy, torch.rand(200, *DIGITS, generator=torch.Generator().manual_seed(1))])
    for name, model in trained_models(request, residual_net).items():
        bound = lipschitz_bound(model, DIGITS)
        ratio = sampled_gradient_ratio(model, points, bound)
        assert 0 < ratio <= 1.0, name


@pytest.mark.parametrize("name,kwargs", [
    ("cnn7", {"width": 4, "linear": 16}),                   # BatchNorm folded into conv and dense layers
    ("mobilenet_v2", {"width_mult": 0.25, "depth": 2}),     # depthwise convs, relu(x) - relu(x - 6)
    ("wide_resnet", {"depth": 10, "widen": 1}),             # stride-2 blocks with 1x1 shortcuts
])
def test_bound_dominates_sampled_gradients_of_other_families(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, 10, DIGITS, mean=[0.3], std=[0.4], **kwargs)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.2, 3.0)
            m.running_mean.uniform_(-1, 1)
            nn.init.uniform_(m.weight, -2, 2)
    model.eval()
    points = torch.rand(300, *DIGITS, generator=torch.Generator().manual_seed(2))
    assert 0 < sampled_gradient_ratio(model, points, lipschitz_bound(model, DIGITS)) <= 1.0


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_no_certified_point_is_broken_by_pgd(request, residual_net, digits, norm):
    _, test = digits
    x, y = test.x[:150], test.y[:150]
    for name, model in trained_models(request, residual_net).items():
        result = lipschitz_radius(model, x, y, norm)
        assert result.kind == "certified"
        wrong = model(x).argmax(1) != y
        assert bool((result.radius[wrong] == 0).all()), name
        certified = result.radius > 0
        assert int(certified.sum()) > 0, name
        attack = pgd(model, x[certified], y[certified], result.radius[certified], norm, steps=20,
                     generator=torch.Generator().manual_seed(0))
        assert bool((attack.margin > 0).all()), name


def test_unsupported_layers_raise_one_clear_error():
    vit = create_model("vit", 10, DIGITS, dim=16, depth=1, heads=2).eval()
    with pytest.raises(UnsupportedModelError, match="clever or smoothing"):
        lipschitz_bound(vit, DIGITS)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    with pytest.raises(UnsupportedModelError, match="MaxPool2d"):
        lipschitz_bound(pooled, DIGITS)
    with pytest.raises(BoundsError, match="eval mode"):  # batch statistics are no fixed map
        lipschitz_bound(create_model("cnn7", 10, DIGITS, width=4, linear=8).train(), DIGITS)

    class Square(nn.Module):
        def forward(self, x):
            return (x * x).flatten(1)[:, :3]

    with pytest.raises(UnsupportedModelError) as info:
        lipschitz_bound(Square(), DIGITS)
    assert "\n" not in str(info.value) and "mul" in str(info.value)
