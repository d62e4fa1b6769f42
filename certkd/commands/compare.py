"""``certkd compare``: does the student certify at least as robustly as its teacher? (theory.md §6)

Two parts on the same points (theory.md §6):

- **certified**: both models' radii by one radius method (the same random stream as
  ``certkd certify --radius`` would use, or read from its ``--per-example`` files);
- **empirical**: both models' attack radii (APGD by default; the smallest eps at which
  the attack finds an adversarial example, an upper bound of the true radius).

Data flow: two checkpoints and the same points -> each model's certify context
(``prepare_methods``: its verification engine built ONCE per run) -> per batch, both
parts' radii (records in the run's log, ``certkd.runs``; shards merge) ->
``bounds.paired.paired_comparison`` per part (fraction, accuracy curves with paired
bootstrap CIs, Wilcoxon, the part's verdict) -> ``certkd.verdict.headline`` (never more
favourable than either part; certificate looseness ``rho``; the eps range each part
covers) -> ``compare.json`` and figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bounds.errors import ContradictionError
from certkd.certification.methods import CERTIFIED, MODEL, CertifyOptions, Context, evaluate_batch, get_method
from certkd.data import Points
from certkd.io import float_text, json_float
from certkd.run import Command, Run, RunSettings
from certkd.runs import Record, RecordLog, Shard, batches, execute, seed_stream, shard_indices
from certkd.verdict import HEADLINE_RULE, PART_RULE, QUESTION, CompareRule, part_reason

COMMAND = "compare"
#: per-example columns of the records: certified radii, then attack radii (estimates)
RADIUS_COLUMNS = ("radius_student", "radius_teacher", "attack_student", "attack_teacher")


@dataclass
class CompareJob:
    """What decides a compare run: the radius method and its options, points per batch, seed, and the rule."""

    method: str = "crown"
    norm: str = "inf"
    params: dict[str, Any] = field(default_factory=dict)  # fields of CertifyOptions
    batch_size: int = 32
    seed: int = 0
    eps: list[float] | None = None  # grid of the curves (None: 11 points up to the 90th percentile of a_T)
    attack: str = "apgd"  # the attack of the empirical part: apgd or pgd
    rule: CompareRule = field(default_factory=CompareRule)
    student_records: str | None = None  # sha256 of a reused certify --per-example file (its radii)
    teacher_records: str | None = None
    shard: Shard | None = None

    def options(self) -> CertifyOptions:
        """The radius method's options."""
        return CertifyOptions.from_dict(self.params)

    def check(self) -> None:
        """One sentence for a bad value (method, options, rule)."""
        from bounds.attack import ATTACKS
        from certkd.certification.methods import check_norm
        from certkd.errors import CertkdError

        get_method(self.method)
        if self.attack not in ATTACKS:
            raise CertkdError(f"unknown attack {self.attack!r}: use {' or '.join(ATTACKS)}")
        if self.attack == "pgd" and self.options().pgd_steps < 1:
            raise CertkdError("--attack pgd needs --pgd-steps >= 1 (--pgd-steps 0 turns the attack off)")
        self.norm = check_norm(self.norm)
        self.options().check()
        self.rule.check(self.options().radius_tol)

    def kind(self) -> str:
        """What the verdict is: ``certified``, ``estimate``, or certified for the smoothed classifier."""
        m = get_method(self.method)
        return m.kind if m.target == MODEL else f"{m.kind} for the {m.target}"


def record_key(record: Record) -> tuple[int]:
    """The done-key of a compare record: ``(index,)``.

    Example
    -------
    >>> record_key({"index": 4, "radius_student": 0.1})
    (4,)
    """
    return (int(record["index"]),)


Reused = dict[int, tuple[float, bool]]
"""Radius and clean correctness per index, read from a ``certkd certify --per-example`` file."""


