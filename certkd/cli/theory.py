"""``certkd bounds`` and ``certkd compare``: parse the options, call the application, print.

The work is in ``certkd.transfer_study`` (bounds, theory.md §3) and ``certkd.comparison``
(compare, theory.md §6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bounds.attack import ATTACKS
from bounds.linearity import GAMMA_METHODS
from certkd.certification.methods import certify_methods
from certkd.cli import main
from certkd.cli.options import (
    OUTPUT_DIR,
    dataclass_options,
    eps_callback,
    norm_option,
    notify_stderr,
    overwrite_option,
    parse_params,
    points_options,
    run_options,
    shard_option,
)
from certkd.verdict import CompareRule

_out_option = click.option("--out", type=OUTPUT_DIR, default=None,
                           help="Directory for per_example.jsonl (appended as computed), the summary and figures.")
_resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")


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
@_out_option
@_resume_option
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
    from certkd.transfer_study import BoundsJob, format_bounds, run_bounds

    job = BoundsJob(eps=eps, norm=norm, certified_gamma=certified_gamma, method=method, steps=steps,
                    restarts=restarts, batch_size=batch_size, seed=seed)
    summary = run_bounds(student, teacher, job, shard, dataset=dataset, split=split, data_dir=data_dir,
                         num_examples=num_examples, device=device, out=out, resume=resume, overwrite=overwrite,
                         progress=progress, max_memory=max_memory, notify=notify_stderr)
    if summary is not None:
        click.echo(format_bounds(summary))
    else:
        click.echo("certkd bounds: shard done; combine the shards' per_example.jsonl files with "
                   "certkd merge FILES --out DIR")


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
@points_options
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
@run_options
@_out_option
@_resume_option
@overwrite_option
@shard_option
def compare_command(student: Path, teacher: Path, method: str, attack: str, eps: list[float] | None, norm: str,
                    num_examples: int | None, dataset: str | None, data_dir: Path | None, split: str,
                    radius_tol: float, student_records: Path | None, teacher_records: Path | None,
                    params: dict[str, Any], batch_size: int, device: str, seed: int,
                    max_memory: int | None, progress: bool, out: Path | None, resume: bool, overwrite: bool,
                    shard: tuple[int, int] | str | None, **rule: Any) -> None:
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
    from certkd.comparison import CompareJob, format_compare, run_compare

    job = CompareJob(method=method, norm=norm, params={"radius_tol": radius_tol, **params}, batch_size=batch_size,
                     seed=seed, eps=eps, attack=attack, rule=CompareRule(**rule))
    summary = run_compare(student, teacher, job, shard, dataset=dataset, split=split, data_dir=data_dir,
                          num_examples=num_examples, device=device, out=out, resume=resume, overwrite=overwrite,
                          progress=progress, max_memory=max_memory, notify=notify_stderr,
                          student_records=student_records, teacher_records=teacher_records)
    if summary is not None:
        click.echo(format_compare(summary))
    elif job.shard is not None:
        k, n = job.shard
        click.echo(f"certkd compare: shard {k}/{n} done; combine the shards' per_example.jsonl files with "
                   "certkd merge FILES --out DIR")
