"""``certkd bounds``: the transfer bound of theory.md §3, term by term, per example and eps.

Data flow: two checkpoints and the points -> (with ``certified_gamma``) each model's
linearity bounder and bound engine, built once -> per (batch, eps) the terms of
``bounds.transfer.transfer_bound`` (and the margin-form ``transfer_certificate``) as
records in the run's log (``certkd.runs``) -> a summary per eps (means, quantiles,
how often each bound holds, certificate counts) -> ``summary.json`` and figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkd.data import Points
from certkd.io import float_text, json_float
from certkd.run import Command, Run, RunSettings
from certkd.runs import Record, RecordLog, Shard, batches, execute, seed_stream, shard_indices

COMMAND = "bounds"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
EXACT_TERMS = ("loss_student", "loss_teacher", "output_gap", "gradient_gap")
TERMS = (*EXACT_TERMS, "gamma_student", "gamma_teacher", "robust_teacher", "robust_student", "bound")
CERTIFIED_TERMS = ("gamma_student_certified", "gamma_teacher_certified", "robust_teacher_upper", "bound_certified")
KIND_OF_TERM = {name: "exact" if name in EXACT_TERMS else "certified" if name in CERTIFIED_TERMS else "estimate"
                for name in (*TERMS, *CERTIFIED_TERMS)}
LEGEND = ("exact: computed at x; estimate: PGD (may be too small); certified: bound propagation "
          "(never contradicted); slack = bound - student's PGD robust loss; null = not finite")


@dataclass
class BoundsJob:
    """What decides the records of a bounds run."""

    eps: list[float]
    norm: str = "inf"
    certified_gamma: bool = False
    method: str = "crown"
    steps: int = 40
    restarts: int = 2
    batch_size: int = 32
    seed: int = 0


def record_key(record: Record) -> tuple[int, float]:
    """The done-key of a bounds record: ``(index, eps)``.

    Example
    -------
    >>> record_key({"index": 2, "eps": 0.05, "bound": 1.0})
    (2, 0.05)
    """
    return int(record["index"]), float(record["eps"])


@dataclass
class TransferPair:
    """The student and the teacher of a bounds run on their ``device``, with what ``certified_gamma`` needs
    per model (linearity bounders and bound engines), built once per run."""

    student: nn.Module
    teacher: nn.Module
    device: str | torch.device = "cpu"
    bounders: tuple[Any, Any] | None = None
    engines: tuple[Any, Any] | None = None

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, input_shape: Sequence[int], job: BoundsJob,
              device: str | torch.device = "cpu") -> TransferPair:
        """Both models with their linearity bounders and bound engines (none without ``certified_gamma``)."""
        if not job.certified_gamma:
            return cls(student, teacher, device)
        from bounds.certify import BoundEngine
        from bounds.linearity import LinearityBounder

        shape = tuple(int(s) for s in input_shape)
        return cls(student, teacher, device, bounders=(LinearityBounder(student, shape, job.method, job.norm, device),
                             LinearityBounder(teacher, shape, job.method, job.norm, device)),
                   engines=(BoundEngine(student, shape, device=device), BoundEngine(teacher, shape, device=device)))


def batch_records(pair: TransferPair, x: torch.Tensor, y: torch.Tensor, idx: Sequence[int], eps: float,
                  job: BoundsJob, generator: torch.Generator) -> list[Record]:
    """Every term of the transfer bound (theory.md §3) for one batch at one eps, one record per example.

    Parameters
    ----------
    pair : TransferPair
        The two models, their bounders and engines (built once per run).
    x, y : torch.Tensor
        The batch.
    idx : sequence of int
        Its indices in the split.
    eps : float
        The radius.
    job : BoundsJob
        Norm, certified gammas, PGD steps.
    generator : torch.Generator
        The (batch, eps) random stream.

    Returns
    -------
    list of dict
        ``index, eps, label``, every term of ``TERMS`` (and ``CERTIFIED_TERMS``), ``holds`` flags.
    """
    from bounds.transfer import transfer_bound, transfer_certificate

    tb = transfer_bound(pair.student, pair.teacher, x, y, eps, job.norm, certified=job.certified_gamma,
                        method=job.method, steps=job.steps, restarts=job.restarts, generator=generator,
                        bounders=pair.bounders)
    columns: dict[str, torch.Tensor] = {name: getattr(tb, name) for name in TERMS}
    flags = {"holds": tb.check().holds}
    if job.certified_gamma:
        columns.update({name: getattr(tb, name) for name in CERTIFIED_TERMS})
        flags["holds_certified"] = tb.check(certified=True).holds
        cert = transfer_certificate(pair.student, pair.teacher, x, y, eps, job.norm, method=job.method,
                                    gamma_method=job.method, engines=pair.engines, bounders=pair.bounders)
        columns["student_margin_lower_transfer"] = cert.student_lower.amin(1)
        columns["student_margin_lower_direct"] = cert.student_direct_lower.amin(1)
        flags["certified_through_transfer"] = cert.through_transfer
        flags["certified_directly"] = cert.direct
    rows = []
    for r, i in enumerate(idx):
        row: Record = {"index": int(i), "eps": float(eps), "label": int(y[r])}
        row.update({name: json_float(float(t[r])) for name, t in columns.items()})
        row.update({name: bool(t[r]) for name, t in flags.items()})
        rows.append(row)
    return rows


def bounds_points(pair: TransferPair, data: Points, indices: Sequence[int], job: BoundsJob, log: RecordLog,
                  progress: bool = False, shard: Shard | None = None) -> list[Record]:
    """Run the missing (batch, eps) work into ``log``; returns the records appended now (``certkd.runs.execute``,
    with ``progress``).

    Parameters
    ----------
    pair : TransferPair
        From :meth:`TransferPair.build`.
    data, indices : Points, sequence of int
        The evaluated points, read only through ``data.batch(indices)``.
    job : BoundsJob
        eps, batch size, seed, ...
    shard : (k, n) or None
        The part of the batches this run computes.
    """
    work = [(b, idx, e_i, e) for b, idx in batches(indices, job.batch_size, shard) for e_i, e in enumerate(job.eps)
            if log.missing((i, float(e)) for i in idx)]

    def compute(item: tuple[int, list[int], int, float]) -> list[Record]:
        b, idx, e_i, e = item
        x, y = data.batch(idx)
        return batch_records(pair, x.to(pair.device), y.to(pair.device), idx, e, job,
                             seed_stream(job.seed, COMMAND, b, e_i))

    return execute(work, compute, log, progress, "bounds", label=lambda w: f"batch {w[0]}, eps {w[3]:g}")


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and quantiles of the finite values, and how many were not finite (unbounded).

    Example
    -------
    >>> s = stats([1.0, 2.0, 3.0, None])
    >>> s["n"], s["non_finite"], s["mean"], s["q50"]
    (4, 1, 2.0, 2.0)
    """
    finite = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    out: dict[str, Any] = {"n": len(values), "non_finite": len(values) - len(finite)}
    if len(finite):
        qs = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        out.update({"mean": float(finite.mean()),
                    **{f"q{int(q * 100)}": v for q, v in zip(QUANTILES, qs, strict=True)}})
    return out