def reuse_records(path: Path, checkpoint: Path, job: CompareJob, dataset: str, split: str, count: int) -> Reused:
    """Radius and correctness per index from a ``certkd certify --radius --per-example`` file.

    The file's configuration header must name the same checkpoint (sha256), points
    (dataset, split, at least ``count`` examples), norm, method (with ``--radius``) and
    radius tolerance; else ``CertkdError`` with one sentence naming what differs. A file
    of complete verification answers (``certkd import-results``) serves in place of the
    method: its radii are the largest exported eps answered unsat (certified, on that grid).
    """
    from certkd.certification.records import read_per_example
    from certkd.checkpoint import file_sha256
    from certkd.errors import CertkdError
    from certkd.queries import COMPLETE

    if not Path(path).is_file():
        raise CertkdError(f"{path}: no such record file")
    config, records = read_per_example(path)
    if config is None:
        raise CertkdError(f"{path}: an empty record file")
    complete = config.get("methods") == [COMPLETE]
    expected = {"checkpoint_sha256": file_sha256(checkpoint), "dataset": dataset, "split": split,
                "norm": job.norm, "radius": "grid" if complete else True}
    differ = [k for k, v in expected.items() if config.get(k) != v]
    if not complete and job.method not in config.get("methods", []):
        differ.append(f"method (it has {', '.join(config.get('methods', []))}, not {job.method})")
    if not complete and (config.get("params") or {}).get("radius_tol", job.options().radius_tol) != \
            job.options().radius_tol:
        differ.append("radius_tol")
    method = COMPLETE if complete else job.method
    if differ:
        raise CertkdError(f"{path} does not hold {job.method} radii of {Path(checkpoint).name} on these points: "
                          f"its configuration differs in {', '.join(differ)}")
    given: Reused = {}
    for r in records:
        if r["method"] == method and int(r["index"]) < count:
            radius = math.inf if r.get("radius") is None else float(r["radius"])
            given.setdefault(int(r["index"]), (radius, int(r["pred"]) == int(r["label"])))
    missing = count - len(given)
    if missing:
        raise CertkdError(f"{path} lacks the {method} radii of {missing} of the first {count} points")
    return given


def compare_points(student: Context, teacher: Context, data: Points, indices: Sequence[int], job: CompareJob,
                   log: RecordLog, progress: bool = False,
                   reused: tuple[Reused | None, Reused | None] = (None, None)) -> list[Record]:
    """Both models' certified and attack radii on the missing batches of this shard into ``log``
    (``certkd.runs.execute``, with ``progress``); returns the records appended now, one per point: ``index,
    label, radius_student, radius_teacher, correct_student, correct_teacher, attack_student, attack_teacher``
    (``None`` for an infinite radius).

    Each model's certified radii use ``seed_stream(seed, batch, method)``, the stream of
    ``certkd certify --radius`` with the same seed and batch size (the radii those two
    certify runs give), unless ``reused`` holds them; the attack radii use the stream
    ``seed_stream(seed, batch, "attack:" + attack)``.

    Parameters
    ----------
    student, teacher : Context
        Each model's certify context (``prepare_methods``), built once per run.
    data, indices : Points, sequence of int
        The evaluated points, read only through ``data.batch(indices)``.
    job : CompareJob
        Method, attack, batch size, seed, shard.
    reused : (dict or None, dict or None)
        The student's and the teacher's certified radii read by :func:`reuse_records`.
    """
    from certkd.certification.apgd import attack_radii

    method = get_method(job.method)
    work = [(b, idx) for b, idx in batches(indices, job.batch_size, job.shard) if log.missing((i,) for i in idx)]

    def radii(ctx: Context, given: Reused | None, b: int, idx: list[int], x: torch.Tensor,
              y: torch.Tensor) -> tuple[list[float], list[bool]]:
        if given is not None:
            return [given[i][0] for i in idx], [given[i][1] for i in idx]
        pred, out = evaluate_batch(ctx, method, x, y, [], True, seed_stream(job.seed, b, method.name,
                                                                             device=ctx.device))
        assert out.radius is not None
        return out.radius.tolist(), (pred == y.cpu()).tolist()

    def compute(item: tuple[int, list[int]]) -> list[Record]:
        b, idx = item
        x, y = data.batch(idx)
        (rs, cs), (rt, ct) = (radii(ctx, given, b, idx, x, y) for ctx, given in zip((student, teacher), reused,
                                                                                   strict=True))
        a_s, a_t = (attack_radii(ctx, job.attack, x, y, seed_stream(job.seed, b, f"attack:{job.attack}",
                                                                     device=ctx.device)).tolist()
                    for ctx in (student, teacher))
        return [{"index": i, "label": int(y[r]), "radius_student": json_float(rs[r]),
                 "radius_teacher": json_float(rt[r]), "correct_student": bool(cs[r]),
                 "correct_teacher": bool(ct[r]), "attack_student": json_float(a_s[r]),
                 "attack_teacher": json_float(a_t[r])} for r, i in enumerate(idx)]

    return execute(work, compute, log, progress, "compare", label=lambda w: f"batch {w[0]}")


