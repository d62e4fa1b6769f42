"""``certkd ablate STUDY.yaml``: parse, run the study (``certkd.commands.ablate``), print its cells."""

from __future__ import annotations

from pathlib import Path

import click

from certkd.cli import main
from certkd.cli.options import OUTPUT_DIR, field_option, methods_help
from certkd.run import RunSettings


def _registries() -> str:
    """The values a study may name, from the registries (never copied)."""
    from certkd.certification.methods import CertifyOptions

    return (f"Methods (study key `methods`): {methods_help()}. Method parameters (study key `params`): "
            f"{', '.join(CertifyOptions.names())}.")


@main.command("ablate", epilog=_registries())
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--out", type=OUTPUT_DIR, default=None,
              help="Output folder (default: the study's `out`, else the study file's name without .yaml).")
@field_option(RunSettings, "overwrite")
@field_option(RunSettings, "progress")
def ablate_command(study_file: Path, out: Path | None, overwrite: bool, progress: bool) -> None:
    """Run a grid over bound methods, eps, norms and checkpoints (and KDIGA iga weights).

    Writes one tidy CSV row per cell (OUT/cells.csv: model, method, kind, norm, eps,
    certified accuracy, mean radius, seconds) and figures; rerunning skips finished
    cells and resumes an interrupted one. After an edit of the study, cells computed
    under the old settings are refused (one line, exit 2) unless --overwrite. A study
    key or value that is not known: exit 2 with one line naming it. See
    examples/study.yaml for the file format.
    """
    from certkd.commands.ablate import format_cells, read_cells, run_study
    from certkd.study import load_study

    cells = run_study(load_study(study_file), out, overwrite=overwrite, progress=progress)
    click.echo(format_cells(read_cells(cells), cells))
