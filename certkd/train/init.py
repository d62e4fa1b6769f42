"""The IBP initialization of Shi et al. (2021), theory.md §7.

Every Linear and Conv weight is drawn from ``N(0, sigma^2)`` with ``sigma = sqrt(2 pi) / n``,
``n`` its fan-in: then, for a box input, the expected width of a layer's interval bound
equals the width of its input's (the bounds neither explode nor vanish with depth), which
with BatchNorm lets IBP training start with a short eps ramp. Biases are left as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def ibp_initialize(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Redraw every Linear/Conv weight of ``model`` as ``N(0, 2 pi / fan_in^2)``; returns how many were redrawn.

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(100, 10))
    >>> ibp_initialize(net)
    1
    >>> abs(float(net[0].weight.std()) - math.sqrt(2 * math.pi) / 100) < 0.003
    True
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in, generator=generator)
                count += 1
    return count
