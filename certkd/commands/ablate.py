"""``certkd ablate``: a resumable grid of bound methods x eps x norms x checkpoints.

Data flow: the study's checkpoints (and KDIGA students trained here) x norms x methods;
each (model, norm, method) is one certify run on ``certkd.runs`` with its record log
under ``records/`` (resumed when its configuration is unchanged; after an edit of the
study, refused with one sentence unless ``overwrite``). ``cells.csv`` (one tidy row per
cell: model, method, norm, eps, certified accuracy, mean radius, time, kind) is rebuilt
from the records on every run, so it never shows results of another configuration;
``timings.json`` keeps each run's compute time. Then figures.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from certkd.certification import PGD, CertifyJob, CertifyOptions, prepare_methods
from certkd.checkpoint import load_checkpoint
from certkd.commands.certify import CERTIFY, certify_run, checkpoint_sources
from certkd.data import load_dataset
from certkd.io import atomic_write_text
from certkd.loading import check_fits
from certkd.run import Run, RunSettings
from certkd.study import Study
from certkd.train import ObjectiveParams as TrainParams
from certkd.train import TrainConfig, train

COLUMNS = ["study", "model", "checkpoint", "iga_weight", "method", "kind", "target", "norm", "eps", "n",
           "certified_accuracy", "mean_radius", "median_radius", "seconds"]


def study_models(study: Study, out: Path, progress: bool = False) -> list[tuple[str, Path, float | None]]:
    """``(label, checkpoint, iga_weight)`` for the study's checkpoints and its KDIGA sweep (trained here).

    Parameters
    ----------
    study : Study
        The parsed study.
    out : Path
        The study's folder (students go to ``out/students``; training resumes).
    progress : bool
        Progress bars.

    Returns
    -------
    list of (str, Path, float or None)
        One entry per model of the grid.
    """
    models: list[tuple[str, Path, float | None]] = [(p.stem, p, None) for p in study.checkpoints]
    sweep = study.kdiga
    if sweep is not None:
        train_opts = dict(sweep.train)
        method_keys = set(TrainParams.__dataclass_fields__)
        params = TrainParams(**{k: v for k, v in train_opts.items() if k in method_keys})
        config_opts = {k: v for k, v in train_opts.items() if k not in method_keys}
        for w in sweep.iga_weights:
            path = train(TrainConfig(method="kdiga", arch=sweep.arch, arch_kwargs=sweep.arch_kwargs,
                                     teacher=sweep.teacher, out=out / "students" / f"kdiga_w{w:g}.pt",
                                     seed=study.seed, resume=True, progress=progress,
                                     params=replace(params, iga_weight=w), **config_opts))
            models.append((f"kdiga_w{w:g}", path, w))
    return models


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The rows of ``cells.csv`` (numbers as floats); empty when it does not exist.

    Example
    -------
    >>> read_cells(Path("no/such/cells.csv"))
    []
    """
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for key in ("eps", "certified_accuracy", "mean_radius", "median_radius", "seconds"):
            r[key] = float(r[key]) if r[key] not in ("", None) else float("nan")
        r["n"] = int(r["n"])
    return rows


def _cell_rows(study: Study, label: str, path: Path, weight: float | None, method: str, norm: str,
               summary: dict[str, Any], seconds: float) -> list[dict[str, Any]]:
    radius: dict[str, Any] = next((r for r in summary["radius"] if r["method"] == method), {})
    return [{"study": study.name, "model": label, "checkpoint": str(path),
             "iga_weight": "" if weight is None else weight, "method": method, "kind": cell["kind"],
             "target": cell["target"], "norm": norm, "eps": cell["eps"], "n": cell["n"],
             "certified_accuracy": cell["accuracy"], "mean_radius": radius.get("mean", ""),
             "median_radius": radius.get("median", ""), "seconds": round(seconds, 3)}
            for cell in summary["results"] if cell["method"] == method]


