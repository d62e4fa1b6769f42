"""``certkd certify ckpt.pt`` and ``certkd merge``: parse the options, call the application, print."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import click

from certkd.certification.methods import (
    LEGEND,
    CertifyOptions,
    check_norm,
    get_method,
)
from certkd.cli import main
from certkd.cli.options import (
    OUTPUT_FILE,
    dataclass_options,
    eps_callback,
    methods_help,
    norm_option,
    run_settings,
)
from certkd.errors import CertkdError
from certkd.run import RunSettings

DEFAULT_EPS = "2/255"


def _methods_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    names = [part.strip() for value in (values or ("crown",)) for part in value.split(",") if part.strip()]
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


def _legend() -> str:
    parts = [textwrap.fill(part.strip() + ".", width=92, initial_indent="  ", subsequent_indent="    ")
             for part in LEGEND.rstrip(".").split(". ")]
    return "\b\nEvery figure is labelled:\n" + "\n".join(parts)


@main.command(epilog=_legend())
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--eps", "eps", multiple=True, callback=eps_callback(DEFAULT_EPS),
              help=f"Radius; repeatable or a comma list, fractions allowed (2/255). Default {DEFAULT_EPS}.")
@norm_option
@click.option("--method", "methods", multiple=True, callback=_methods_callback,
              help="Repeatable or comma list (default crown): " + methods_help('; also runs beside every other method unless --pgd-steps 0') + ".")
@click.option("--radius", is_flag=True,
              help="Also compute each example's radius (bound methods: the largest certified eps by bisection, "
                   "with an attack upper end).")
@click.option("--per-example", type=OUTPUT_FILE, default=None,
              help="Per-example JSON lines, appended as computed (needed for --resume and merge).")
@click.option("--export-vnnlib", type=click.Path(path_type=Path), default=None,
              help="Also write the L-inf queries as a VNN-COMP folder (model.onnx, one VNN-LIB per point and eps, "
                   "instances.csv) for alpha,beta-CROWN or any VNN-COMP verifier; needs certkd[onnx].")
@dataclass_options(CertifyOptions)
@run_settings(click.option("--out", type=OUTPUT_FILE, default=None, help="Summary JSON (written atomically)."))
def certify(checkpoint: Path, eps: list[float], norm: str, methods: list[str], radius: bool, batch_size: int,
            seed: int, per_example: Path | None, export_vnnlib: Path | None, settings: RunSettings,
            **options: Any) -> None:
    """Certify the first N points of a split for CHECKPOINT: accuracy per method and eps, and radii.

    Prints clean accuracy, PGD accuracy (an empirical upper bound), certified (or
    estimated) accuracy per method and eps, and with --radius the radius summary.
    Bound methods (ibp, crown-ibp, crown, alpha-crown) need auto_LiRPA; models they
    cannot bound (ViT) take clever, lipschitz or smoothing.
    """
    from certkd.certification import CertifyJob, format_summary
    from certkd.commands.certify import certify_checkpoint

    job = CertifyJob(methods=methods, eps=eps, norm=norm, radius=radius, batch_size=batch_size, seed=seed,
                     params=CertifyOptions(**options))
    if export_vnnlib is not None:
        from certkd.queries import export_queries

        if check_norm(norm) != "inf":
            raise CertkdError("--export-vnnlib writes L-inf queries (VNN-LIB boxes): use --norm inf")
        info = export_queries(checkpoint, export_vnnlib, eps, settings.dataset, settings.split, settings.data_dir,
                              settings.num_examples)
        click.echo(f"wrote {len(info['queries'])} queries to {export_vnnlib} (instances.csv, model.onnx)")
    summary = certify_checkpoint(checkpoint, job, settings, per_example)
    if summary is not None:
        click.echo(format_summary(summary))
