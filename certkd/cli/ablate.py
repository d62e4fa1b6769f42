"""``certkd ablate STUDY.yaml``: bound-method ablation grids."""

from __future__ import annotations

from pathlib import Path

import click

from certkd.cli import main


@main.command("ablate")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: the study's `out`, else the study file's name without .yaml).")
def ablate_command(study_file: Path, out: Path | None) -> None:
    """Run a grid over bound methods, eps, norms and checkpoints (and KDIGA iga weights).

    \b
    Methods: ibp, crown-ibp, crown, alpha-crown, lipschitz (certified), smoothing
    (certified for the smoothed classifier), clever and pgd (estimates).
    Writes one tidy CSV row per cell (OUT/cells.csv: model, method, kind, norm, eps,
    certified accuracy, mean radius, seconds) and figures; rerunning skips finished
    cells and resumes an interrupted one. A study key or value that is not known:
    exit 2 with one line naming it. See certkd/study.py for the file format.
    """
    from certkd.ablate import read_cells, run_study
    from certkd.study import load_study

    study = load_study(study_file)
    cells = run_study(study, out)
    rows = read_cells(cells)
    click.echo(f"certkd ablate: {len(rows)} cells in {cells}")
    for r in rows:
        click.echo(f"  {r['model']:>14s}  L{r['norm']:<3s} {r['method']:>11s} ({r['kind']:9s}) eps {r['eps']:<8.4g}"
                   f" accuracy {100 * r['certified_accuracy']:5.1f}%  mean radius {r['mean_radius']:.4g}")
