"""``certkd bounds`` and ``certkd compare``: the paper's theory in numbers (theory.md §3).

``bounds``: every term of the loss transfer bound per example, bound versus the
student's PGD-measured robust loss, and (with ``--certified-gamma``) the certified
bound and the margin-form transfer certificate. ``compare``: per-example radii of
student and teacher on the same points and the verdict of ``bounds.paired``.
Both append per-example JSON lines as they go (``--resume`` continues) and write
a summary JSON and PNG figures into ``--out DIR``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import torch

from certkd.cli import main
from certkd.cli.options import device_option, norm_option, parse_eps_list, seed_option
from certkd.errors import CertkdError

PER_EXAMPLE = "per_example.jsonl"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
TERMS = ("loss_student", "loss_teacher", "output_gap", "gradient_gap", "gamma_student", "gamma_teacher",
         "robust_teacher", "robust_student", "bound")
CERTIFIED_TERMS = ("gamma_student_certified", "gamma_teacher_certified", "robust_teacher_upper", "bound_certified")
KIND_OF_TERM = {"loss_student": "exact", "loss_teacher": "exact", "output_gap": "exact", "gradient_gap": "exact",
                "gamma_student": "estimate", "gamma_teacher": "estimate", "robust_teacher": "estimate",
                "robust_student": "estimate", "bound": "estimate", "gamma_student_certified": "certified",
                "gamma_teacher_certified": "certified", "robust_teacher_upper": "certified",
                "bound_certified": "certified"}


def _eps_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[float] | None:
    return parse_eps_list(values) if values else None


def _json_float(value: float) -> float | None:
    """JSON has no infinity: a non-finite number is written as null."""
    return float(value) if math.isfinite(value) else None


def _load_pair(student_path: Path, teacher_path: Path, device: str):
    """Both checkpoints, checked to fit each other (input shape, classes), and their models."""
    from certkd.checkpoint import check_compatible, load_checkpoint

    student_ckpt, teacher_ckpt = load_checkpoint(student_path), load_checkpoint(teacher_path)
    check_compatible(student_ckpt, teacher_ckpt)
    return student_ckpt, teacher_ckpt, student_ckpt.build_model(device), teacher_ckpt.build_model(device)


def _load_points(ckpt: Any, dataset: str | None, split: str, data_dir: Path | None, count: int | None):
    from certkd.certification import check_fits
    from certkd.data import load_dataset

    name = dataset or ckpt.dataset
    data = load_dataset(name, split, data_dir)
    check_fits(ckpt.input_shape, ckpt.num_classes, data.x, data.y, f"dataset {name!r}")
    n = len(data) if count is None else min(count, len(data))
    return name, data.x[:n], data.y[:n]


def _open_log(out: Path | None, config: dict[str, Any], resume: bool):
    """(appender or None, records so far); refuses to mix runs of different configurations."""
    from certkd.io import JsonlAppender, read_jsonl

    if out is None:
        if resume:
            raise CertkdError("--resume needs --out DIR (the directory of the interrupted run)")
        return None, []
    if out.exists() and not out.is_dir():
        raise CertkdError(f"{out} is a file; --out takes a directory")
    path = out / PER_EXAMPLE
    rows = read_jsonl(path)
    if rows and not resume:
        raise CertkdError(f"{path} already holds results: pass --resume to continue that run, or use another --out")
    if rows and rows[0].get("config") != config:
        raise CertkdError(f"{path} was written by a run with a different configuration; use another --out")
    appender = JsonlAppender(path)
    if not rows:
        appender.write([{"config": config}])
    return appender, rows[1:]


def _batches(count: int, batch_size: int):
    from tqdm import tqdm

    starts = range(0, count, batch_size)
    return tqdm(starts, desc="batches", unit="batch", leave=False, disable=None)


def _stats(values: list[float | None]) -> dict[str, Any]:
    """Mean and quantiles of the finite values, and how many were not finite (unbounded)."""
    finite = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    out: dict[str, Any] = {"n": len(values), "non_finite": len(values) - len(finite)}
    if len(finite):
        qs = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        out.update({"mean": float(finite.mean()), **{f"q{int(q * 100)}": v for q, v in zip(QUANTILES, qs,
                                                                                             strict=True)}})
    return out


def _seeded(seed: int, *parts: int) -> torch.Generator:
    """A generator fixed by the seed and the batch (a resumed run draws what the first run would have)."""
    value = int(seed)
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)



def _points_options(command):
    """The options that choose the evaluated points (shared by ``bounds`` and ``compare``)."""
    for option in reversed([
        click.option("-n", "--num-examples", type=click.IntRange(min=1), default=None,
                     help="Use the first N examples of the split (default: all)."),
        click.option("--dataset", default=None, help="Dataset name (default: the student checkpoint's dataset)."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Where the dataset's files live."),
        click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True),
    ]):
        command = option(command)
    return command


def _run_options(command):
    """Batch size, device and seed (shared by ``bounds`` and ``compare``)."""
    for option in reversed([click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
                            device_option, seed_option]):
        command = option(command)
    return command

# --------------------------------------------------------------------------- certkd bounds

@main.command("bounds")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--eps", "eps", multiple=True, callback=_eps_callback, required=True,
              help="Radius; repeatable or a comma list, fractions allowed (e.g. 0.1 or 2/255).")
@norm_option
@_points_options
@click.option("--certified-gamma", is_flag=True,
              help="Also bound the gammas and the teacher's robust loss by bound propagation (certified), giving "
                   "a certified transfer bound, and the margin-form transfer certificate (needs auto_LiRPA).")
@click.option("--method", type=click.Choice(["crown", "crown-ibp"]), default="crown", show_default=True,
              help="Bound propagation method of --certified-gamma (also the margin bounds of the certificate).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True,
              help="PGD steps for the gamma estimates and the robust losses.")
@click.option("--restarts", type=click.IntRange(min=1), default=2, show_default=True, help="PGD restarts.")
@_run_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for per_example.jsonl (appended as computed), summary.json and figures.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def bounds_command(student: Path, teacher: Path, eps: list[float], norm: str, num_examples: int | None,
                   dataset: str | None, data_dir: Path | None, split: str, certified_gamma: bool, method: str,
                   steps: int, restarts: int, batch_size: int, device: str, seed: int, out: Path | None,
                   resume: bool) -> None:
    """The transfer bound of theory.md §3 for STUDENT distilled from TEACHER, term by term.

    \b
    robust_S <= robust_T + [loss_S(x) - loss_T(x)] + eps * ||grad loss_S - grad loss_T||_q
                + gamma_S + gamma_T
    Per example and eps: the losses, the output gap, the gradient gap (dual norm q),
    the linearity gammas (PGD: estimate), the robust losses (PGD on CE: estimates),
    the bound (estimate) and whether it holds against the student's measured robust
    loss. --certified-gamma adds certified gammas, a certified upper bound of the
    teacher's robust loss and so a certified bound (it always holds), plus the
    margin-form transfer certificate: points certified through the teacher, directly,
    by both, by neither.
    """
    from bounds.linearity import LinearityBounder
    from bounds.transfer import transfer_bound, transfer_certificate

    eps = list(dict.fromkeys(eps))
    student_ckpt, _, student_model, teacher_model = _load_pair(student, teacher, device)
    data_name, x_all, y_all = _load_points(student_ckpt, dataset, split, data_dir, num_examples)
    config = {"command": "bounds", "student": str(student), "teacher": str(teacher), "dataset": data_name,
              "split": split, "num_examples": len(y_all), "eps": eps, "norm": norm,
              "certified_gamma": certified_gamma, "method": method, "steps": steps, "restarts": restarts,
              "batch_size": batch_size, "seed": seed}
    appender, records = _open_log(out, config, resume)
    done = {(int(r["index"]), float(r["eps"])) for r in records}
    shape = tuple(student_ckpt.input_shape)
    tools: dict[str, Any] = {}
    if certified_gamma:
        from bounds.certify import BoundEngine

        tools = {"bounders": (LinearityBounder(student_model, shape, method, norm, device),
                              LinearityBounder(teacher_model, shape, method, norm, device)),
                 "engines": (BoundEngine(student_model, shape, device=device),
                             BoundEngine(teacher_model, shape, device=device))}
    try:
        for start in _batches(len(y_all), batch_size):
            idx = list(range(start, min(start + batch_size, len(y_all))))
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            for e_i, e in enumerate(eps):
                if all((i, float(e)) in done for i in idx):
                    continue
                rows = _bounds_rows(student_model, teacher_model, x, y, idx, e, norm, certified_gamma, method,
                                    steps, restarts, _seeded(seed, start, e_i), tools, transfer_bound,
                                    transfer_certificate)
                records += rows
                if appender is not None:
                    appender.write(rows)
    finally:
        if appender is not None:
            appender.close()
    summary = _bounds_summary(config, records)
    click.echo(_format_bounds(summary))
    if out is not None:
        _write_bounds_outputs(out, summary, records, eps)


def _bounds_rows(student_model, teacher_model, x, y, idx, eps, norm, certified, method, steps, restarts, gen,
                 tools, transfer_bound, transfer_certificate) -> list[dict[str, Any]]:
    tb = transfer_bound(student_model, teacher_model, x, y, eps, norm, certified=certified, method=method,
                        steps=steps, restarts=restarts, generator=gen, bounders=tools.get("bounders"))
    columns: dict[str, torch.Tensor] = {name: getattr(tb, name) for name in TERMS}
    flags = {"holds": tb.check().holds}
    if certified:
        columns.update({name: getattr(tb, name) for name in CERTIFIED_TERMS})
        flags["holds_certified"] = tb.check(certified=True).holds
        cert = transfer_certificate(student_model, teacher_model, x, y, eps, norm, method=method,
                                    gamma_method=method, engines=tools["engines"], bounders=tools["bounders"])
        columns["student_margin_lower_transfer"] = cert.student_lower.amin(1)
        columns["student_margin_lower_direct"] = cert.student_direct_lower.amin(1)
        flags["certified_through_transfer"] = cert.through_transfer
        flags["certified_directly"] = cert.direct
    rows = []
    for r, i in enumerate(idx):
        row: dict[str, Any] = {"index": i, "eps": float(eps), "label": int(y[r])}
        row.update({name: _json_float(float(t[r])) for name, t in columns.items()})
        row.update({name: bool(t[r]) for name, t in flags.items()})
        rows.append(row)
    return rows


def _bounds_summary(config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per eps: each term's mean and quantiles, how often each bound holds and its slack, certificate counts."""
    per_eps = []
    for e in config["eps"]:
        rows = sorted((r for r in records if float(r["eps"]) == float(e)), key=lambda r: r["index"])
        if not rows:
            continue
        names = [n for n in (*TERMS, *CERTIFIED_TERMS) if n in rows[0]]
        entry: dict[str, Any] = {"eps": float(e), "n": len(rows),
                                 "terms": {n: {"kind": KIND_OF_TERM[n], **_stats([r[n] for r in rows])}
                                           for n in names}}
        checks = {"estimate": ("bound", "holds")}
        if "bound_certified" in rows[0]:
            checks["certified"] = ("bound_certified", "holds_certified")
        entry["bound_vs_measured"] = {}
        for kind, (bound_name, flag) in checks.items():
            slack = [None if r[bound_name] is None else r[bound_name] - r["robust_student"] for r in rows]
            entry["bound_vs_measured"][kind] = {"holds_fraction": sum(r[flag] for r in rows) / len(rows),
                                                "slack": _stats(slack)}
        if "certified_through_transfer" in rows[0]:
            t = [r["certified_through_transfer"] for r in rows]
            d = [r["certified_directly"] for r in rows]
            entry["certificate_counts"] = {
                "both": sum(a and b for a, b in zip(t, d, strict=True)),
                "transfer_only": sum(a and not b for a, b in zip(t, d, strict=True)),
                "direct_only": sum(b and not a for a, b in zip(t, d, strict=True)),
                "neither": sum(not a and not b for a, b in zip(t, d, strict=True))}
        per_eps.append(entry)
    return {"config": config, "per_eps": per_eps,
            "legend": "exact: computed at x; estimate: PGD (may be too small); certified: bound propagation "
                      "(never contradicted); slack = bound - student's PGD robust loss; null = not finite"}


