"""``certkd verify``: VNN-LIB queries on ONNX models (one, or a benchmark folder's instances.csv)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bounds.bound_methods import BOUND_METHODS
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.io import atomic_write_text, check_output_file


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("prop", required=False, type=click.Path(path_type=Path))
@click.option("--instances", type=click.Path(path_type=Path), default=None,
              help="A VNN-COMP instances.csv (rows onnx,vnnlib,timeout, paths relative to it): run every row.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="--instances: the output folder (results.csv, records.jsonl, summary.json, counterexamples/). "
                   "One query: where to write the answer and, for sat, the counterexample (VNN-COMP format).")
@click.option("--method", type=click.Choice(BOUND_METHODS), default="crown", show_default=True,
              help="Bound propagation method for unsat.")
@click.option("--timeout", type=float, default=None, help="Seconds for the one query (default: none).")
@click.option("--attack-steps", type=int, default=50, show_default=True, help="Sign-gradient steps per start.")
@click.option("--attack-restarts", type=int, default=2, show_default=True, help="Random starts besides the centre.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--expected", type=click.Path(path_type=Path), default=None,
              help="--instances: a results file of known answers; a known sat answered unsat is a soundness failure "
                   "(exit code 1).")
@click.option("--resume", is_flag=True, help="--instances: continue an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="--instances: discard the results in --out and start again.")
def verify(model: Path | None, prop: Path | None, instances: Path | None, out: Path | None, method: str,
           timeout: float | None, attack_steps: int, attack_restarts: int, seed: int, expected: Path | None,
           resume: bool, overwrite: bool) -> None:
    """Answer VNN-LIB queries on ONNX models: sat (a counterexample checked by onnxruntime), unsat (proved by
    bound propagation) or unknown/timeout.

    certkd verify MODEL.onnx PROP.vnnlib answers one query; certkd verify --instances instances.csv --out DIR
    runs a VNN-COMP benchmark folder (resumable) and writes results.csv in the VNN-COMP layout.
    """
    from certkd.verify import VerifyOptions, format_run_summary, run_instances, verify_instance

    options = VerifyOptions(method=method, attack_steps=attack_steps, attack_restarts=attack_restarts, seed=seed)
    if instances is not None:
        if model is not None or prop is not None:
            raise CertkdError("give either MODEL PROP or --instances, not both")
        if out is None:
            raise CertkdError("--instances needs --out DIR (where results.csv and the run's records go)")
        summary = run_instances(instances, out, options, resume=resume, overwrite=overwrite, expected=expected,
                                notify=lambda line: click.echo(line, err=True))
        click.echo(format_run_summary(summary))
        click.echo(f"wrote {out / 'results.csv'}")
        if summary["soundness_failures"]:
            sys.exit(1)
        return
    if model is None or prop is None:
        raise CertkdError("give MODEL.onnx and PROP.vnnlib, or --instances instances.csv")
    if timeout is not None and not timeout > 0:
        raise CertkdError(f"--timeout must be positive, got {timeout}")
    if out is not None:
        check_output_file(out, "--out")
    verdict = verify_instance(model, prop, options, timeout)
    click.echo(f"{verdict.result}: {verdict.reason} ({verdict.prepare_time + verdict.run_time:.2f} s)")
    if out is not None:
        atomic_write_text(out, verdict.counterexample or f"{verdict.result}\n")
        click.echo(f"wrote {out}")


@main.command(name="import-results")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--queries", type=click.Path(path_type=Path), required=True,
              help="The folder written by 'certkd certify --export-vnnlib' (its queries.json).")
@click.option("--per-example", type=click.Path(path_type=Path), required=True,
              help="The certify record file to write (method 'complete': unsat = certified).")
def import_results(results: Path, queries: Path, per_example: Path) -> None:
    """Read a VNN-COMP results.csv (alpha,beta-CROWN or any verifier) for exported queries as certify records."""
    from certkd.queries import import_results as run_import

    counts = run_import(results, queries, per_example)
    shown = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    click.echo(f"wrote {per_example}: {sum(counts.values())} records ({shown}); unsat counts as certified")
