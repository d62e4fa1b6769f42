"""Training objectives, one file per method family (theory.md §4), in the :data:`LOSSES` registry."""

from certkd.train.losses import (  # noqa: F401  (registration)
    adversarial,
    certified,
    certified_distill,
    distill,
    natural,
    robust_distill,
)
from certkd.train.losses._registry import (
    LOSSES,
    LossBatch,
    LossSpec,
    ObjectiveParams,
    get_loss,
    list_methods,
    register_loss,
)
from certkd.train.losses.natural import gaussian_noise

__all__ = ["LOSSES", "LossBatch", "LossSpec", "ObjectiveParams", "gaussian_noise", "get_loss", "list_methods",
           "register_loss"]