def _fmt(value: Any) -> str:
    return "inf" if value is None else f"{value:.4g}"


def _format_bounds(summary: dict[str, Any]) -> str:
    lines = []
    for entry in summary["per_eps"]:
        lines.append(f"eps = {entry['eps']:g} ({summary['config']['norm']}), {entry['n']} examples")
        lines.append(f"  {'term':<26}{'kind':<11}{'mean':>10}{'q10':>10}{'median':>10}{'q90':>10}")
        for name, s in entry["terms"].items():
            lines.append(f"  {name:<26}{s['kind']:<11}{_fmt(s.get('mean')):>10}{_fmt(s.get('q10')):>10}"
                         f"{_fmt(s.get('q50')):>10}{_fmt(s.get('q90')):>10}")
        for kind, check in entry["bound_vs_measured"].items():
            lines.append(f"  bound ({kind}) >= measured student robust loss on {check['holds_fraction']:.1%}; "
                         f"median slack {_fmt(check['slack'].get('q50'))}")
        if "certificate_counts" in entry:
            c = entry["certificate_counts"]
            lines.append(f"  student certified: through transfer and directly {c['both']}, transfer only "
                         f"{c['transfer_only']}, directly only {c['direct_only']}, neither {c['neither']}")
    return "\n".join(lines)


