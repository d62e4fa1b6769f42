"""The small and large CNNs of certified-training papers (Wong & Kolter; Gowal et al.; Zhang et al.)."""

from torch import nn

from certkd.models._registry import register_model


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@register_model
def cnn4(num_classes: int, input_shape: tuple[int, ...], width: int = 16, linear: int = 100) -> nn.Module:
    """conv(w, 4x4, s2) -> conv(2w, 4x4, s2) -> fc(linear) -> fc(K), ReLU between."""
    c, h, w = input_shape
    h2, w2 = _out(_out(h, 4, 2, 1), 4, 2, 1), _out(_out(w, 4, 2, 1), 4, 2, 1)
    return nn.Sequential(
        nn.Conv2d(c, width, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * h2 * w2, linear), nn.ReLU(),
        nn.Linear(linear, num_classes),
    )


@register_model
def cnn7(num_classes: int, input_shape: tuple[int, ...], width: int = 64, linear: int = 512,
         batch_norm: bool = True) -> nn.Module:
    """The 7-layer CNN of CROWN-IBP / IBP papers: 5 3x3 convs (one stride 2), 2 dense layers."""
    c, h, w = input_shape
    spec = [(c, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
             (2 * width, 2 * width, 1)]
    layers: list[nn.Module] = []
    for cin, cout, stride in spec:
        layers.append(nn.Conv2d(cin, cout, 3, stride, 1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        h, w = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
    layers += [nn.Flatten(), nn.Linear(2 * width * h * w, linear)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(linear))
    layers += [nn.ReLU(), nn.Linear(linear, num_classes)]
    return nn.Sequential(*layers)
