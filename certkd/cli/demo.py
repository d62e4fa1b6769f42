"""``certkd demo``: the main job on the embedded digits data."""

from __future__ import annotations

from pathlib import Path

import click

from certkd.cli import main
from certkd.cli.options import OUTPUT_DIR, field_option, seed_option
from certkd.run import RunSettings


@main.command("demo")
@click.option("--out", type=OUTPUT_DIR, default=Path("demo_out"), show_default=True,
              help="Folder for checkpoints, per-example records, results.json, report.md and figures. "
                   "Running again into the same folder resumes: finished steps are reused.")
@click.option("--quick", is_flag=True, help="Certify and compare on fewer points (60 instead of 300); same training.")
@seed_option
@field_option(RunSettings, "overwrite")
@field_option(RunSettings, "progress")
def demo_command(out: Path, quick: bool, seed: int, overwrite: bool, progress: bool) -> None:
    """Train a PGD-AT teacher, a KD and a KDIGA student on digits; certify, compare, explain.

    Writes OUT/report.md (tables, verdicts, what each number means), OUT/results.json
    and OUT/figures/*.png, and prints the summary. Deterministic for a seed on CPU.
    """
    from certkd.commands.demo import format_demo, run_demo

    click.echo(format_demo(run_demo(out, quick=quick, seed=seed, overwrite=overwrite, progress=progress), out))
