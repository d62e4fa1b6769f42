"""``certkd info``, ``certkd models``, ``certkd datasets`` and ``certkd convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from certkd.checkpoint import (
    NORMALIZE_KEYS,
    Checkpoint,
    file_sha256,
    load_checkpoint,
    make_checkpoint,
    provenance,
    save_checkpoint,
    torch_load_weights_only,
)
from certkd.cli import main
from certkd.data import dataset_description, dataset_info, list_datasets
from certkd.errors import CertkdError, CheckpointError
from certkd.models import create_model, list_models, model_description

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which a training script's dict commonly holds the state_dict."""
SHOWN_KEYS = 6


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object (machine output).")
def info(checkpoint: str, as_json: bool) -> None:
    """Show what a checkpoint holds: model, dataset, parameters, training summary, provenance.

    The checkpoint is fully validated (loaded with weights_only=True, checksum, finite
    weights, and the weights loaded strictly into the registry model).
    """
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    summary = ckpt.summary()
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["file"] = {"path": str(ckpt.path), "bytes": ckpt.path.stat().st_size, "sha256": file_sha256(ckpt.path)}
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    for label, text in _info_lines(summary):
        click.echo(f"{label:<12}{text}")


def _info_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    file, model, norm = summary["file"], summary["model"], summary["normalization"]
    kwargs = json.dumps(model["kwargs"]) if model["kwargs"] else "default arguments"
    return [
        ("checkpoint", f"{file['path']} ({file['bytes']:,} bytes, sha256 {file['sha256'][:16]}...)"),
        ("format", f"certkd checkpoint v{summary['format_version']}"),
        ("model", f"{model['name']} ({kwargs}), {summary['parameters']:,} parameters"),
        ("dataset", f"{summary['dataset']}: input {tuple(summary['input_shape'])}, {summary['num_classes']} classes"),
        ("normalize", f"mean {_floats(norm['mean'])}, std {_floats(norm['std'])} (first layer of the model)"),
        ("training", _key_values(summary["config"])),
        ("metrics", _key_values(summary["metrics"])),
        ("provenance", _key_values(summary["provenance"])),
    ]


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _key_values(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in d.items()) if d else "none recorded"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


@main.command()
def models() -> None:
    """List the model registry: name, one-line description and builder arguments (for --arch-kwargs)."""
    names = list_models()
    width = max(map(len, names))
    for name in names:
        click.echo(f"{name:<{width}}  {model_description(name)}")


@main.command()
def datasets() -> None:
    """List the datasets: name, input shape (C, H, W), classes and where the files go.

    File-backed datasets read DATA_DIR (--data-dir, else $CERTKD_DATA_DIR, else ./data);
    nothing is downloaded unless CERTKD_DOWNLOAD=1 is set and torchvision is installed.
    """
    names = list_datasets()
    width = max(map(len, names))
    for name in names:
        meta = dataset_info(name)
        shape = "x".join(str(s) for s in meta.input_shape)
        click.echo(f"{name:<{width}}  {shape:<9} {meta.num_classes:>4} classes  {dataset_description(name)}")


@main.command()
@click.option("--arch", required=True, type=click.Choice(list_models()), help="Registry model (see `certkd models`).")
@click.option("--arch-kwargs", default="{}", show_default=True,
              help="Builder arguments as a JSON object, e.g. '{\"depth\": 28, \"widen\": 10}'.")
@click.option("--dataset", "dataset_name", required=True, type=click.Choice(list_datasets()),
              help="Dataset the weights were trained on: fixes input shape, classes and normalization.")
@click.option("--weights", required=True, help="External weights: a .pt/.pth state_dict (or a dict holding it under "
              "'state_dict' or 'model'), loaded with weights_only=True, or a .safetensors file.")
@click.option("--strip-prefix", default=None, help="Remove this prefix from every key first, e.g. 'module.' "
              "(DataParallel).")
@click.option("--normalization", type=click.Choice(["dataset", "identity"]), default="dataset", show_default=True,
              help="Input normalization put in front of the weights: the dataset's mean/std, or identity for "
              "weights trained on raw [0, 1] inputs (most RobustBench models). Ignored when the weights "
              "carry the Normalize keys 0.mean/0.std.")
@click.option("--out", required=True, help="Where to write the certkd checkpoint (atomic).")
def convert(arch: str, arch_kwargs: str, dataset_name: str, weights: str, strip_prefix: str | None,
            normalization: str, out: str) -> None:
    """Wrap external weights into a certkd checkpoint (strict loading: every key must match).

    The weights are for the model's body (keys as in the network itself, e.g.
    RobustBench state_dicts); the normalization layer is added in front, so the
    checkpoint takes inputs in [0, 1].
    """
    kwargs = _parse_arch_kwargs(arch_kwargs)
    ckpt = wrap_external_weights(arch, kwargs, dataset_name, weights, strip_prefix, normalization)
    save_checkpoint(ckpt, out)
    n_params = ckpt.summary()["parameters"]
    click.echo(f"wrote {out}: {arch} for {dataset_name}, {n_params:,} parameters from {weights} "
               f"({len(ckpt.state_dict)} tensors, strict match)")


def _parse_arch_kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg}): {text!r}", param_hint="--arch-kwargs") from None
    if not isinstance(kwargs, dict):
        raise click.BadParameter(f"must be a JSON object, got {text!r}", param_hint="--arch-kwargs")
    return kwargs


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
    """Load external weights strictly into ``create_model(arch, ...)`` and return the checkpoint.

    Keys are the body's (the registry model is ``Sequential(Normalize, body)``: body key
    ``k`` becomes ``1.k``) unless the weights hold the Normalize keys ``0.mean``/``0.std``,
    in which case they are a whole registry model's. Missing Normalize keys come from the
    dataset's mean/std (``normalization="dataset"``) or are the identity (``"identity"``).
    """
    meta = dataset_info(dataset_name)
    channels = meta.input_shape[0]
    mean, std = (meta.mean, meta.std) if normalization == "dataset" else ((0.0,) * channels, (1.0,) * channels)
    model = create_model(arch, num_classes=meta.num_classes, input_shape=meta.input_shape, mean=mean, std=std,
                         **arch_kwargs)
    external = read_external_state_dict(weights)
    if strip_prefix:
        stripped = {k.removeprefix(strip_prefix): v for k, v in external.items()}
        if len(stripped) != len(external):
            raise CheckpointError(f"{weights}: removing prefix {strip_prefix!r} makes some keys collide")
        external = stripped
    whole_model = all(k in external for k in NORMALIZE_KEYS)
    mapped = dict(external) if whole_model else {f"1.{k}": v for k, v in external.items()}
    if not whole_model:
        mapped.update({k: v for k, v in model.state_dict().items() if k in NORMALIZE_KEYS})
    _check_keys_fit(model, mapped, whole_model, external, arch, dataset_name, weights, strip_prefix)
    model.eval()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights}: weight {name!r} contains NaN or Inf values")
    config = {"source": "certkd convert", "arch_kwargs": arch_kwargs, "normalization": normalization,
              "strip_prefix": strip_prefix}
    prov = provenance(seed=None, converted_from=str(weights), weights_sha256=file_sha256(weights))
    return make_checkpoint(model, arch, arch_kwargs, meta, config=config, provenance_info=prov)


def _check_keys_fit(model: torch.nn.Module, mapped: dict[str, torch.Tensor], whole_model: bool,
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