def _write_bounds_outputs(out: Path, summary: dict[str, Any], records: list[dict[str, Any]],
                          eps: list[float]) -> None:
    from certkd.io import atomic_write_json
    from certkd.plots import plot_bound_vs_measured, plot_terms

    atomic_write_json(out / "summary.json", summary)
    for e_i, e in enumerate(eps):
        rows = sorted((r for r in records if float(r["eps"]) == float(e)), key=lambda r: r["index"])
        if not rows:
            continue
        column = {name: [math.inf if r[name] is None else r[name] for r in rows]
                  for name in (*TERMS, *CERTIFIED_TERMS) if name in rows[0]}
        series = {"estimate (PGD gammas)": column["bound"]}
        if "bound_certified" in column:
            series["certified"] = column["bound_certified"]
        plot_bound_vs_measured(series, column["robust_student"], out / f"bound_vs_measured_eps{e_i}.png")
        terms = {"output_gap": column["output_gap"],
                 "eps * gradient_gap": [e * g for g in column["gradient_gap"]],
                 **{n: column[n] for n in ("gamma_student", "gamma_teacher", "gamma_student_certified",
                                           "gamma_teacher_certified") if n in column}}
        plot_terms(terms, out / f"terms_eps{e_i}.png")


# --------------------------------------------------------------------------- certkd compare

