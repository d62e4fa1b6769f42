"""Wrap external weights and in-memory modules into certkd checkpoints (``certkd convert``, ``save_model``).

Loading is strict: every key of the weights must be a key of the registry (or plugin)
model ``arch`` built for the dataset, with the same shape, and every key of the model
must be given; the first problems are named in one ``CheckpointError`` sentence.
Weights files are read with ``torch.load(weights_only=True)`` or safetensors, so they
never run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkd.checkpoint import (
    NORMALIZE_KEYS,
    Checkpoint,
    file_sha256,
    make_checkpoint,
    provenance,
    save_checkpoint,
    torch_load_weights_only,
)
from certkd.data import dataset_info
from certkd.errors import CertkdError, CheckpointError
from certkd.models import MODELS, create_model
from certkd.models._registry import LOCAL_PROVIDER

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which a training script's dict commonly holds the state_dict."""
SHOWN_KEYS = 6
NORMALIZATIONS = ("dataset", "identity")
SAME_OUTPUT_ATOL = 1e-5
"""``save_model``: max |module(x) - rebuilt(x)|, relative to max(1, max |module(x)|)."""


def read_external_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``path``: ``.safetensors`` (safetensors package), else ``torch.load(weights_only=True)``.

    A dict holding the state_dict under one of ``STATE_DICT_KEYS`` is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state: Any = _read_safetensors(path)
    else:
        state = torch_load_weights_only(path, what="weights")
        for key in STATE_DICT_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected a state_dict (names -> tensors) or a dict holding one under "
                              f"{' or '.join(repr(k) for k in STATE_DICT_KEYS)}, found {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state_dict: entries {_names(bad)} are not named tensors")
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CertkdError("reading .safetensors files needs the safetensors package: pip install safetensors") \
            from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:160]})") \
            from None


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def wrap_external_weights(arch: str, arch_kwargs: dict[str, Any], dataset_name: str, weights: str | Path,
                          strip_prefix: str | None = None, normalization: str = "dataset") -> Checkpoint:
    """Load the weights file ``weights`` strictly into ``create_model(arch, ...)`` (see ``wrap_state_dict``).

    Example
    -------
    >>> ckpt = wrap_external_weights("lenet5", {}, "mnist", "advertorch_lenet5.pt")  # doctest: +SKIP
    >>> save_checkpoint(ckpt, "lenet5.ckpt.pt")  # doctest: +SKIP
    """
    external = read_external_state_dict(weights)
    prov = provenance(seed=None, converted_from=str(weights), weights_sha256=file_sha256(weights))
    return wrap_state_dict(arch, arch_kwargs, dataset_name, external, str(weights), strip_prefix, normalization,
                           prov)


def wrap_state_dict(arch: str, arch_kwargs: dict[str, Any], dataset_name: str, external: dict[str, torch.Tensor],
                    source: str, strip_prefix: str | None = None, normalization: str = "dataset",
                    provenance_info: dict[str, Any] | None = None) -> Checkpoint:
    """Load ``external`` strictly into ``create_model(arch, ...)`` and return the checkpoint.

    Keys are the body's (the registry model is ``Sequential(Normalize, body)``: body key
    ``k`` becomes ``1.k``) unless the weights hold the Normalize keys ``0.mean``/``0.std``,
    in which case they are a whole registry model's. Missing Normalize keys come from the
    dataset's mean/std (``normalization="dataset"``) or are the identity (``"identity"``).
    Any missing, unexpected or mis-shaped key is one ``CheckpointError`` naming it.
    """
    if normalization not in NORMALIZATIONS:
        raise CertkdError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    meta = dataset_info(dataset_name)
    channels = meta.input_shape[0]
    mean, std = (meta.mean, meta.std) if normalization == "dataset" else ((0.0,) * channels, (1.0,) * channels)
    model = create_model(arch, num_classes=meta.num_classes, input_shape=meta.input_shape, mean=mean, std=std,
                         **arch_kwargs)
    if strip_prefix:
        stripped = {k.removeprefix(strip_prefix): v for k, v in external.items()}
        if len(stripped) != len(external):
            raise CheckpointError(f"{source}: removing prefix {strip_prefix!r} makes some keys collide")
        external = stripped
    whole_model = all(k in external for k in NORMALIZE_KEYS)
    mapped = dict(external) if whole_model else {f"1.{k}": v for k, v in external.items()}
    if not whole_model:
        mapped.update({k: v for k, v in model.state_dict().items() if k in NORMALIZE_KEYS})
    _check_keys_fit(model, mapped, whole_model, external, arch, dataset_name, source, strip_prefix)
    model.eval()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: weight {name!r} contains NaN or Inf values")
    config = {"source": "certkd convert", "arch_kwargs": arch_kwargs, "normalization": normalization,
              "strip_prefix": strip_prefix}
    prov = provenance_info if provenance_info is not None else provenance(seed=None, converted_from=source)
    return make_checkpoint(model, arch, arch_kwargs, meta, config=config, provenance_info=prov)


