"""``certkd bounds``: parse the options, call ``certkd.commands.bounds``, print (theory.md §3)."""

from __future__ import annotations

from pathlib import Path

import click

from bounds.bound_methods import GAMMA_METHODS
from certkd.cli import main
from certkd.cli.options import echo_summary, eps_callback, folder_out, norm_option, run_settings
from certkd.run import RunSettings


@main.command("bounds")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--eps", "eps", multiple=True, callback=eps_callback(None), required=True,
              help="Radius; repeatable or a comma list, fractions allowed (e.g. 0.1 or 2/255).")
@norm_option
@click.option("--certified-gamma", is_flag=True,
              help="Also bound the gammas and the teacher's robust loss by bound propagation (certified), giving "
                   "a certified transfer bound, and the margin-form transfer certificate (needs auto_LiRPA).")
@click.option("--method", type=click.Choice(list(GAMMA_METHODS)), default="crown", show_default=True,
              help="Bound propagation method of --certified-gamma (also the margin bounds of the certificate).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True,
              help="PGD steps for the gamma estimates and the robust losses.")
@click.option("--restarts", type=click.IntRange(min=1), default=2, show_default=True, help="PGD restarts.")
@run_settings(folder_out)
def bounds_command(student: Path, teacher: Path, eps: list[float], norm: str, certified_gamma: bool, method: str,
                   steps: int, restarts: int, batch_size: int, seed: int, settings: RunSettings) -> None:
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
    from certkd.commands.bounds import BOUNDS, BoundsJob, run_bounds

    job = BoundsJob(eps=eps, norm=norm, certified_gamma=certified_gamma, method=method, steps=steps,
                    restarts=restarts, batch_size=batch_size, seed=seed)
    echo_summary(BOUNDS, run_bounds(student, teacher, job, settings))