def _param_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE, e.g. sigma=0.5")
        try:
            value: Any = int(raw) if raw.strip().lstrip("-").isdigit() else float(raw)
        except ValueError:
            raise click.BadParameter(f"{item!r}: the value must be a number") from None
        params[key.strip().replace("-", "_")] = value
    return params


@main.command("compare")
@click.argument("student", type=click.Path(path_type=Path))
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--method", default="crown", show_default=True,
              help="Radius method of 'certkd certify' (the same for both models), e.g. crown, ibp, lipschitz, "
                   "smoothing, clever (an estimate: the verdict is then an estimate too).")
@click.option("--eps", "eps", multiple=True, callback=_eps_callback,
              help="Eps grid of the certified-accuracy curves (default: 11 points from 0 to the largest radius).")
@norm_option
@_points_options
@click.option("--radius-tol", type=float, default=1e-3, show_default=True,
              help="Bisection tolerance of the radii; differences within it count as ties.")
@click.option("--param", "params", multiple=True, callback=_param_callback,
              help="Further method parameter KEY=VALUE of 'certkd certify' (e.g. sigma=0.5, n=1000); repeatable.")
@click.option("--margin", type=float, default=0.02, show_default=True,
              help="Verdict 'no' when a CI of the certified-accuracy difference lies below -margin.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Level of the bootstrap CIs and of the Wilcoxon test.")
@click.option("--fraction", "fraction_threshold", type=float, default=0.9, show_default=True,
              help="Verdict 'yes' needs at least this fraction of points with r_S >= r_T - radius-tol.")