def _part_json(part: Any, kind: str, radii: str) -> dict[str, Any]:
    """One part of ``compare.json``: its verdict, statistics and table (eps in the run's norm)."""
    return {
        "verdict": part.verdict, "reason": part_reason(part), "kind": kind, "radii": radii,
        "at_least_fraction": part.at_least_fraction,
        "wilcoxon": {"statistic": part.wilcoxon_statistic, "p_less": part.wilcoxon_p_less,
                     "p_greater": part.wilcoxon_p_greater, "p_two_sided": part.wilcoxon_p_two_sided,
                     "direction": "p_less: H1 the student's radii are smaller; p_greater: H1 they are larger"},
        "median_radius_difference": part.median_difference,
        "median_radius_student": json_float(float(part.radius_student.median())),
        "median_radius_teacher": json_float(float(part.radius_teacher.median())),
        "table": [{"eps": e, "accuracy_student": a, "accuracy_teacher": b, "difference": d, "ci_low": lo,
                   "ci_high": hi} for e, a, b, d, lo, hi in zip(
            part.eps.tolist(), part.accuracy_student.tolist(), part.accuracy_teacher.tolist(),
            part.difference.tolist(), part.ci_low.tolist(), part.ci_high.tolist(), strict=True)],
    }


ATTACK_DISTANCE_TOL = 1e-5  # float32 rounding of an adversarial example's distance (bounds.attack)


def check_radii_against_attack(radii: dict[str, torch.Tensor], method: str) -> None:
    """The evidence gate of a comparison: a certified radius at or beyond an attack radius (an eps at which the
    attack found an adversarial example) is contradicted, and refuses ``method`` (``ContradictionError``)."""
    for who in ("student", "teacher"):
        certified, attack = radii[f"radius_{who}"], radii[f"attack_{who}"]
        broken = torch.isfinite(attack) & (certified > attack + ATTACK_DISTANCE_TOL)
        if bool(broken.any()):
            raise ContradictionError(
                f"{method} is refused for the {who}: {int(broken.sum())} of its certified radii exceed the radius "
                f"at which the attack found an adversarial example, so its bounds do not hold for this model")