def _certificate_counts(rows: list[Record]) -> dict[str, int]:
    t = [r["certified_through_transfer"] for r in rows]
    d = [r["certified_directly"] for r in rows]
    pairs = list(zip(t, d, strict=True))
    return {"both": sum(a and b for a, b in pairs), "transfer_only": sum(a and not b for a, b in pairs),
            "direct_only": sum(b and not a for a, b in pairs), "neither": sum(not a and not b for a, b in pairs)}


def summarize_bounds(config: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """Per eps: each term's mean and quantiles, how often each bound holds and its slack, certificate counts.

    Parameters
    ----------
    config : dict
        The run's configuration (``eps`` in order).
    records : list of dict
        From :func:`bounds_points`.

    Returns
    -------
    dict
        ``config``, ``per_eps`` (``terms`` with their kinds, ``bound_vs_measured``,
        ``certificate_counts``) and ``legend``.
    """
    per_eps = []
    for e in config["eps"]:
        rows = sorted((r for r in records if float(r["eps"]) == float(e)), key=lambda r: r["index"])
        if not rows:
            continue
        names = [n for n in (*TERMS, *CERTIFIED_TERMS) if n in rows[0]]
        entry: dict[str, Any] = {"eps": float(e), "n": len(rows),
                                 "terms": {n: {"kind": KIND_OF_TERM[n], **stats([r[n] for r in rows])}
                                           for n in names}}
        checks = {"estimate": ("bound", "holds")}
        if "bound_certified" in rows[0]:
            checks["certified"] = ("bound_certified", "holds_certified")
        entry["bound_vs_measured"] = {}
        for kind, (bound_name, flag) in checks.items():
            slack = [None if r[bound_name] is None else r[bound_name] - r["robust_student"] for r in rows]
            entry["bound_vs_measured"][kind] = {"holds_fraction": sum(r[flag] for r in rows) / len(rows),
                                                "slack": stats(slack)}
        if "certified_through_transfer" in rows[0]:
            entry["certificate_counts"] = _certificate_counts(rows)
        per_eps.append(entry)
    return {"config": config, "per_eps": per_eps, "legend": LEGEND}


def format_bounds(summary: dict[str, Any]) -> str:
    """The text ``certkd bounds`` prints."""
    lines = []
    for entry in summary["per_eps"]:
        lines.append(f"eps = {entry['eps']:g} ({summary['config']['norm']}), {entry['n']} examples")
        lines.append(f"  {'term':<26}{'kind':<11}{'mean':>10}{'q10':>10}{'median':>10}{'q90':>10}")
        for name, s in entry["terms"].items():
            lines.append(f"  {name:<26}{s['kind']:<11}{float_text(s.get('mean')):>10}{float_text(s.get('q10')):>10}"
                         f"{float_text(s.get('q50')):>10}{float_text(s.get('q90')):>10}")
        for kind, check in entry["bound_vs_measured"].items():
            lines.append(f"  bound ({kind}) >= measured student robust loss on {check['holds_fraction']:.1%}; "
                         f"median slack {float_text(check['slack'].get('q50'))}")
        if "certificate_counts" in entry:
            c = entry["certificate_counts"]
            lines.append(f"  student certified: through transfer and directly {c['both']}, transfer only "
                         f"{c['transfer_only']}, directly only {c['direct_only']}, neither {c['neither']}")
    return "\n".join(lines)


def write_bounds_outputs(out: Path, summary: dict[str, Any], records: list[Record]) -> None:
    """``summary.json`` and, per eps, the bound-versus-measured and terms figures."""
    from certkd.io import atomic_write_json
    from certkd.plots import eps_tag, model_names, plot_bound_vs_measured, plot_terms

    atomic_write_json(out / "summary.json", summary)
    cfg, names = summary["config"], " vs ".join(model_names(summary))
    for e in cfg["eps"]:
        rows = sorted((r for r in records if float(r["eps"]) == float(e)), key=lambda r: r["index"])
        if not rows:
            continue
        column = {name: [math.inf if r[name] is None else r[name] for r in rows]
                  for name in (*TERMS, *CERTIFIED_TERMS) if name in rows[0]}
        series = {"estimate (PGD gammas)": column["bound"]}
        if "bound_certified" in column:
            series["certified"] = column["bound_certified"]
        title = (f"transfer bound, {names} (theory.md §3)\nL-{cfg['norm']} eps {e:.4g}, n = {len(rows)}; "
                 f"gammas: PGD (estimate){', ' + cfg['method'].upper() + ' (certified)' if cfg['certified_gamma'] else ''}")
        plot_bound_vs_measured(series, column["robust_student"], out / f"bound_vs_measured_{eps_tag(e)}.png", title)
        terms: dict[str, list[float]] = {"output_gap": column["output_gap"],
                 "eps * gradient_gap": [e * g for g in column["gradient_gap"]],
                 **{n: column[n] for n in ("gamma_student", "gamma_teacher", "gamma_student_certified",
                                           "gamma_teacher_certified") if n in column}}
        plot_terms(terms, out / f"terms_{eps_tag(e)}.png", title.replace("transfer bound,", "transfer-bound terms,"))


BOUNDS = Command(COMMAND, record_key, lambda config: {(i, float(e)) for i in shard_indices(config) for e in config["eps"]},
                 lambda config, records: sorted(records, key=record_key), summarize_bounds, write_bounds_outputs,
                 format_bounds, in_folder=True)


def run_bounds(student_path: Path, teacher_path: Path, job: BoundsJob, settings: RunSettings) -> dict[str, Any] | None:
    """``certkd bounds``: the transfer-bound terms for STUDENT distilled from TEACHER; the summary.

    Parameters
    ----------
    student_path, teacher_path : Path
        Checkpoints that fit each other.
    job : BoundsJob
        eps, norm, certified gammas, PGD steps, batch size, seed.
    settings : RunSettings
        The points (default: the student's dataset), device, the folder of ``per_example.jsonl``,
        ``summary.json`` and figures (``out``), shard, ...; the memory plan sizes the bound passes of
        the certified gammas and margins.

    Returns
    -------
    dict or None
        The summary (``summarize_bounds``); None for a shard that is not the whole run.
    """
    from bounds.linearity import MARGIN
    from certkd.loading import load_pair

    run = Run.start(BOUNDS, settings)
    job.eps = list(dict.fromkeys(job.eps))
    student_ckpt, student, teacher, data, sources = load_pair(student_path, teacher_path, settings)
    pair = TransferPair.build(student, teacher, student_ckpt.input_shape, job, settings.device)
    run.configure(sources, asdict(job))
    count = int(sources["num_examples"])
    with run.open_log() as log:
        if pair.engines is not None and pair.bounders is not None:
            common = (data, count, job.method, max(job.eps), job.norm, job.batch_size)
            run.plan_memory(pair.engines, *common)
            run.plan_memory(pair.bounders, *common, target=MARGIN)
        bounds_points(pair, data, range(count), job, log, settings.progress, run.shard)
    return run.finish({"student": str(student_path), "teacher": str(teacher_path), "memory_plan": run.plans or None})
