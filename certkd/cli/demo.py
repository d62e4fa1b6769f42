"""``certkd demo``: the main job on the embedded digits data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from certkd.cli import main
from certkd.cli.options import seed_option


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Folder for checkpoints, per-example records, results.json, report.md and figures. "
                   "Running again into the same folder resumes: finished steps are reused.")
@click.option("--quick", is_flag=True, help="Certify and compare on fewer points (60 instead of 300); same training.")
@seed_option
def demo_command(out: Path, quick: bool, seed: int) -> None:
    """Train a PGD-AT teacher, a KD and a KDIGA student on digits; certify, compare, explain.

    Writes OUT/report.md (tables, verdicts, what each number means), OUT/results.json
    and OUT/figures/*.png, and prints the summary. Deterministic for a seed on CPU.
    """
    from certkd.demo import run_demo

    results = run_demo(out, quick=quick, seed=seed)
    click.echo(f"certkd demo: results in {out}/report.md and {out}/results.json")
    for name, c in results["comparisons"].items():
        click.echo(f"  {name:5s} student vs teacher: {c['verdict']:12s} ({c['reason']})")
    for name, t in results["transfer"].items():
        click.echo(f"  {name:5s} gradient gap at x (mean) {t['gradient_gap_mean']:.4f}; "
                   f"transfer bound (PGD gammas, an estimate) holds on {100 * t['bound_holds_fraction']:.0f}% of points")
    click.echo(json.dumps({n: m["certification"]["clean_accuracy"]["accuracy"] for n, m in results["models"].items()}))
