"""Natural training and Gaussian noise augmentation (theory.md §4; Cohen et al. 2019 for the noise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from certkd.train.losses._registry import LossBatch, ObjectiveParams, register_loss


@register_loss("natural", needs_teacher=False, uses_attack=False, select="clean_acc",
               summary="CE(S(x), y)")
def natural_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """``CE(z_S(x), y)`` (theory.md §4)."""
    ce = F.cross_entropy(batch.student(batch.x), batch.y)
    return {"ce": ce.detach(), "loss": ce}


def gaussian_noise(x: torch.Tensor, sd: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + N(0, sd^2 I)``, not clipped: the inputs the randomized-smoothing classifier sees (--noise-sd)."""
    if sd == 0:
        return x
    return x + sd * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