def run_study(study: Study, out: Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run every missing cell of ``study``; returns the path of ``cells.csv``.

    Parameters
    ----------
    study : Study
        From ``certkd.study.load_study``.
    out : Path, optional
        The output folder (default: the study's ``out``, else the study file without .yaml).
    overwrite : bool
        Recompute cells whose records were written under another configuration (an edited
        study); without it such cells are refused with one sentence.
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    Path
        ``cells.csv``, rebuilt from the records of exactly this study's cells.
    """
    out = Path(out or study.out or study.path.with_suffix(""))
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    options = CertifyOptions.from_dict(dict(study.params))
    data_cache: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for label, path, weight in study_models(study, out, progress):
        ckpt = load_checkpoint(path)
        dataset = study.dataset or ckpt.dataset
        if dataset not in data_cache:
            data_cache[dataset] = load_dataset(dataset, study.split, study.data_dir)
        data = data_cache[dataset]
        check_fits(ckpt.input_shape, ckpt.num_classes, data, f"dataset {dataset!r}")
        n = min(study.num_examples, len(data))
        model = ckpt.build_model(study.device)
        for norm in study.norms:
            for method in study.methods:
                job = CertifyJob(methods=[method], eps=list(study.eps), norm=norm, radius=method != PGD,
                                 batch_size=study.batch_size, seed=study.seed,
                                 params=replace(options, pgd_steps=options.pgd_steps if method == PGD else 0))
                ctx = prepare_methods(model, ckpt.input_shape, job.all_methods(), norm, job.params, study.device)
                run = Run.start(CERTIFY, RunSettings(resume=True, overwrite=overwrite, progress=progress),
                                out / "records" / f"{label}_L{norm}_{method}.jsonl")
                t0 = time.perf_counter()
                new = certify_run(run, ctx, data, job, checkpoint_sources(path, ckpt, dataset, study.split, n))
                key, seconds = run.config_sha256, time.perf_counter() - t0
                timings[key] = timings.get(key, 0.0) + seconds if new else timings.get(key, seconds)
                rows += _cell_rows(study, label, path, weight, method, norm, run.summarize()[0], timings[key])
    atomic_write_text(timings_path, json.dumps(timings, indent=1) + "\n")
    cells_path = out / "cells.csv"
    _write_csv(cells_path, rows)
    write_figures(rows, out)
    return cells_path


def format_cells(rows: list[dict[str, Any]], path: Path) -> str:
    """The text ``certkd ablate`` prints: one line per cell.

    Parameters
    ----------
    rows : list of dict
        From :func:`read_cells`.
    path : Path
        The ``cells.csv`` they came from.

    Returns
    -------
    str
        A title line, then model, norm, method, kind, eps, accuracy and mean radius per cell.

    Example
    -------
    >>> row = {"model": "t", "norm": "inf", "method": "crown", "kind": "certified", "eps": 0.01,
    ...        "certified_accuracy": 0.5, "mean_radius": 0.02}
    >>> print(format_cells([row], Path("cells.csv")))  # doctest: +NORMALIZE_WHITESPACE
    certkd ablate: 1 cells in cells.csv
                   t  Linf       crown (certified) eps 0.01     accuracy  50.0%  mean radius 0.02
    """
    lines = [f"certkd ablate: {len(rows)} cells in {path}"]
    lines += [f"  {r['model']:>14s}  L{r['norm']:<3s} {r['method']:>11s} ({r['kind']:9s}) eps {r['eps']:<8.4g}"
              f" accuracy {100 * r['certified_accuracy']:5.1f}%  mean radius {r['mean_radius']:.4g}" for r in rows]
    return "\n".join(lines)


def write_figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy against eps per (model, norm), one line per method (certified solid, estimates dashed, each
    labelled by its own method); with a KDIGA sweep, accuracy against ``iga_weight`` per norm.

    Parameters
    ----------
    rows : list of dict
        The study's cells.
    out : Path
        The study's folder (figures go to ``out/figures``).

    Returns
    -------
    list of Path
        The PNG files.
    """
    from certkd.plots import eps_axis_label
    from certkd.report import Curve, plot_accuracy_curves, plot_iga_sweep

    paths = []
    for norm in sorted({r["norm"] for r in rows}):
        for model in sorted({r["model"] for r in rows}):
            sel = [r for r in rows if r["norm"] == norm and r["model"] == model]
            curves: list[Curve] = []
            for method in dict.fromkeys(r["method"] for r in sel):
                cells = sorted((r for r in sel if r["method"] == method), key=lambda r: r["eps"])
                kind, target = cells[0]["kind"], cells[0]["target"]
                label = f"{method} ({kind}{'' if target == 'model' else ', ' + target})"
                curves.append(Curve(label, [c["eps"] for c in cells], [c["certified_accuracy"] for c in cells],
                                    method, estimate=kind != "certified"))
            n = max(r["n"] for r in sel)
            paths.append(plot_accuracy_curves(
                curves, out / "figures" / f"{model}_L{norm}.png",
                f"{model}: accuracy per method, L-{norm}, n = {n} points", "accuracy at eps "
                "(certified solid, estimates dashed)", eps_axis_label(norm)))
        swept = [r for r in rows if r["norm"] == norm and r.get("iga_weight") not in ("", None)]
        if len({r["iga_weight"] for r in swept}) > 1:
            n = max(r["n"] for r in swept)
            paths.append(plot_iga_sweep(swept, out / "figures" / f"iga_sweep_L{norm}.png",
                                        f"KDIGA students across the swept iga_weight, L-{norm}, n = {n} points", norm))
    atomic_write_text(out / "figures" / "README.md", "Figures of `certkd ablate`: accuracy against eps per model "
                      "and norm (solid: certified methods; dashed: estimates, each labelled by its method), and "
                      "with a KDIGA sweep `iga_sweep_L<norm>.png`: accuracy against the swept iga_weight.\n")
    return paths