@click.option("--n-boot", type=click.IntRange(min=1), default=2000, show_default=True, help="Bootstrap resamples.")
@_run_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for per_example.jsonl (appended as computed), compare.json and figures.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def compare_command(student: Path, teacher: Path, method: str, eps: list[float] | None, norm: str,
                    num_examples: int | None, dataset: str | None, data_dir: Path | None, split: str,
                    radius_tol: float, params: dict[str, Any], margin: float, alpha: float,
                    fraction_threshold: float, n_boot: int, batch_size: int, device: str, seed: int,
                    out: Path | None, resume: bool) -> None:
    """Does STUDENT certify at least as robustly as TEACHER?  yes / no / inconclusive.

    \b
    Per-example radii r_S, r_T of the same points by the same method, then:
    the fraction with r_S >= r_T - tol, certified accuracy against eps for both,
    a paired bootstrap CI of the difference at each eps, a Wilcoxon signed-rank test
    on the radii, and the verdict (rule: bounds.paired.paired_comparison): no when a
    CI lies entirely below -margin or the Wilcoxon test finds the student's radii
    smaller; yes when the fraction reaches --fraction or the Wilcoxon test finds the
    student's radii larger; else inconclusive.
    """
    from bounds.paired import QUESTION, check_rule, paired_comparison
    from certkd.certification import MODEL, get_method, per_example_radii

    check_rule(radius_tol, margin, alpha, fraction_threshold, n_boot)
    radius_method = get_method(method)
    kind = radius_method.kind if radius_method.target == MODEL else \
        f"{radius_method.kind} for the {radius_method.target}"
    student_ckpt, _, student_model, teacher_model = _load_pair(student, teacher, device)
    data_name, x_all, y_all = _load_points(student_ckpt, dataset, split, data_dir, num_examples)
    method_params = {"radius_tol": radius_tol, **params}
    config = {"command": "compare", "student": str(student), "teacher": str(teacher), "dataset": data_name,
              "split": split, "num_examples": len(y_all), "method": method, "norm": norm,
              "params": method_params, "batch_size": batch_size, "seed": seed}
    appender, records = _open_log(out, config, resume)
    done = {int(r["index"]) for r in records}
    try:
        for batch_no, start in enumerate(_batches(len(y_all), batch_size)):
            idx = list(range(start, min(start + batch_size, len(y_all))))
            if all(i in done for i in idx):
                continue
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            radii, correct = [], []
            for model in (student_model, teacher_model):
                radii.append(per_example_radii(model, x, y, method, norm, seed=seed * 1_000_003 + batch_no,
                                               device=device, **method_params))
                with torch.no_grad():
                    correct.append(model(x).argmax(1) == y)
            rows = [{"index": i, "label": int(y[r]), "radius_student": _json_float(float(radii[0][r])),
                     "radius_teacher": _json_float(float(radii[1][r])), "correct_student": bool(correct[0][r]),
                     "correct_teacher": bool(correct[1][r])} for r, i in enumerate(idx)]
            records += rows
            if appender is not None:
                appender.write(rows)
    finally:
        if appender is not None:
            appender.close()
    records = sorted({int(r["index"]): r for r in records}.values(), key=lambda r: r["index"])

    def column(name: str) -> torch.Tensor:
        return torch.tensor([math.inf if r[name] is None else r[name] for r in records], dtype=torch.float64)

    rs, rt = column("radius_student"), column("radius_teacher")
    if eps is None:
        finite = torch.cat([rs, rt])[torch.isfinite(torch.cat([rs, rt]))]
        top = float(finite.max()) if len(finite) and float(finite.max()) > 0 else 1.0
        eps = torch.linspace(0, top, 11).tolist()
    cs = torch.tensor([r["correct_student"] for r in records])
    ct = torch.tensor([r["correct_teacher"] for r in records])
    result = paired_comparison(rs, rt, eps, cs, ct, tol=radius_tol, margin=margin, alpha=alpha,
                               fraction_threshold=fraction_threshold, n_boot=n_boot, seed=seed)
    summary = {
        "question": QUESTION, "verdict": result.verdict, "reason": result.reason, "kind": kind,
        "n": len(records), "at_least_fraction": result.at_least_fraction,
        "wilcoxon": {"statistic": result.wilcoxon_statistic, "p_less": result.wilcoxon_p_less,
                     "p_greater": result.wilcoxon_p_greater, "p_two_sided": result.wilcoxon_p_two_sided},
        "median_radius_difference": result.median_difference,
        "table": [{"eps": e, "accuracy_student": a, "accuracy_teacher": b, "difference": d, "ci_low": lo,
                   "ci_high": hi} for e, a, b, d, lo, hi in zip(
            result.eps.tolist(), result.accuracy_student.tolist(), result.accuracy_teacher.tolist(),
            result.difference.tolist(), result.ci_low.tolist(), result.ci_high.tolist(), strict=True)],
        "rule": {"tol": result.tol, "margin": result.margin, "alpha": result.alpha,
                 "fraction_threshold": result.fraction_threshold, "n_boot": n_boot},
        "config": config,
    }
    click.echo(_format_compare(summary))
    if out is not None:
        from certkd.io import atomic_write_json
        from certkd.plots import plot_certified_accuracy, plot_radius_scatter

        atomic_write_json(out / "compare.json", summary)
        plot_certified_accuracy(result.eps.tolist(), result.accuracy_student.tolist(),
                                result.accuracy_teacher.tolist(), out / "certified_accuracy.png", kind=kind,
                                ci_low=result.ci_low.tolist(), ci_high=result.ci_high.tolist(), norm=norm)
        plot_radius_scatter(rs.tolist(), rt.tolist(), out / "radius_scatter.png", kind=kind, norm=norm)


def _format_compare(summary: dict[str, Any]) -> str:
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
