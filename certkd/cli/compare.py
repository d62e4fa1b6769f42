"""``certkd compare``: parse the options, call ``certkd.commands.compare``, print (theory.md §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bounds.attack import ATTACKS
from certkd.certification.methods import certify_methods
from certkd.cli import main
from certkd.cli.options import (
    dataclass_options,
    echo_summary,
    eps_callback,
    folder_out,
    norm_option,
    parse_params,
    run_settings,
)
from certkd.run import RunSettings
from certkd.verdict import CompareRule


@main.command("compare")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(certify_methods()), default="crown", show_default=True,
              help="Radius method of 'certkd certify' (the same for both models), e.g. crown, ibp, lipschitz, "
                   "smoothing, clever (an estimate: the verdict is then an estimate too).")
@click.option("--attack", type=click.Choice(list(ATTACKS)), default="apgd", show_default=True,
              help="Attack of the empirical part: APGD-CE + targeted APGD-DLR (--param apgd_steps=...), or PGD.")
@click.option("--eps", "eps", multiple=True, callback=eps_callback(None),
              help="Eps grid of both parts' curves (default: 11 points from 0 to the 90th percentile of the "
                   "teacher's attack radii).")
@norm_option
@click.option("--radius-tol", type=float, default=1e-3, show_default=True,
              help="Bisection tolerance of both parts' radii; differences within it count as ties.")
@click.option("--student-records", type=click.Path(path_type=Path), default=None,
              help="Reuse the student's radii from a 'certkd certify --radius --per-example' file of the same "
                   "points and method (checked by its configuration header).")
@click.option("--teacher-records", type=click.Path(path_type=Path), default=None,
              help="The same for the teacher.")
@click.option("--param", "params", multiple=True, callback=lambda ctx, param, values: parse_params(values),
              help="Further method parameter KEY=VALUE of 'certkd certify' (e.g. sigma=0.5, n=1000, smoothing's "
                   "alpha=0.001); repeatable.")
@dataclass_options(CompareRule)
@run_settings(folder_out)
def compare_command(student: Path, teacher: Path, method: str, attack: str, eps: list[float] | None, norm: str,
                    radius_tol: float, student_records: Path | None, teacher_records: Path | None,
                    params: dict[str, Any], batch_size: int, seed: int, settings: RunSettings, **rule: Any) -> None:
    """Does STUDENT certify at least as robustly as TEACHER?  yes / no / inconclusive.

    \b
    Two parts on the same points (theory.md §6), each tested the same way:
      certified: radii r_S, r_T by --method (the bounds' view);
      empirical: attack radii a_S, a_T by --attack (the smallest eps where the attack
                 finds an adversarial example: an upper bound of the true radius).
    Per part: the fraction with radius_S >= radius_T - tol, accuracy against eps with
    a paired bootstrap CI of the difference, a one-sided Wilcoxon signed-rank test,
    and the part's verdict: no when a CI lies below -margin or the student's radii
    are significantly smaller (Wilcoxon at 1 - --ci-level); yes when the fraction
    reaches --fraction or they are significantly larger; else inconclusive.
    The headline is never more favourable than either part: no if either says no,
    yes only if the certified part says yes and the empirical part not no. It comes
    with rho = median(r_T) / median(a_T) and the eps range each part covers.
    """
    from certkd.commands.compare import COMPARE, CompareJob, run_compare

    job = CompareJob(method=method, norm=norm, params={"radius_tol": radius_tol, **params}, batch_size=batch_size,
                     seed=seed, eps=eps, attack=attack, rule=CompareRule(**rule))
    echo_summary(COMPARE, run_compare(student, teacher, job, settings, student_records, teacher_records))
