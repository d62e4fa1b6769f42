"""Model registry (timm style): ``create_model(name, **kwargs)`` and ``list_models()``.

Built on :class:`certkd.registry.Registry`; installed packages add families through the
entry-point group ``certkd.models`` (builder signature ``fn(num_classes, input_shape, **kwargs)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from torch import nn

from bounds.nn import Normalize
from certkd.errors import CertkdError
from certkd.registry import BUILTIN, Provider, Registry, builtin_provider

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", group="certkd.models")
LOCAL_PROVIDER = "module:"
"""Provider prefix of builders registered at run time by a module no installed package holds."""


def module_provider(module: str) -> Provider:
    """Who supplies code of ``module``: certkd, the installed distribution holding its top-level
    package (``importlib.metadata``, nothing imported), or ``module:<name>`` (a notebook, a script)."""
    top = module.split(".", 1)[0]
    if top == BUILTIN:
        return builtin_provider()
    for dist_name in metadata.packages_distributions().get(top, []):
        dist = metadata.distribution(dist_name)
        return Provider(dist.metadata["Name"] or dist_name, dist.version)
    return Provider(LOCAL_PROVIDER + module, "")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(num_classes, input_shape, **kwargs)`` under its function name.

    The provider recorded in checkpoints is the installed distribution holding ``fn``'s
    module; a later process rebuilds the model only through that distribution's
    ``certkd.models`` entry point (a builder registered from a notebook cannot be rebuilt
    elsewhere, and ``save_model`` says so).
    """
    return MODELS.add(fn.__name__, fn, module_provider(fn.__module__))


def list_models() -> list[str]:
    return MODELS.names()


def model_description(name: str) -> str:
    """The builder's first docstring line and its keyword arguments with defaults (``certkd models``)."""
    fn = MODELS.get(name)
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
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` for inputs in [0, 1] of ``input_shape`` (C, H, W).

    The returned model is ``Sequential(Normalize(mean, std), body)``: the
    dataset's normalization is its first layer, so a checkpoint is self-contained
    and radii are in pixel units (theory.md §1).
    """
    builder = MODELS.get(name)
    channels = int(input_shape[0])
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise CertkdError(f"mean/std need {channels} values for input shape {tuple(input_shape)}")
    try:
        body = builder(num_classes=int(num_classes), input_shape=tuple(int(s) for s in input_shape),
                             **kwargs)
    except TypeError as exc:
        raise CertkdError(f"bad arguments for model {name!r}: {exc}") from None
    return nn.Sequential(Normalize(mean, std), body)
