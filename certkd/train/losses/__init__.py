"""Training objectives, one file per method family (theory.md §4)."""

from certkd.train.losses import adversarial, distill, natural, robust_distill  # noqa: F401  (registration)
from certkd.train.losses._registry import (
    LossBatch,
    LossSpec,
    MethodParams,
    get_loss,
    list_methods,
    register_loss,
)
from certkd.train.losses.natural import gaussian_noise

__all__ = ["LossBatch", "LossSpec", "MethodParams", "gaussian_noise", "get_loss", "list_methods", "register_loss"]
