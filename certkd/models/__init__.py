"""certkd model registry: one small file per family."""

from certkd.models import cnn, mlp, mobilenet_v2, resnet, vit, wide_resnet  # noqa: F401  (registration)
from certkd.models._registry import MODELS, create_model, list_models, model_description, register_model

__all__ = ["MODELS", "create_model", "list_models", "model_description", "register_model"]
