"""``certkd bounds``: parse the options, call ``certkd.commands.bounds``, print (theory.md §3)."""

from __future__ import annotations

from pathlib import Path

import click

from bounds.bound_methods import GAMMA_METHODS
from certkd.cli import main
from certkd.cli.options import (
    echo_shard_done,
    eps_callback,
    norm_option,
    notify_stderr,
    out_dir_option,
    overwrite_option,
    points_options,
    resume_dir_option,
    run_options,
    shard_option,
)


@main.command("bounds")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--eps", "eps", multiple=True, callback=eps_callback(None), required=True,
              help="Radius; repeatable or a comma list, fractions allowed (e.g. 0.1 or 2/255).")
@norm_option
@points_options
@click.option("--certified-gamma", is_flag=True,
              help="Also bound the gammas and the teacher's robust loss by bound propagation (certified), giving "
                   "a certified transfer bound, and the margin-form transfer certificate (needs auto_LiRPA).")
@click.option("--method", type=click.Choice(list(GAMMA_METHODS)), default="crown", show_default=True,
              help="Bound propagation method of --certified-gamma (also the margin bounds of the certificate).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True,
              help="PGD steps for the gamma estimates and the robust losses.")
@click.option("--restarts", type=click.IntRange(min=1), default=2, show_default=True, help="PGD restarts.")
@run_options
@out_dir_option
@resume_dir_option
@overwrite_option
@shard_option
def bounds_command(student: Path, teacher: Path, eps: list[float], norm: str, num_examples: int | None,
                   dataset: str | None, data_dir: Path | None, split: str, certified_gamma: bool, method: str,
                   steps: int, restarts: int, batch_size: int, device: str, seed: int, max_memory: int | None,
                   progress: bool, out: Path | None, resume: bool, overwrite: bool,
                   shard: tuple[int, int] | str | None) -> None:
    """The transfer bound of theory.md §3 for STUDENT distilled from TEACHER, term by term.

    \b
    robust_S <= robust_T + [loss_S(x) - loss_T(x)] + eps * ||grad loss_S - grad loss_T||_q
                + gamma_S + gamma_T
    Per example and eps: the losses, the output gap, the gradient gap (dual norm q),
    the linearity gammas (PGD: estimate), the robust losses (PGD on CE: estimates),
    the bound (estimate) and whether it holds against the student's measured robust
    loss. --certified-gamma adds certified gammas, a certified upper bound of the
    teacher's robust loss and so a certified bound (it always holds), plus the
    margin-form transfer certificate: points certified through the teacher, directly,
    by both, by neither.
    """
    from certkd.commands.bounds import BoundsJob, format_bounds, run_bounds

    job = BoundsJob(eps=eps, norm=norm, certified_gamma=certified_gamma, method=method, steps=steps,
                    restarts=restarts, batch_size=batch_size, seed=seed)
    summary = run_bounds(student, teacher, job, shard, dataset=dataset, split=split, data_dir=data_dir,
                         num_examples=num_examples, device=device, out=out, resume=resume, overwrite=overwrite,
                         progress=progress, max_memory=max_memory, notify=notify_stderr)
    if summary is not None:
        click.echo(format_bounds(summary))
    else:
        echo_shard_done("bounds")
