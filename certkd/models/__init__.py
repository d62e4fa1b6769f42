"""certkd model registry: one small file per family."""

from certkd.models import (  # noqa: F401  (registration)
    cnn,
    layers,
    lenet,
    lirpa_zoo,
    mlp,
    mobilenet_v2,
    resnet,
    robustbench,
    vit,
    wide_resnet,
)
from certkd.models._registry import MODELS, create_model, list_models, model_description, register_model

__all__ = ["MODELS", "create_model", "list_models", "model_description", "register_model"]
