"""Model registry (timm style): ``create_model(name, **kwargs)`` and ``list_models()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from bounds.nn import Normalize
from certkd.errors import CertkdError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_description(name: str) -> str:
    """The builder's first docstring line and its keyword arguments with defaults (``certkd models``)."""
    if name not in _MODELS:
        raise CertkdError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    fn = _MODELS[name]
    doc = (fn.__doc__ or "").strip()
    kwargs = [f"{p.name}={p.default!r}" for p in inspect.signature(fn).parameters.values()
              if p.default is not inspect.Parameter.empty]
    line = doc.splitlines()[0] if doc else ""
    return f"{line} [{', '.join(kwargs)}]" if kwargs else line


def create_model(
    name: str,
    num_classes: int = 10,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build ``name`` for inputs in [0, 1] of ``input_shape`` (C, H, W).

    The returned model is ``Sequential(Normalize(mean, std), body)``: the
    dataset's normalization is its first layer, so a checkpoint is self-contained
    and radii are in pixel units (theory.md §1).
    """
    if name not in _MODELS:
        raise CertkdError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    channels = int(input_shape[0])
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise CertkdError(f"mean/std need {channels} values for input shape {tuple(input_shape)}")
    try:
        body = _MODELS[name](num_classes=int(num_classes), input_shape=tuple(int(s) for s in input_shape),
                             **kwargs)
    except TypeError as exc:
        raise CertkdError(f"bad arguments for model {name!r}: {exc}") from None
    return nn.Sequential(Normalize(mean, std), body)
