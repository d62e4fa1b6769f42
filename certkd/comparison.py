"""``certkd compare``: does the student certify at least as robustly as its teacher? (theory.md §6)

Data flow: two checkpoints and the same points -> each model's certify context
(``prepare_methods``: its verification engine built ONCE per run) -> per batch, both
models' radii by the same method and the same random stream as ``certkd certify
--radius`` would use (records in the run's log, ``certkd.runs``; shards merge) ->
``bounds.paired.paired_comparison`` (fraction, certified-accuracy curves with
bootstrap CIs, Wilcoxon, verdict) -> ``compare.json`` and figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from certkd.certification.methods import MODEL, CertifyOptions, Context, evaluate_batch, get_method
from certkd.runs import (
    SLURM,
    TORCHRUN,
    Points,
    Record,
    RecordLog,
    Shard,
    batches,
    execute,
    gather_shards,
    merge_logs,
    resolve_shard,
    seed_stream,
    shard_path,
    write_log,
)

COMMAND = "compare"
PER_EXAMPLE = "per_example.jsonl"


@dataclass
class CompareJob:
    """What decides a compare run: the radius method and its options, points per batch, seed, and the rule."""

    method: str = "crown"
    norm: str = "inf"
    params: dict[str, Any] = field(default_factory=dict)  # fields of CertifyOptions
    batch_size: int = 32
    seed: int = 0
    eps: list[float] | None = None  # grid of the accuracy curves (None: 11 points up to the largest radius)
    margin: float = 0.02
    alpha: float = 0.05
    fraction_threshold: float = 0.9
    n_boot: int = 2000
    shard: Shard | None = None

    def options(self) -> CertifyOptions:
        """The radius method's options."""
        return CertifyOptions.from_dict(self.params)

    def check(self) -> None:
        """One sentence for a bad value (method, options, rule)."""
        from bounds.paired import check_rule
        from certkd.certification.methods import check_norm

        get_method(self.method)
        self.norm = check_norm(self.norm)
        self.options().check()
        check_rule(self.options().radius_tol, self.margin, self.alpha, self.fraction_threshold, self.n_boot)

    def kind(self) -> str:
        """What the verdict is: ``certified``, ``estimate``, or certified for the smoothed classifier."""
        m = get_method(self.method)
        return m.kind if m.target == MODEL else f"{m.kind} for the {m.target}"

    def to_config(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard"] = list(self.shard) if self.shard else None
        return d


def record_key(record: Record) -> tuple[int]:
    """The done-key of a compare record: ``(index,)``.

    Example
    -------
    >>> record_key({"index": 4, "radius_student": 0.1})
    (4,)
    """
    return (int(record["index"]),)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def compare_points(student: Context, teacher: Context, data: Points, indices: Sequence[int], job: CompareJob,
                   log: RecordLog, progress: bool = False) -> list[Record]:
    """Both models' radii on the missing batches of this shard into ``log``; returns the new records.

    Each model's batch uses ``seed_stream(seed, batch, method)``, the stream of ``certkd
    certify --radius`` with the same seed and batch size: the radii are those two certify runs give.

    Parameters
    ----------
    student, teacher : Context
        Each model's certify context (``prepare_methods``), built once per run.
    data : Points
        Read through ``data.batch(indices)`` only.
    indices : sequence of int
        The evaluated points.
    job : CompareJob
        Method, batch size, seed, shard.
    log : RecordLog
        Receives one record per point.
    progress : bool
        Progress bar.

    Returns
    -------
    list of dict
        ``index, label, radius_student, radius_teacher, correct_student, correct_teacher``.
    """
    method = get_method(job.method)
    work = [(b, idx) for b, idx in batches(indices, job.batch_size, job.shard) if log.missing((i,) for i in idx)]

    def compute(item: tuple[int, list[int]]) -> list[Record]:
        b, idx = item
        x, y = data.batch(idx)
        outs = [evaluate_batch(ctx, method, x, y, [], True, seed_stream(job.seed, b, method.name, device=ctx.device))
                for ctx in (student, teacher)]
        (ps, os_), (pt, ot) = outs
        assert os_.radius is not None and ot.radius is not None
        return [{"index": i, "label": int(y[r]), "radius_student": _json_float(float(os_.radius[r])),
                 "radius_teacher": _json_float(float(ot.radius[r])), "correct_student": bool(ps[r] == y[r]),
                 "correct_teacher": bool(pt[r] == y[r])} for r, i in enumerate(idx)]

    return execute(work, compute, log, progress, "compare", label=lambda w: f"batch {w[0]}")


def summarize_compare(config: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """The verdict of ``bounds.paired.paired_comparison`` on the records, with its table and rule (theory.md §6).

    Parameters
    ----------
    config : dict
        The run's configuration (``CompareJob.to_config()`` and where the points came from).
    records : list of dict
        One per point.

    Returns
    -------
    dict
        ``question, verdict, reason, kind, n, at_least_fraction, wilcoxon,
        median_radius_difference, table, rule, config, radius_student, radius_teacher``.

    Example
    -------
    >>> rows = [{"index": i, "radius_student": 0.1, "radius_teacher": 0.1, "correct_student": True,
    ...          "correct_teacher": True} for i in range(5)]
    >>> summarize_compare({"method": "crown", "n_boot": 50}, rows)["verdict"]
    'yes'
    """
    from bounds.paired import QUESTION, paired_comparison

    job = _job_of(config)
    records = sorted({int(r["index"]): r for r in records}.values(), key=lambda r: r["index"])

    def column(name: str) -> torch.Tensor:
        return torch.tensor([math.inf if r[name] is None else r[name] for r in records], dtype=torch.float64)

    rs, rt = column("radius_student"), column("radius_teacher")
    eps = job.eps
    if eps is None:
        both = torch.cat([rs, rt])
        finite = both[torch.isfinite(both)]
        top = float(finite.max()) if len(finite) and float(finite.max()) > 0 else 1.0
        eps = torch.linspace(0, top, 11).tolist()
    cs = torch.tensor([r["correct_student"] for r in records])
    ct = torch.tensor([r["correct_teacher"] for r in records])
    tol = job.options().radius_tol
    result = paired_comparison(rs, rt, eps, cs, ct, tol=tol, margin=job.margin, alpha=job.alpha,
                               fraction_threshold=job.fraction_threshold, n_boot=job.n_boot, seed=job.seed)
    return {
        "question": QUESTION, "verdict": result.verdict, "reason": result.reason, "kind": job.kind(),
        "n": len(records), "at_least_fraction": result.at_least_fraction,
        "wilcoxon": {"statistic": result.wilcoxon_statistic, "p_less": result.wilcoxon_p_less,
                     "p_greater": result.wilcoxon_p_greater, "p_two_sided": result.wilcoxon_p_two_sided},
        "median_radius_difference": result.median_difference,
        "table": [{"eps": e, "accuracy_student": a, "accuracy_teacher": b, "difference": d, "ci_low": lo,
                   "ci_high": hi} for e, a, b, d, lo, hi in zip(
            result.eps.tolist(), result.accuracy_student.tolist(), result.accuracy_teacher.tolist(),
            result.difference.tolist(), result.ci_low.tolist(), result.ci_high.tolist(), strict=True)],
        "rule": {"tol": result.tol, "margin": result.margin, "alpha": result.alpha,
                 "fraction_threshold": result.fraction_threshold, "n_boot": job.n_boot},
        "config": config,
        "radius_student": rs.tolist(), "radius_teacher": rt.tolist(),
    }


def _job_of(config: dict[str, Any]) -> CompareJob:
    names = set(CompareJob.__dataclass_fields__)
    values = {k: v for k, v in config.items() if k in names}
    shard = values.pop("shard", None)
    return CompareJob(**values, shard=(int(shard[0]), int(shard[1])) if shard else None)


def format_compare(summary: dict[str, Any]) -> str:
    """The text ``certkd compare`` prints: the verdict, its reason, the statistics and the table.

    Parameters
    ----------
    summary : dict
        From :func:`summarize_compare`.

    Returns
    -------
    str
        Its first line is the question and the verdict.
    """
    w = summary["wilcoxon"]
    lines = [f"{summary['question']}: {summary['verdict'].upper()} ({summary['kind']}: "
             f"{summary['config']['method']} radii, {summary['n']} points)",
             f"  because {summary['reason']}",
             f"  r_S >= r_T - tol on {summary['at_least_fraction']:.1%}; median r_S - r_T "
             f"{summary['median_radius_difference']:.4g}; Wilcoxon p: student smaller {w['p_less']:.3g}, "
             f"larger {w['p_greater']:.3g}",
             f"  {'eps':>10}{'teacher':>10}{'student':>10}{'S - T':>10}   CI of S - T"]
    for row in summary["table"]:
        lines.append(f"  {row['eps']:>10.4g}{row['accuracy_teacher']:>10.3f}{row['accuracy_student']:>10.3f}"
                     f"{row['difference']:>10.3f}   [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    return "\n".join(lines)


def write_compare_outputs(out: Path, summary: dict[str, Any]) -> None:
    """``compare.json`` (without the radius columns, which live in the records) and the two figures.

    Parameters
    ----------
    out : Path
        The output directory.
    summary : dict
        From :func:`summarize_compare`.
    """
    from certkd.io import atomic_write_json
    from certkd.plots import plot_certified_accuracy, plot_radius_scatter

    norm, kind = summary["config"]["norm"], summary["kind"]
    table = summary["table"]
    atomic_write_json(out / "compare.json", {k: v for k, v in summary.items()
                                             if k not in ("radius_student", "radius_teacher")})
    plot_certified_accuracy([r["eps"] for r in table], [r["accuracy_student"] for r in table],
                            [r["accuracy_teacher"] for r in table], out / "certified_accuracy.png", kind=kind,
                            ci_low=[r["ci_low"] for r in table], ci_high=[r["ci_high"] for r in table], norm=norm)
    plot_radius_scatter(summary["radius_student"], summary["radius_teacher"], out / "radius_scatter.png",
                        kind=kind, norm=norm)


def merge_compare(parts: Sequence[tuple[str, Record | None, list[Record]]], out: Path,
                  per_example: Path | None = None) -> dict[str, Any]:
    """Merge compare shards into the verdict of the whole run, written into ``out`` (a directory).

    Parameters
    ----------
    parts : sequence of (str, dict or None, list of dict)
        Each shard's file name, header and records.
    out : Path
        Receives ``per_example.jsonl`` (unless ``per_example`` names another file),
        ``compare.json`` and the figures.
    per_example : Path, optional
        Where to write the merged records.

    Returns
    -------
    dict
        The summary, equal to that of one unsharded run.
    """
    def expected(config: Any) -> set[Any]:
        job = _job_of(config)
        return {(i,) for _, idx in batches(range(int(config["num_examples"])), job.batch_size, job.shard)
                for i in idx}

    _, config, records = merge_logs(parts, expected, record_key, "certkd compare ... --resume")
    records = sorted(records, key=lambda r: int(r["index"]))
    write_log(per_example or out / PER_EXAMPLE, COMMAND, config, records)
    summary = summarize_compare(config, records)
    write_compare_outputs(out, summary)
    return summary


def run_compare(student_path: Path, teacher_path: Path, job: CompareJob, shard: Shard | str | None = None,
                dataset: str | None = None, split: str = "test", data_dir: Path | None = None,
                num_examples: int | None = None, device: str = "cpu", out: Path | None = None,
                resume: bool = False, overwrite: bool = False, progress: bool = True,
                max_memory: int | None = None, notify: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """``certkd compare``: both models' radii on the same points and the paired verdict.

    Parameters
    ----------
    student_path, teacher_path : Path
        Checkpoints that fit each other.
    job : CompareJob
        Radius method and options, batch size, seed, verdict rule (its ``shard`` is set here).
    shard : (k, n), "auto" or None
        As for ``certkd certify``; a shard's run writes records only (``certkd merge`` gives the verdict),
        except under torchrun, where rank 0 gathers and decides.
    dataset, split, data_dir, num_examples
        The points (default: the student's dataset, all of ``split``).
    device : str
        Where the models run.
    out : Path, optional
        Directory for ``per_example.jsonl`` (appended as computed), ``compare.json`` and figures.
    resume, overwrite : bool
        Continue the run in ``out`` (same configuration only) or discard it.
    progress : bool
        Progress on stderr (a bar on a terminal, one line per stage otherwise).
    max_memory, notify
        Memory per bound pass and where its plan is reported (``certification.run.plan_bound_memory``).

    Returns
    -------
    dict or None
        The summary; None for a shard that is not the whole run.
    """
    from certkd.certification.methods import prepare_methods
    from certkd.certification.run import BOUND_METHODS_BY_COST, load_pair, load_points, plan_bound_memory
    from certkd.checkpoint import file_sha256
    from certkd.errors import CertkdError

    job.shard, launcher = resolve_shard(shard)
    job.check()
    if out is not None and out.exists() and not out.is_dir():
        raise CertkdError(f"{out} is a file; --out takes a directory")
    if resume and out is None:
        raise CertkdError("--resume needs --out DIR (the directory of the interrupted run)")
    if job.shard is not None and out is None:
        raise CertkdError("--shard needs --out DIR (certkd merge combines the shards' records)")
    if launcher == SLURM:
        out = shard_path(out, job.shard)
    student_ckpt, _, student, teacher = load_pair(student_path, teacher_path, device)
    data_name, data, count = load_points(student_ckpt, dataset, split, data_dir, num_examples)
    contexts = [prepare_methods(m, student_ckpt.input_shape, [job.method], job.norm, job.options(), device)
                for m in (student, teacher)]
    config = {"student_sha256": file_sha256(student_path), "teacher_sha256": file_sha256(teacher_path),
              "dataset": data_name, "split": split, "num_examples": count, **job.to_config()}
    path = out / PER_EXAMPLE if out is not None else None
    if launcher == TORCHRUN:
        path = shard_path(path, job.shard)
    with RecordLog.open(path, COMMAND, config, record_key, resume=resume, overwrite=overwrite) as log:
        plans = plan_bound_memory([c.bound_engine() for c in contexts], data, count, job.method, None, job.norm,
                                  job.batch_size, max_memory, notify) if job.method in BOUND_METHODS_BY_COST else []
        compare_points(contexts[0], contexts[1], data, range(count), job, log, progress)
    records = log.records
    if launcher == TORCHRUN:
        parts = gather_shards(COMMAND, config, records, job.shard)
        if parts is None:
            return None
        assert out is not None
        return merge_compare(parts, out)
    if job.shard is not None:
        return None
    summary = summarize_compare(config, records)
    summary["provenance"] = {"student": str(student_path), "teacher": str(teacher_path),
                             "memory_plan": dict(zip(("student", "teacher"), plans, strict=True)) if plans else None}
    if out is not None:
        write_compare_outputs(out, summary)
    return summary
