"""``certkd certify ckpt.pt`` and ``certkd merge``: certified accuracy and radii of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from certkd.cli import main
from certkd.cli.options import device_option, norm_option, parse_eps_list, parse_shard, seed_option
from certkd.errors import CertkdError

DEFAULT_EPS = "2/255"


def _eps_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[float]:
    return parse_eps_list(values or (DEFAULT_EPS,))


def _shard_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    return parse_shard(value)


def _methods_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    from certkd.certification import get_method

    names = [part.strip() for value in (values or ("crown",)) for part in value.split(",") if part.strip()]
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


def _method_help() -> str:
    from certkd.certification import METHODS, PGD

    return "; ".join(f"{m.name} ({m.kind}{'' if m.target == 'model' else ' for the ' + m.target})"
                     for m in METHODS.values() if m.name != PGD)


def _legend() -> str:
    import textwrap

    from certkd.certification import LEGEND

    parts = [textwrap.fill(part.strip() + ".", width=92, initial_indent="  ", subsequent_indent="    ")
             for part in LEGEND.rstrip(".").split(". ")]
    return "\b\nEvery figure is labelled:\n" + "\n".join(parts)


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CertkdError(f"unknown device {device!r} (examples: cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertkdError(f"device {device!r} asked for, but no CUDA GPU is available")


@main.command(epilog=_legend())
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--dataset", default=None, help="Dataset name (default: the checkpoint's dataset).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Where the dataset's files live.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("-n", "--num-examples", type=click.IntRange(min=1), default=None,
              help="Certify the first N examples of the split (default: all).")
@click.option("--eps", "eps", multiple=True, callback=_eps_callback,
              help=f"Radius; repeatable or a comma list, fractions allowed (2/255). Default {DEFAULT_EPS}.")
@norm_option
@click.option("--method", "methods", multiple=True, callback=_methods_callback,
              help="Repeatable or comma list (default crown): " + _method_help() + ".")
@click.option("--radius", is_flag=True,
              help="Also compute each example's radius (bound methods: the largest certified eps by bisection, "
                   "with an attack upper end).")
@click.option("--radius-tol", type=float, default=1e-3, show_default=True, help="Bisection tolerance of --radius.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@device_option
@seed_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Summary JSON (written atomically).")
@click.option("--per-example", type=click.Path(path_type=Path), default=None,
              help="Per-example JSON lines, appended as computed (needed for --resume and merge).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its --per-example file.")
@click.option("--shard", callback=_shard_callback, default=None,
              help="Run only part k of n (k/n, 0-based); combine the parts with 'certkd merge'.")
@click.option("--pgd-steps", type=int, default=20, show_default=True, help="PGD steps (0: no PGD accuracy).")
@click.option("--pgd-restarts", type=int, default=1, show_default=True)
@click.option("--clever-batches", type=int, default=50, show_default=True, help="CLEVER: batches of samples.")
@click.option("--clever-samples", type=int, default=128, show_default=True, help="CLEVER: samples per batch.")
@click.option("--clever-radius", type=float, default=None,
              help="CLEVER: sampling radius R (default 0.5 for inf, 2 for L2).")
@click.option("--sigma", type=float, default=0.25, show_default=True, help="Smoothing: noise level.")
@click.option("--n0", type=int, default=100, show_default=True, help="Smoothing: selection samples.")
@click.option("--n", "n_samples", type=int, default=1000, show_default=True, help="Smoothing: estimation samples.")
@click.option("--alpha", type=float, default=0.001, show_default=True, help="Smoothing: failure probability.")
def certify(checkpoint: Path, dataset: str | None, data_dir: Path | None, split: str, num_examples: int | None,
            eps: list[float], norm: str, methods: list[str], radius: bool, radius_tol: float, batch_size: int,
            device: str, seed: int, out: Path | None, per_example: Path | None, resume: bool,
            shard: tuple[int, int] | None, pgd_steps: int, pgd_restarts: int, clever_batches: int,
            clever_samples: int, clever_radius: float | None, sigma: float, n0: int, n_samples: int,
            alpha: float) -> None:
    """Certify the first N points of a split for CHECKPOINT: accuracy per method and eps, and radii.

    Prints clean accuracy, PGD accuracy (an empirical upper bound), certified (or
    estimated) accuracy per method and eps, and with --radius the radius summary.
    Bound methods (ibp, crown-ibp, crown, alpha-crown) need auto_LiRPA; models they
    cannot bound (ViT) take clever, lipschitz or smoothing.
    """
    import torch

    from certkd.certification import (
        CertifyJob,
        MethodParams,
        check_fits,
        config_differences,
        format_summary,
        header_record,
        prepare_methods,
        read_per_example,
        record_key,
        run_certification,
        summarize,
    )
    from certkd.checkpoint import file_sha256, load_checkpoint
    from certkd.data import load_dataset
    from certkd.io import JsonlAppender, atomic_write_json

    if resume and per_example is None:
        raise CertkdError("--resume needs --per-example FILE (the file the interrupted run appended to)")
    for path in (out, per_example):
        if path is not None and path.is_dir():
            raise CertkdError(f"{path} is a directory; give a file name")
    params = MethodParams(pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, clever_batches=clever_batches,
                          clever_samples=clever_samples, clever_radius=clever_radius, sigma=sigma, n0=n0,
                          n=n_samples, alpha=alpha, radius_tol=radius_tol)
    job = CertifyJob(methods=methods, eps=eps, norm=norm, radius=radius, batch_size=batch_size, seed=seed,
                     params=params, shard=shard)
    job.check()
    _check_device(device)
    ckpt = load_checkpoint(checkpoint)
    data_name = dataset or ckpt.dataset
    data = load_dataset(data_name, split, data_dir)
    if data.info.num_classes != ckpt.num_classes:
        raise CertkdError(f"dataset {data_name!r} has {data.info.num_classes} classes but the model of "
                          f"{checkpoint} has {ckpt.num_classes}")
    check_fits(ckpt.input_shape, ckpt.num_classes, data.x, data.y, f"dataset {data_name!r}")
    torch.manual_seed(seed)
    model = ckpt.build_model(device)
    context = prepare_methods(model, ckpt.input_shape, job.all_methods(), job.norm, params, device)
    count = len(data) if num_examples is None else min(num_examples, len(data))
    config: dict[str, Any] = {"checkpoint_sha256": file_sha256(checkpoint), "model": ckpt.model_name,
                              "dataset": data_name, "split": split, "num_examples": count, **job.to_config()}

    records: list[dict[str, Any]] = []
    appender = None
    if per_example is not None:
        previous, records = read_per_example(per_example)
        if previous is not None and not resume:
            raise CertkdError(f"{per_example} already holds results: pass --resume to continue that run, "
                              "or remove the file")
        if previous is not None and previous != config:
            raise CertkdError(f"{per_example} was written by a different run (it differs in "
                              f"{', '.join(config_differences(previous, config)) or 'its configuration'}); "
                              "use another --per-example file")
        appender = JsonlAppender(per_example)
        if previous is None:
            appender.write([header_record(config)])
    try:
        records += run_certification(model, data.x, data.y, range(count), job,
                                     done={record_key(r) for r in records},
                                     sink=appender.write if appender else None, progress=True, context=context)
    finally:
        if appender is not None:
            appender.close()
    summary = summarize(config, records)
    summary["provenance"] = {"checkpoint": str(checkpoint), "device": str(device), "per_example": (
        str(per_example) if per_example else None)}
    click.echo(format_summary(summary))
    if out is not None:
        atomic_write_json(out, summary)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Summary JSON of the whole run.")
@click.option("--per-example", type=click.Path(path_type=Path), default=None,
              help="Also write all records, in order, as one per-example JSONL file.")
def merge(files: tuple[Path, ...], out: Path, per_example: Path | None) -> None:
    """Combine the --per-example files of 'certkd certify --shard k/n' runs into one summary.

    Checks that the files come from the same configuration, that every shard is
    present once and complete, and that their examples are disjoint; the summary
    is the one a single run would give.
    """
    from certkd.certification import format_summary, header_record, merge_shards, read_per_example, summarize
    from certkd.io import atomic_write, atomic_write_json

    parts = []
    for path in files:
        if not path.is_file():
            raise CertkdError(f"{path}: no such per-example file")
        config, records = read_per_example(path)
        parts.append((str(path), config, records))
    config, records = merge_shards(parts)
    summary = summarize(config, records)
    summary["provenance"] = {"merged_from": [str(p) for p in files]}
    if per_example is not None:
        import json

        def write(fh: Any) -> None:
            for row in [header_record(config), *records]:
                fh.write(json.dumps(row) + "\n")

        atomic_write(per_example, write)
    atomic_write_json(out, summary)
    click.echo(format_summary(summary))