def summarize_compare(config: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """Both parts (``bounds.paired.paired_comparison``) and the headline (``certkd.verdict.headline``).

    Parameters
    ----------
    config : dict
        The run's configuration (where the points came from, then the ``CompareJob``).
    records : list of dict
        One per point (:func:`compare_points`).

    Returns
    -------
    dict
        :func:`judge`'s verdict, ``config`` and the four radius columns.

    Example
    -------
    >>> rows = [{"index": i, "radius_student": 0.1, "radius_teacher": 0.1, "correct_student": True,
    ...          "correct_teacher": True, "attack_student": 0.3, "attack_teacher": 0.3} for i in range(5)]
    >>> summarize_compare({"method": "crown", "n_boot": 50}, rows)["verdict"]
    'yes'
    """
    job = _job_of(config)
    records = sorted({int(r["index"]): r for r in records}.values(), key=lambda r: r["index"])

    def column(name: str) -> torch.Tensor:
        return torch.tensor([math.inf if r[name] is None else r[name] for r in records], dtype=torch.float64)

    radii = {n: column(n) for n in RADIUS_COLUMNS}
    if job.kind() == CERTIFIED:
        check_radii_against_attack(radii, job.method)
    correct = [torch.tensor([r[f"correct_{who}"] for r in records]) for who in ("student", "teacher")]
    return {**judge(radii, correct[0], correct[1], job), "config": config,
            **{n: t.tolist() for n, t in radii.items()}}


def judge(radii: dict[str, torch.Tensor], correct_student: torch.Tensor, correct_teacher: torch.Tensor,
          job: CompareJob) -> dict[str, Any]:
    """The verdict of theory.md §6 from per-example radii of both parts on the same points.

    Parameters
    ----------
    radii : dict
        ``radius_student``, ``radius_teacher`` (certified, by ``job.method``) and
        ``attack_student``, ``attack_teacher`` (attack radii by ``job.attack``), each (N,).
    correct_student, correct_teacher : torch.Tensor
        (N,) bool: the clean prediction is right.
    job : CompareJob
        The rule (margin, alpha, fraction, bootstrap, rho threshold, eps grid or None).

    Returns
    -------
    dict
        ``verdict``/``reason`` (the headline), ``rho``, ``coverage``, ``certified_label``, both
        parts (``certified``, ``empirical``: verdict, reason, Wilcoxon p-values with their
        direction, accuracy table with CIs) and the rule's inputs (``rule``).
    """
    from bounds.paired import CERTIFIED_PART, EMPIRICAL_PART, curve_grid, paired_comparison

    rs, rt, a_s, a_t = (radii[n] for n in RADIUS_COLUMNS)
    eps = job.eps if job.eps is not None else curve_grid(torch.cat([rs, rt]), a_t)
    rule = job.rule.paired(job.options().radius_tol, job.seed)
    cert = paired_comparison(rs, rt, eps, correct_student, correct_teacher, part=CERTIFIED_PART, **rule)
    emp = paired_comparison(a_s, a_t, eps, correct_student, correct_teacher, part=EMPIRICAL_PART, **rule)
    head = job.rule.combine(cert, emp)
    return {
        "question": QUESTION, "verdict": head.verdict, "reason": head.reason, "n": len(rs),
        "rho": head.rho, "certified_label": head.coverage_label,
        "coverage": {"certified": head.certified_covers, "empirical": json_float(head.empirical_covers),
                     "quantile": head.coverage_quantile,
                     "meaning": "each part covers eps in [0, X]: X is this quantile of the teacher's radii"},
        "eps_units": f"L-{job.norm} radius in input units ([0, 1] pixel scale)",
        "certified": _part_json(cert, job.kind(), f"{job.method} certified radii"),
        "empirical": _part_json(emp, "estimate", f"{job.attack} attack radii (upper bounds of the true radii)"),
        "rule": {"tol": rule["tol"], **asdict(job.rule), "coverage_quantile": head.coverage_quantile,
                 "headline": HEADLINE_RULE, "part": PART_RULE},
    }


def _job_of(config: dict[str, Any]) -> CompareJob:
    names = set(CompareJob.__dataclass_fields__)
    values = {k: v for k, v in config.items() if k in names}
    shard = values.pop("shard", None)
    rule = CompareRule(**values.pop("rule", {}))
    return CompareJob(**values, rule=rule, shard=(int(shard[0]), int(shard[1])) if shard else None)


def format_compare(summary: dict[str, Any]) -> str:
    """The text ``certkd compare`` prints for a summary of :func:`summarize_compare`: the question and the
    headline verdict (its first line), both parts with their reasons, rho and the table."""
    cfg, cert, emp = summary["config"], summary["certified"], summary["empirical"]
    cover = summary["coverage"]
    label = summary["certified_label"] or f"covers eps <= {float_text(cover['certified'])}"
    rho = "undefined (median a_T = 0)" if summary["rho"] is None else f"{summary['rho']:.3g}"
    lines = [f"{summary['question']}: {summary['verdict'].upper()} ({summary['n']} points, L-{cfg['norm']})",
             f"  because {summary['reason']}",
             f"  certified part ({cert['radii']}, {cert['kind']}; {label}): {cert['verdict']}",
             f"    {cert['reason']}",
             f"  empirical part ({emp['radii']}, an estimate; covers eps <= {float_text(cover['empirical'])}): "
             f"{emp['verdict']}",
             f"    {emp['reason']}",
             f"  certificate looseness rho = median(r_T) / median(a_T) = {rho} (threshold "
             f"{summary['rule']['rho_threshold']:g})"]
    for name, part in (("certified", cert), ("empirical", emp)):
        w = part["wilcoxon"]
        lines.append(f"  {name}: radius_S >= radius_T - tol on {part['at_least_fraction']:.1%}; median S - T "
                     f"{part['median_radius_difference']:.4g}; Wilcoxon p (H1 student smaller) {w['p_less']:.3g}, "
                     f"(H1 larger) {w['p_greater']:.3g}")
    level = f"{summary['rule']['ci_level']:.0%}"
    lines.append(f"  {'eps':>8} | {'certified T':>11}{'S':>7}  {level + ' CI of S - T':<18}| {'attack T':>9}{'S':>7}  "
                 f"{level} CI of S - T")
    for c, e in zip(cert["table"], emp["table"], strict=True):
        lines.append(f"  {c['eps']:>8.4g} | {c['accuracy_teacher']:>11.3f}{c['accuracy_student']:>7.3f}  "
                     f"{'[' + format(c['ci_low'], '.3f') + ', ' + format(c['ci_high'], '.3f') + ']':<18}| "
                     f"{e['accuracy_teacher']:>9.3f}{e['accuracy_student']:>7.3f}  [{e['ci_low']:.3f}, "
                     f"{e['ci_high']:.3f}]")
    return "\n".join(lines)


def write_compare_outputs(out: Path, summary: dict[str, Any]) -> None:
    """``compare.json`` (without the radius columns, which live in the records) and the three figures.

    Parameters
    ----------
    out : Path
        The output directory.
    summary : dict
        From :func:`summarize_compare`.
    """
    from certkd.io import atomic_write_json
    from certkd.plots import model_names, plot_part, plot_radius_pairs

    atomic_write_json(out / "compare.json", {k: v for k, v in summary.items() if k not in RADIUS_COLUMNS})
    names = model_names(summary)
    for part, file in (("certified", "certified_accuracy.png"), ("empirical", "attack_accuracy.png")):
        plot_part(summary, part, names, out / file)
    plot_radius_pairs(summary, names, out / "radius_scatter.png")


COMPARE = Command(COMMAND, record_key, lambda config: {(i,) for i in shard_indices(config)},
                  lambda config, records: sorted(records, key=record_key),
                  summarize_compare, lambda out, summary, records: write_compare_outputs(out, summary), format_compare,
                  in_folder=True)


def compare_run(run: Run, student: Context, teacher: Context, data: Points, job: CompareJob, sources: dict[str, Any],
                reused: tuple[Reused | None, Reused | None] = (None, None)) -> dict[str, Any]:
    """The work of a compare run (the command's and the API's): its configuration (``sources``: where its
    points come from, then ``job``), the memory plan of each model whose radii are computed here (not
    reused), then :func:`compare_points` into the run's record log.

    Returns the memory plans by model (``student``, ``teacher``).
    """
    from bounds.bound_methods import BOUND_METHODS

    run.configure(sources, asdict(job))
    count = int(sources["num_examples"])
    with run.open_log() as log:
        computed = [(who, c) for who, c, given in zip(("student", "teacher"), (student, teacher), reused, strict=True)
                    if given is None]  # the models whose certified radii are computed here, not reused
        plans = dict(zip((who for who, _ in computed), run.plan_memory(
            [c.bound_engine() for _, c in computed], data, count, job.method, None, job.norm, job.batch_size),
            strict=True)) if job.method in BOUND_METHODS and computed else {}
        compare_points(student, teacher, data, range(count), job, log, run.settings.progress, reused)
    return plans


def run_compare(student_path: Path, teacher_path: Path, job: CompareJob, settings: RunSettings,
                student_records: Path | None = None, teacher_records: Path | None = None) -> dict[str, Any] | None:
    """``certkd compare``: both parts' radii on the same points and the headline verdict (theory.md §6).

    Parameters
    ----------
    student_path, teacher_path : Path
        Checkpoints that fit each other.
    job : CompareJob
        Radius method and options, batch size, seed, verdict rule (its ``shard`` is set here).
    settings : RunSettings
        The points (default: the student's dataset), device, the folder of ``per_example.jsonl``,
        ``compare.json`` and figures (``out``), shard, ...
    student_records, teacher_records : Path, optional
        ``certkd certify --radius --per-example`` files of the same points, model and method
        (checked by their configuration header): their radii are used instead of recomputed.

    Returns
    -------
    dict or None
        The summary; None for a shard that is not the whole run.
    """
    from certkd.certification.methods import prepare_methods
    from certkd.checkpoint import file_sha256
    from certkd.loading import load_pair

    run = Run.start(COMPARE, settings)
    job.shard = run.shard
    job.check()
    student_ckpt, student, teacher, data, sources = load_pair(student_path, teacher_path, settings)
    reused_s, reused_t = (None if path is None else reuse_records(path, ckpt, job, sources["dataset"], settings.split,
                                                                  sources["num_examples"])
                          for path, ckpt in ((student_records, student_path), (teacher_records, teacher_path)))
    reused = (reused_s, reused_t)
    job.student_records, job.teacher_records = (None if p is None else file_sha256(p)
                                                for p in (student_records, teacher_records))
    contexts = [prepare_methods(m, student_ckpt.input_shape, [] if given is not None else [job.method], job.norm,
                                job.options(), settings.device) for m, given in zip((student, teacher), reused, strict=True)]
    plans = compare_run(run, contexts[0], contexts[1], data, job, sources, reused)
    return run.finish({"student": str(student_path), "teacher": str(teacher_path), "memory_plan": plans or None})
