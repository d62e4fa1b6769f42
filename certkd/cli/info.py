"""``certkd info``, ``certkd models``, ``certkd datasets`` and ``certkd convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from certkd.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.cli.options import OUTPUT_FILE, json_object
from certkd.convert import NORMALIZATIONS, wrap_external_weights
from certkd.data import dataset_description, dataset_info, list_datasets
from certkd.models import MODELS, list_models, model_description
from certkd.train.recipes import recipe_summary


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object (machine output).")
def info(checkpoint: str, as_json: bool) -> None:
    """Show what a checkpoint holds: model, dataset, parameters, training summary, provenance.

    The checkpoint is fully validated (loaded with weights_only=True, checksum, finite
    weights, and the weights loaded strictly into the registry model).
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    summary = ckpt.summary()
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["file"] = {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
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
        ("model", f"{model['name']} ({kwargs}), {summary['parameters']:,} parameters, from "
                  f"{model['provider']['package']} {model['provider']['version']}".rstrip()),
        ("dataset", f"{summary['dataset']}: input {tuple(summary['input_shape'])}, {summary['num_classes']} classes"),
        ("normalize", f"mean {_floats(norm['mean'])}, std {_floats(norm['std'])} (first layer of the model)"),
        ("training", _key_values(summary["config"])),
        *([("recipe", recipe)] if (recipe := recipe_summary(summary["config"])) else []),
        ("metrics", _metrics_text(summary["metrics"])),
        ("provenance", _key_values(summary["provenance"])),
    ]


def _metrics_text(metrics: dict[str, Any]) -> str:
    """The training metrics, each under its real name.

    The trainer records the best validation score under ``best_<selection metric>``; when no
    validation attack ran (``pgd_acc`` is null) the score it used was the clean accuracy, so it
    is shown as ``best_clean_acc``. Values of the last epoch come first, labelled as such.
    """
    shown = dict(metrics)
    best = {k: shown.pop(k) for k in list(shown) if k.startswith("best_")}
    if "best_pgd_acc" in best and metrics.get("pgd_acc") is None:
        best["best_clean_acc"] = best.pop("best_pgd_acc")
    if shown.get("pgd_acc") is None:
        shown.pop("pgd_acc", None)
    elif "val_eps" in shown:
        shown["pgd_acc"] = f"{_value(shown['pgd_acc'])} (PGD at eps {_value(shown['val_eps'])}, an estimate)"
    epoch = shown.pop("epoch", None)
    text = (f"last epoch {epoch}: " if epoch is not None else "") + _key_values(shown)
    return text + (f"; best over the epochs (the .best.pt file): {_key_values(best)}" if best else "")


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
    """List the model registry: name, provider package, one-line description and builder arguments.

    Built-in families show provider ``certkd``; installed packages add families through the
    ``certkd.models`` entry-point group and show their package name and version.
    """
    names = list_models()
    providers = [_provider_label(name) for name in names]
    width, pwidth = max(map(len, names)), max(map(len, providers))
    for name, provider in zip(names, providers, strict=True):
        click.echo(f"{name:<{width}}  {provider:<{pwidth}}  {model_description(name)}")


def _provider_label(name: str) -> str:
    provider = MODELS.provider(name)
    return provider.package if provider.package == "certkd" else f"{provider.package} {provider.version}"


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
@click.option("--arch", default=None, help="Registry or installed-plugin model (see `certkd models`).")
@click.option("--arch-kwargs", default="{}", show_default=True,
              help="Builder arguments as a JSON object, e.g. '{\"depth\": 28, \"widen\": 10}'.")
@click.option("--dataset", "dataset_name", default=None, type=click.Choice(list_datasets()),
              help="Dataset the weights were trained on: fixes input shape, classes and normalization.")
@click.option("--weights", default=None, help="External weights: a .pt/.pth state_dict (or a dict holding it under "
              "'state_dict' or 'model'), loaded with weights_only=True, or a .safetensors file.")
@click.option("--strip-prefix", default=None, help="Remove this prefix from every key first, e.g. 'module.' "
              "(DataParallel).")
@click.option("--normalization", type=click.Choice(NORMALIZATIONS), default="dataset", show_default=True,
              help="Input normalization put in front of the weights: the dataset's mean/std, or identity for "
              "weights trained on raw [0, 1] inputs (most RobustBench models). Ignored when the weights "
              "carry the Normalize keys 0.mean/0.std.")
@click.option("--onnx", "onnx_file", type=click.Path(path_type=Path), default=None,
              help="Convert an ONNX model instead (a chain of Gemm/MatMul, Conv, Relu, ...; needs certkd[onnx]); "
                   "--dataset is then optional and --arch/--weights are not used.")
@click.option("--input-range", type=(float, float), default=None,
              help="--onnx: the range LO HI of the ONNX model's inputs when it is not [0, 1] (an exact affine "
                   "first layer maps [0, 1] onto it).")
@click.option("--out", required=True, type=OUTPUT_FILE, help="Where to write the certkd checkpoint (atomic).")
def convert(arch: str | None, arch_kwargs: str, dataset_name: str | None, weights: str | None,
            strip_prefix: str | None, normalization: str, onnx_file: Path | None,
            input_range: tuple[float, float] | None, out: Path) -> None:
    """Wrap external weights into a certkd checkpoint (strict loading: every key must match).

    The weights are for the model's body (keys as in the network itself, e.g.
    RobustBench state_dicts); the normalization layer is added in front, so the
    checkpoint takes inputs in [0, 1]. Zoo layouts: lenet5 (advertorch), small_cnn (TRADES),
    cnn_4layer/cnn_7layer (auto_LiRPA), dm_small/medium/large (CROWN-IBP), robustbench_wrn,
    preact_resnet18 (RobustBench).
    """
    if onnx_file is not None:
        from certkd.onnx_io import convert_onnx

        ckpt = convert_onnx(onnx_file, dataset_name, input_range)
        save_checkpoint(ckpt, out)
        click.echo(f"wrote {out}: {onnx_file} as a layer chain of {len(ckpt.model_kwargs['layers'])} layers "
                   f"({ckpt.summary()['parameters']:,} parameters), onnx sha256 {ckpt.provenance['onnx_sha256'][:12]}, "
                   f"max difference to onnxruntime {ckpt.config['onnx_max_difference']:.2g}")
        return
    missing = [name for name, value in (("--arch", arch), ("--dataset", dataset_name), ("--weights", weights))
               if value is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or convert an ONNX model with --onnx)")
    assert arch is not None and dataset_name is not None and weights is not None
    kwargs = json_object(arch_kwargs, "--arch-kwargs")
    ckpt = wrap_external_weights(arch, kwargs, dataset_name, weights, strip_prefix, normalization)
    save_checkpoint(ckpt, out)
    n_params = ckpt.summary()["parameters"]
    click.echo(f"wrote {out}: {arch} for {dataset_name}, {n_params:,} parameters from {weights} "
               f"({len(ckpt.state_dict)} tensors, strict match)")