def _check_keys_fit(model: nn.Module, mapped: dict[str, torch.Tensor], whole_model: bool,
                    external: dict[str, torch.Tensor], arch: str, dataset_name: str, weights: str | Path,
                    strip_prefix: str | None) -> None:
    """Load ``mapped`` into ``model``; any missing, unexpected or mis-shaped key is one CheckpointError."""
    def shown(key: str) -> str:  # report keys as they are named in the weights file
        return key if whole_model else key.removeprefix("1.")

    expected = model.state_dict()
    mismatched = [k for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in mapped.items() if k not in mismatched}, strict=False)
    missing = [shown(k) for k in result.missing_keys if k not in mismatched]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {_names([shown(k) for k in result.unexpected_keys])}")
    if mismatched:
        shapes = [f"{shown(k)} {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
        problems.append(f"shape mismatches (weights vs model) {_names(shapes)}")
    if not problems:
        return
    first_parts = {k.split(".", 1)[0] + "." for k in external if "." in k}
    hint = ""
    if not strip_prefix and len(first_parts) == 1 and result.unexpected_keys:
        hint = f"; every key starts with {next(iter(first_parts))!r}: try --strip-prefix {next(iter(first_parts))}"
    raise CheckpointError(f"{weights}: weights do not fit {arch} for {dataset_name} (strict loading): "
                          f"{'; '.join(problems)}{hint}")


def save_model(module: nn.Module, path: str | Path, dataset: str, arch: str, arch_kwargs: dict[str, Any] | None = None,
               normalization: str = "dataset", seed: int = 0) -> Path:
    """Save an in-memory ``nn.Module`` (a notebook's model) as a certkd checkpoint, atomically.

    The module must be an instance of the registry or installed-plugin architecture
    ``arch``: its ``state_dict`` loads strictly into ``create_model(arch, ...)`` (as in
    ``certkd convert``: body keys, or a whole certkd model with ``0.mean``/``0.std``) and
    the rebuilt model computes the same outputs on random inputs
    (``|f(x) - g(x)| <= SAME_OUTPUT_ATOL * max(1, |f(x)|)``). Anything else, including a
    builder registered only in this session (no package, so no other process could rebuild
    it), is refused with one ``CertkdError`` sentence before anything is written.

    Parameters
    ----------
    module : the model; body weights take normalized inputs (the checkpoint puts the
        dataset's ``Normalize`` in front, or the identity with ``normalization="identity"``)
    path : where the checkpoint goes
    dataset : certkd dataset name (input shape, classes, normalization)
    arch, arch_kwargs : the registry/plugin builder and its keyword arguments

    Returns
    -------
    Path of the written checkpoint.

    Example
    -------
    >>> from certkd.checkpoint import save_model
    >>> save_model(my_lenet, "lenet.pt", dataset="mnist", arch="lenet5")  # doctest: +SKIP
    """
    kwargs = dict(arch_kwargs or {})
    check_rebuildable(arch)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    ckpt = wrap_state_dict(arch, kwargs, dataset, state, f"module {type(module).__name__}", None, normalization,
                           provenance(seed=None, saved_from=f"{type(module).__module__}.{type(module).__qualname__}"))
    _check_same_function(module, ckpt, all(k in state for k in NORMALIZE_KEYS), arch, seed)
    return save_checkpoint(ckpt, path)


def check_rebuildable(arch: str) -> None:
    """``arch`` must be a built-in or installed-plugin model name (one sentence otherwise)."""
    provider = MODELS.provider(arch)
    if provider.package.startswith(LOCAL_PROVIDER):
        module = provider.package.removeprefix(LOCAL_PROVIDER)
        raise CertkdError(f"cannot save model {arch!r}: it was registered at run time by module {module}, which no "
                          f"installed package provides, so no other process could rebuild it; put the builder in "
                          f"a package with a [project.entry-points.\"certkd.models\"] entry")


def _check_same_function(module: nn.Module, ckpt: Checkpoint, whole_model: bool, arch: str, seed: int) -> None:
    """The rebuilt model (or its body) must compute what ``module`` computes, on random inputs in [0, 1]."""
    rebuilt = ckpt.build_model()
    target = rebuilt if whole_model else rebuilt.get_submodule("1")  # the body after Normalize
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((4, *ckpt.input_shape), generator=gen)
    was_training = module.training
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        with torch.no_grad():
            mine = module(x.to(device)).detach().cpu().float()
            theirs = target(x).float()
    except Exception as exc:  # noqa: BLE001 - a module that cannot run on the dataset's shape is refused
        raise CertkdError(f"cannot save: the module does not run on {tuple(ckpt.input_shape)} inputs "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    finally:
        module.train(was_training)
    if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > SAME_OUTPUT_ATOL * max(
            1.0, float(mine.abs().max())):
        diff = float((mine - theirs).abs().max()) if mine.shape == theirs.shape else float("inf")
        raise CertkdError(f"cannot save: the module's weights fit {arch!r} but its outputs differ from the rebuilt "
                          f"{arch!r} (max difference {diff:.3g}), so its forward is not {arch!r}'s")
