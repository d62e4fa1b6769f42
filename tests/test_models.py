"""The model registry: every family builds for digits- and CIFAR-shaped inputs and carries its normalization."""

import pytest
import torch

from bounds.nn import Normalize
from certkd.errors import CertkdError
from certkd.models import create_model, list_models, model_description
from certkd.models.mobilenet_v2 import ReLU6

FAMILIES = {"mlp", "cnn4", "cnn7", "resnet18", "resnet_small", "wide_resnet", "mobilenet_v2", "vit"}
# narrow versions keep the suite fast; the architecture (layers, strides, residuals) is the default one
SMALL_KWARGS = {"mlp": {"hidden": [32, 32]}, "cnn4": {"width": 8, "linear": 32}, "cnn7": {"width": 8, "linear": 32},
                "resnet18": {"width": 4}, "resnet_small": {"width": 4}, "wide_resnet": {"depth": 16, "widen": 1},
                "mobilenet_v2": {"width_mult": 0.25, "last_channels": 64}, "vit": {"dim": 16, "depth": 2, "heads": 2}}
INPUT_SHAPES = [(1, 8, 8), (3, 32, 32)]
NUM_CLASSES = 7


def test_registry_holds_every_family():
    assert FAMILIES <= set(list_models())
    for name in list_models():
        assert model_description(name).strip(), f"{name} has no description"


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_shape_normalization_and_batch_independence(name, input_shape):
    channels = input_shape[0]
    mean, std = [0.2, 0.45, 0.6][:channels], [0.3, 0.25, 0.5][:channels]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, input_shape=input_shape, mean=mean, std=std,
                         **SMALL_KWARGS[name]).eval()

    first = model[0]
    assert isinstance(first, Normalize)
    assert torch.equal(first.mean, torch.tensor(mean))
    assert torch.equal(first.std, torch.tensor(std))

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, *input_shape, generator=gen)
    x[0], x[1] = 0.0, 1.0  # the corners of the input box [0, 1]^d
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, NUM_CLASSES)
        assert torch.isfinite(out).all()
        # the normalization really is (x - mean) / std, applied inside the model
        shape = (1, channels, 1, 1)
        body_out = model[1]((x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape))
        torch.testing.assert_close(out, body_out, rtol=1e-5, atol=1e-5)
        # eval mode: an example's logits do not depend on the rest of the batch
        halves = torch.cat([model(x[:2]), model(x[2:])])
        torch.testing.assert_close(out, halves, rtol=1e-4, atol=1e-4)
    assert out.std() > 0, "all logits equal: the model ignores its input"


def test_models_without_mean_std_use_identity_normalization():
    model = create_model("mlp", num_classes=3, input_shape=(2, 4, 4), hidden=[5]).eval()
    assert torch.equal(model[0].mean, torch.zeros(2)) and torch.equal(model[0].std, torch.ones(2))


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "no_such_model"}, "unknown model"),
    ({"name": "cnn4", "mean": [0.1, 0.2], "std": [0.3, 0.4], "input_shape": (1, 8, 8)}, "mean/std need 1"),
    ({"name": "cnn4", "no_such_argument": 3}, "bad arguments"),
    ({"name": "wide_resnet", "depth": 15}, "6n \\+ 4"),
])
def test_bad_model_requests_raise_one_line_errors(kwargs, match):
    with pytest.raises(CertkdError, match=match):
        create_model(**kwargs)


def test_relu6_is_exact_clamp():
    x = torch.linspace(-10, 10, 2001)
    assert torch.equal(ReLU6()(x), x.clamp(0, 6))
