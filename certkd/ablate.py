"""``certkd ablate``: a resumable grid of bound methods x eps x norms x checkpoints.

Output in the study's folder: ``cells.csv`` (one tidy row per cell: model, method, norm,
eps, certified accuracy, mean radius, time, kind), per-example records per
(model, norm, method) under ``records/``, and figures. A (model, norm, method) whose
rows are in ``cells.csv`` is skipped on a rerun; an interrupted one resumes from
its records.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from certkd.certification import CertifyJob, MethodParams, run_certification, summarize
from certkd.checkpoint import load_checkpoint
from certkd.data import load_dataset
from certkd.io import JsonlAppender, atomic_write_text, read_jsonl
from certkd.study import Study
from certkd.train import MethodParams as TrainParams
from certkd.train import TrainConfig, train

COLUMNS = ["study", "model", "checkpoint", "iga_weight", "method", "kind", "target", "norm", "eps", "n",
           "certified_accuracy", "mean_radius", "median_radius", "seconds"]


def study_models(study: Study, out: Path, progress: bool = False) -> list[tuple[str, Path, float | None]]:
    """``(label, checkpoint, iga_weight)`` for the study's checkpoints and its KDIGA sweep (trained here)."""
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


def _append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    if new:
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "a", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The rows of ``cells.csv`` (numbers as floats); empty when it does not exist."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for key in ("eps", "certified_accuracy", "mean_radius", "median_radius", "seconds"):
            r[key] = float(r[key]) if r[key] not in ("", None) else float("nan")
        r["n"] = int(r["n"])
    return rows


def run_study(study: Study, out: Path | None = None, progress: bool = True) -> Path:
    """Run every missing cell of ``study``; returns the path of ``cells.csv``."""
    out = Path(out or study.out or study.path.with_suffix(""))
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.csv"
    done = {(r["model"], r["norm"], r["method"]) for r in read_cells(cells_path)}
    params = MethodParams.from_dict(dict(study.params))
    data_cache: dict[str, Any] = {}
    for label, path, weight in study_models(study, out, progress):
        ckpt = load_checkpoint(path)
        dataset = study.dataset or ckpt.dataset
        if dataset not in data_cache:
            data_cache[dataset] = load_dataset(dataset, study.split, study.data_dir)
        data = data_cache[dataset]
        n = min(study.num_examples, len(data))
        model = ckpt.build_model(study.device)
        for norm in study.norms:
            for method in study.methods:
                if (label, norm, method) in done:
                    continue
                job = CertifyJob(methods=[method], eps=list(study.eps), norm=norm, radius=method != "pgd",
                                 batch_size=study.batch_size, seed=study.seed,
                                 params=replace(params, pgd_steps=params.pgd_steps if method == "pgd" else 0))
                records_path = out / "records" / f"{label}_L{norm}_{method}.jsonl"
                previous = read_jsonl(records_path)
                t0 = time.perf_counter()
                with JsonlAppender(records_path) as log:
                    new = run_certification(model, data.x[:n], data.y[:n], list(range(n)), job,
                                            done=[(int(r["index"]), r["method"], float(r["eps"])) for r in previous],
                                            sink=log.write, device=study.device, progress=progress)
                seconds = time.perf_counter() - t0
                summary = summarize(job.to_config(), previous + new)
                radius = next((r for r in summary["radius"] if r["method"] == method), {})
                _append_csv(cells_path, [{
                    "study": study.name, "model": label, "checkpoint": str(path),
                    "iga_weight": "" if weight is None else weight, "method": method, "kind": cell["kind"],
                    "target": cell["target"], "norm": norm, "eps": cell["eps"], "n": cell["n"],
                    "certified_accuracy": cell["accuracy"], "mean_radius": radius.get("mean", ""),
                    "median_radius": radius.get("median", ""), "seconds": round(seconds, 3),
                } for cell in summary["results"] if cell["method"] == method])
    write_figures(read_cells(cells_path), out)
    return cells_path


def write_figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy against eps per (model, norm), one line per method; certified solid, estimates dashed."""
    from certkd.report import plot_accuracy_curves

    paths = []
    for norm in sorted({r["norm"] for r in rows}):
        for model in sorted({r["model"] for r in rows}):
            sel = [r for r in rows if r["norm"] == norm and r["model"] == model]
            solid, dashed = {}, {}
            for method in dict.fromkeys(r["method"] for r in sel):
                cells = sorted((r for r in sel if r["method"] == method), key=lambda r: r["eps"])
                target = solid if cells[0]["kind"] == "certified" else dashed
                label = method if cells[0]["target"] == "model" else f"{method} ({cells[0]['target']})"
                target[label] = ([c["eps"] for c in cells], [c["certified_accuracy"] for c in cells])
            paths.append(plot_accuracy_curves(
                solid, out / "figures" / f"{model}_L{norm}.png", "accuracy (certified solid, estimates dashed)",
                f"eps (L-{norm} radius)", dashed={k: v for k, v in dashed.items()}))
    atomic_write_text(out / "figures" / "README.md", "Figures of `certkd ablate`: accuracy against eps per model "
                      "and norm. Solid: certified methods; dashed: estimates (PGD, CLEVER).\n")
    return paths
