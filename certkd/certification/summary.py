"""Summaries of certify records: accuracies, radius statistics, the gate against the run's attack, the text table.

``summarize`` depends on the records only (and the job that produced them), so a
single run, a resumed run and merged shards give the same summary.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from typing import Any

import torch

from bounds.errors import ContradictionError
from certkd.certification.methods import CERTIFIED, ESTIMATE, LEGEND, MODEL, PGD, get_method
from certkd.certification.records import CertifyJob, canonical_order
from certkd.runs import Record


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"mean": float(t.mean()), "median": float(q[1]), "q1": float(q[0]), "q3": float(q[2]),
            "min": float(t.min()), "max": float(t.max())}




def check_against_attack(records: Iterable[Record]) -> int:
    """The gate between a run's certificates and its own attack: how many certified (point, eps) pairs PGD checked.

    A pair is claimed when a certified method (of the model, not a smoothed classifier) says robust at
    eps or gave a radius >= eps; if the run's PGD found an adversarial example there, the method is
    refused for this model (``ContradictionError``: nothing is summarized, the CLI exits 3).
    """
    recs = list(records)
    attack = {(int(r["index"]), float(r["eps"])): bool(r["robust"]) for r in recs if r["method"] == PGD}
    checked = 0
    broken: dict[str, int] = {}
    for r in recs:
        key = (int(r["index"]), float(r["eps"]))
        if not (r["certified"] and r["target"] == MODEL) or key not in attack:
            continue
        radius = r.get("radius")
        if bool(r["robust"]) or (radius is not None and float(radius) >= key[1] > 0):
            checked += 1
            if not attack[key]:
                broken[r["method"]] = broken.get(r["method"], 0) + 1
    if broken:
        what = ", ".join(f"{m} ({n})" for m, n in sorted(broken.items()))
        raise ContradictionError(
            f"refused for this model: {what} certified (point, eps) pairs where this run's PGD found an "
            f"adversarial example ({sum(broken.values())} of {checked} checked), so their bounds do not hold "
            f"here; nothing is reported as certified (use the smoothing or clever methods for this model)")
    return checked


def summarize(config: dict[str, Any], records: Iterable[Record]) -> dict[str, Any]:
    """Accuracies per (method, eps), radius statistics and the gate against the run's own attack, from records.

    Every figure carries its ``kind``. ``soundness`` counts the certified-for-the-model
    (point, eps) pairs the run's own PGD checked; a single one it broke refuses the run
    (``check_against_attack``, theory.md §2).

    Parameters
    ----------
    config : dict
        The run's configuration (a ``CertifyJob.to_config()``, plus where the points came from).
    records : iterable of dict
        Its records (any order; duplicates keep the first).

    Returns
    -------
    dict
        ``config``, ``num_examples``, ``clean_accuracy``, ``results`` (per method and eps),
        ``radius`` (quantiles per method), ``soundness``, ``legend``.

    Example
    -------
    >>> from certkd.certification.records import CertifyJob
    >>> job = CertifyJob(methods=["crown"], eps=[0.1])
    >>> rec = {"index": 0, "label": 1, "pred": 1, "method": "crown", "eps": 0.1, "robust": True,
    ...        "certified": True, "target": "model"}
    >>> summarize({"num_examples": 1, **job.to_config()}, [rec])["results"][1]["accuracy"]
    1.0
    """
    job = CertifyJob.from_config(config)
    recs = canonical_order(records, job)
    labels: dict[int, tuple[int, int]] = {}
    for r in recs:
        labels.setdefault(int(r["index"]), (int(r["label"]), int(r["pred"])))
    n = len(labels)
    clean = sum(label == pred for label, pred in labels.values()) / n if n else None
    by_cell: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in recs:
        by_cell.setdefault((r["method"], float(r["eps"])), []).append(r)
    results = []
    for m in job.all_methods():
        method = get_method(m)
        for e in job.eps:
            cell = by_cell.get((m, float(e)), [])
            robust = sum(bool(r["robust"]) for r in cell)
            results.append({"method": m, "kind": method.kind, "target": method.target, "eps": float(e),
                            "robust": robust, "n": len(cell),
                            "accuracy": robust / len(cell) if cell else None})
    radii = []
    if job.radius:
        for m in (m for m in job.methods if m != PGD):
            method = get_method(m)
            first: dict[int, Record] = {}
            for r in recs:
                if r["method"] == m:
                    first.setdefault(int(r["index"]), r)
            values = [float(r["radius"]) for r in first.values() if r.get("radius") is not None]
            uppers = [float(r["radius_upper"]) for r in first.values() if r.get("radius_upper") is not None]
            entry = {"method": m, "kind": method.kind, "target": method.target, "norm": job.norm,
                     "n": len(values), **(_quantiles(values) if values else {})}
            if uppers:
                entry["upper"] = {"kind": ESTIMATE, "n": len(uppers), **_quantiles(uppers)}
            radii.append(entry)
    checked = check_against_attack(recs)
    return {
        "config": config,
        "num_examples": n,
        "clean_accuracy": {"accuracy": clean, "kind": CERTIFIED,
                           "note": "exact on the evaluated points (certified accuracy at eps = 0)"},
        "results": results,
        "radius": radii,
        "soundness": {"certified_checked_by_pgd": checked, "kind": ESTIMATE},
        "legend": LEGEND,
    }


def eps_label(eps: float) -> str:
    """``%g`` when that is exact (0.1), else ``k/255`` for multiples of 1/255 (2/255), else ``%g``.

    Parameters
    ----------
    eps : float
        A radius.

    Returns
    -------
    str
        Its label in tables.

    Example
    -------
    >>> eps_label(0.1), eps_label(2 / 255)
    ('0.1', '2/255')
    """
    short = f"{eps:.6g}"
    k = eps * 255
    if float(short) != eps and eps > 0 and abs(k - round(k)) < 1e-9 * max(1.0, k):
        return f"{round(k)}/255"
    return short


def _kind_label(kind: str, target: str) -> str:
    return kind if target == MODEL else f"{kind} ({target})"


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The plain-text table ``certkd certify`` prints; every figure with its kind.

    Parameters
    ----------
    summary : dict
        From :func:`summarize`.

    Returns
    -------
    str
        Clean accuracy, PGD and method accuracies per eps, radius quantiles, the soundness
        check and the legend.
    """
    cfg = summary["config"]
    job = CertifyJob.from_config(cfg)
    ball = "L-inf" if job.norm == "inf" else "L2"
    shard = f", shard {cfg['shard'][0]}/{cfg['shard'][1]}" if cfg.get("shard") else ""
    lines = [f"{cfg.get('model', 'model')} on {cfg.get('dataset', '?')} ({cfg.get('split', '?')}), "
             f"{summary['num_examples']} examples{shard}, {ball} ball within [0, 1]"]
    head = f"{'':<24}{'kind':<40}" + "".join(f"{'eps=' + eps_label(e):>12}" for e in job.eps)
    lines += ["", head]
    clean = summary["clean_accuracy"]
    lines.append(f"{'clean accuracy':<24}{'certified (exact, eps = 0)':<40}{_cell(clean['accuracy'], 12, 3)}")
    for m in job.all_methods():
        cells = {r["eps"]: r for r in summary["results"] if r["method"] == m}
        method = get_method(m)
        if m == PGD:
            name = f"pgd-{job.params.pgd_steps} accuracy"
            kind = "estimate: empirical upper bound"
        else:
            name, kind = f"{m} accuracy", _kind_label(method.kind, method.target)
        values = "".join(_cell(cells.get(float(e), {}).get("accuracy"), 12, 3) for e in job.eps)
        lines.append(f"{name:<24}{kind:<40}{values}")
    if summary["radius"]:
        lines += ["", f"{'radius (' + ball + ')':<24}{'kind':<40}" + "".join(
            f"{c:>10}" for c in ("mean", "median", "q1", "q3"))]
        for r in summary["radius"]:
            rows = [(r["method"], _kind_label(r["kind"], r["target"]), r)]
            if "upper" in r:
                rows.append((f"{r['method']} upper end", "estimate: attack", r["upper"]))
            for name, kind, stats in rows:
                values = "".join(_cell(stats.get(c), 10, 4) for c in ("mean", "median", "q1", "q3"))
                lines.append(f"{name:<24}{kind:<40}{values}")
    check = summary["soundness"]
    if check["certified_checked_by_pgd"]:
        lines += ["", f"evidence gate: {check['certified_checked_by_pgd']} certified (point, eps) pairs checked "
                      "against this run's PGD, none broken (one would refuse the method)"]
    lines += ["", textwrap.fill("legend: " + LEGEND, width=100, subsequent_indent="  ")]
    return "\n".join(lines)

