"""Markdown reports and multi-model figures for ``certkd demo`` and ``certkd ablate``.

A report is read by someone who was not there: it states how each model was trained,
the units of every eps, the number of points, the rule behind every verdict in one
sentence (theory.md §6), the tie tolerance, the confidence intervals, and the direction
of every p-value. Every figure has a title naming the model(s), the method and n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from certkd.io import atomic_write_text  # noqa: E402
from certkd.plots import _legend_below, _save, eps_axis_label, plot_part, plot_radius_pairs  # noqa: E402

ROLES = {"teacher": "teacher", "kd": "KD student", "kdiga": "KDIGA student"}


@dataclass(frozen=True)
class Curve:
    """One accuracy-against-eps line: its legend label, its colour group, and whether it is an estimate."""

    label: str
    eps: Sequence[float]
    accuracy: Sequence[float | None]
    group: str
    estimate: bool = False


def plot_accuracy_curves(curves: Sequence[Curve], path: str | Path, title: str, ylabel: str, xlabel: str) -> Path:
    """Accuracy against eps: one colour per group, certified lines solid, estimates dashed (each labelled).

    Every line carries its own label (the method that made it), so an estimate is never
    shown under another method's name; the legend sits below the axes.
    """
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.6))
    groups = list(dict.fromkeys(c.group for c in curves))
    colors = dict(zip(groups, sns.color_palette("deep", len(groups)), strict=True))
    for c in curves:
        acc = [math.nan if a is None else a for a in c.accuracy]
        ax.plot(c.eps, acc, ls="--" if c.estimate else "-", marker="x" if c.estimate else "o",
                color=colors[c.group], alpha=0.85 if c.estimate else 1.0, label=c.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    _legend_below(ax, ncol=2)
    return _save(fig, path)


def plot_grouped_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str,
                      xlabel: str) -> Path:
    """Bars of ``groups[series][category]``: one colour per series, categories on the x axis."""
    sns.set_theme(style="whitegrid")
    series = list(groups)
    categories = list(next(iter(groups.values())))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(categories) + 2.5, 4.4))
    for i, (name, color) in enumerate(zip(series, sns.color_palette("deep", len(series)), strict=True)):
        pos = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
        ax.bar(pos, [groups[name][c] for c in categories], width, color=color, label=name)
    ax.set_xticks(np.arange(len(categories)), categories, rotation=25, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_iga_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str, norm: str) -> Path:
    """Accuracy against the swept ``iga_weight``: one panel per method, one line per eps."""
    sns.set_theme(style="whitegrid")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        sel = [r for r in rows if r["method"] == method]
        kind = sel[0]["kind"]
        for e, color in zip(sorted({r["eps"] for r in sel}), sns.color_palette("viridis", len({r["eps"] for r in sel})),
                            strict=True):
            pts = sorted((r for r in sel if r["eps"] == e), key=lambda r: float(r["iga_weight"]))
            ax.plot([float(r["iga_weight"]) for r in pts], [r["certified_accuracy"] for r in pts], marker="o",
                    ls="--" if kind != "certified" else "-", color=color, label=f"eps {e:.4g}")
        ax.set_title(f"{method} ({kind})", fontsize=10)
        ax.set_xlabel("KDIGA iga_weight")
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel(f"accuracy at eps (L-{norm}, input units)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _num(v: float | None, spec: str = ".4g") -> str:
    return "inf" if v is None else format(v, spec)


def _cell(summary: dict[str, Any], method: str, eps: float) -> float | None:
    for r in summary["results"]:
        if r["method"] == method and abs(r["eps"] - eps) < 1e-12:
            return cast("float | None", r["accuracy"])
    return None


def model_label(name: str, training: Mapping[str, Any]) -> str:
    """``"KD student (mlp, kd)"``: the model's role, architecture and training method."""
    return f"{ROLES.get(name, name)} ({training.get('arch', '?')}, {training.get('method', '?')})"


def training_table(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows stating how each model was trained (method, eps, epochs, lr, architecture, seed, ...)."""
    lines = ["| model | method | architecture | train eps (L-inf, input units) | epochs | lr | batch | seed "
             "| other settings |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        t = m["training"]
        other = {k: t[k] for k in ("alpha", "tau", "iga_weight", "iga_norm", "iga_on", "attack_steps", "optimizer",
                                   "schedule") if k in t and not (k.startswith("iga") and t.get("method") != "kdiga")
                 and not (k in ("alpha", "tau") and t.get("method") not in ("kd", "kdiga"))}
        arch = t.get("arch", "?") + (f" {t['arch_kwargs']}" if t.get("arch_kwargs") else "")
        eps = f"{t['eps']:g}" if t.get("method") in ("pgd-at", "trades", "ard", "rslad") else \
            f"none (clean inputs; validation PGD at {t.get('eps', 0):g})"
        lines.append(f"| {ROLES.get(name, name)} | {t.get('method')} | {arch} | {eps} | {t.get('epochs')} | "
                     f"{t.get('lr')} | {t.get('batch_size')} | {t.get('seed')} | "
                     f"{', '.join(f'{k}={v}' for k, v in other.items()) or '-'} |")
    return lines


def _part_rows(c: Mapping[str, Any], level: str) -> list[str]:
    """One table of both parts' curves: eps, accuracies, difference and its CI, side by side."""
    lines = [f"| eps (L-{c['norm']}, input units) | certified T | certified S | S - T [{level} CI] | attack T "
             f"| attack S | S - T [{level} CI] |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(c["certified"]["table"], c["empirical"]["table"], strict=True):
        lines.append(f"| {a['eps']:.4g} | {_pct(a['accuracy_teacher'])} | {_pct(a['accuracy_student'])} | "
                     f"{100 * a['difference']:+.1f} [{100 * a['ci_low']:+.1f}, {100 * a['ci_high']:+.1f}] | "
                     f"{_pct(b['accuracy_teacher'])} | {_pct(b['accuracy_student'])} | "
                     f"{100 * b['difference']:+.1f} [{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}] |")
    return lines


def _comparison_view(c: Mapping[str, Any], student: Mapping[str, Any], teacher: Mapping[str, Any],
                     norm: str) -> dict[str, Any]:
    """The comparison with the radius columns and the norm, as ``certkd.plots`` draws a compare summary."""
    def finite(values: Sequence[float | None]) -> list[float]:
        return [math.inf if v is None else v for v in values]

    return {**c, "norm": norm, "config": {"norm": norm}, "radius_student": student["radius"],
            "radius_teacher": teacher["radius"], "attack_student": finite(student["attack_radius"]),
            "attack_teacher": finite(teacher["attack_radius"])}


def write_demo_figures(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """Every figure of the demo report; returns ``{name: relative path}``."""
    s, models = results["settings"], results["models"]
    eps, method, norm, n = s["eps_grid"], s["method"], s["norm"], s["num_examples"]
    fig_dir = out / "figures"
    labels = {name: model_label(name, m["training"]) for name, m in models.items()}
    curves = []
    for name, m in models.items():
        cert = m["certification"]
        curves.append(Curve(f"{labels[name]}: {method.upper()} (certified)", eps,
                            [_cell(cert, method, e) for e in eps], name))
        curves.append(Curve(f"{labels[name]}: APGD (estimate)", eps, [_cell(cert, "apgd", e) for e in eps], name,
                            estimate=True))
    figures = {"accuracy": plot_accuracy_curves(
        curves, fig_dir / "certified_accuracy.png",
        f"digits test, first {n} points: {method.upper()} certified accuracy (solid)\n"
        f"and APGD attack accuracy (dashed, an estimate), teacher and both students",
        "accuracy at eps", eps_axis_label(norm))}
    teacher = models["teacher"]
    for student, c in results["comparisons"].items():
        view = _comparison_view(c, models[student], teacher, norm)
        names = (student, "teacher")
        figures[f"radius_{student}"] = plot_radius_pairs(view, names, fig_dir / f"radius_{student}_vs_teacher.png")
        for part in ("certified", "empirical"):
            figures[f"{student}_{part}"] = plot_part(view, part, names, fig_dir / f"{student}_{part}_part.png")
    terms = ("output_gap", "eps * gradient_gap", "gamma_student", "gamma_teacher", "robust_loss_teacher", "bound",
             "robust_loss_student")
    figures["transfer"] = plot_grouped_bars(
        {labels[k]: {t: v["mean"][t] for t in terms} for k, v in results["transfer"].items()},
        fig_dir / "transfer_terms.png",
        f"transfer-bound terms (theory.md §3), mean over the first {s['transfer_examples']} points, "
        f"L-{norm} eps {s['transfer_eps']:g}", "mean over points (CE loss units)",
        "term (gammas and robust losses: PGD estimates)")
    return {k: str(v.relative_to(out)) for k, v in figures.items()}


def write_demo_report(out: Path, results: dict[str, Any]) -> Path:
    """``out/report.md`` with the settings, tables, both parts of every verdict and the figures."""
    s, models = results["settings"], results["models"]
    eps, method, norm, n = s["eps_grid"], s["method"], s["norm"], s["num_examples"]
    figs = write_demo_figures(out, results)
    labels = {name: model_label(name, m["training"]) for name, m in models.items()}
    any_c = next(iter(results["comparisons"].values()))
    rule = any_c["rule"]
    level = f"{rule['ci_level']:.0%}"
    lines = ["# certkd demo: does robustness transfer through distillation?", "",
             f"A PGD-trained teacher was distilled into two small students on the embedded `digits` data "
             f"(8x8 grey images in [0, 1]; the first **n = {n}** test points are evaluated): one with plain KD, "
             f"one with KDIGA (KD plus input-gradient alignment). Threat model: the L-{norm} ball of radius eps "
             "intersected with [0, 1]^d; **every eps is in input units** (pixel values in [0, 1]).", "",
             "Labels: **certified** numbers are proofs (never contradicted by an attack); **estimates** come from "
             "attacks (APGD, PGD: their accuracies are upper bounds of the true robust accuracy, their radii upper "
             "bounds of the true radii).", "",
             "## How each model was trained", ""]
    lines += training_table(models)
    lines += ["", f"## Certified accuracy ({method.upper()}) and attack accuracy (APGD, PGD: estimates), n = {n}", "",
              "| model | clean | " + " | ".join(f"eps {e:g}" for e in eps) + " | median certified radius "
              "| median APGD radius |", "|---|---|" + "---|" * len(eps) + "---|---|"]
    for name, m in models.items():
        cert = m["certification"]
        radius = {r["method"]: r for r in cert["radius"]}
        row = [f"{_pct(_cell(cert, method, e))} (APGD {_pct(_cell(cert, 'apgd', e))}, PGD {_pct(_cell(cert, 'pgd', e))})"
               for e in eps]
        lines.append(f"| {labels[name]} | {_pct(cert['clean_accuracy']['accuracy'])} | " + " | ".join(row)
                     + f" | {_num(radius.get(method, {}).get('median'))} | {_num(radius.get('apgd', {}).get('median'))} |")
    sound = {n_: m["certification"]["soundness"] for n_, m in models.items()}
    lines += ["", f"Each cell: {method.upper()} certified accuracy (APGD attack accuracy, PGD-20 attack accuracy) "
              f"at that eps (L-{norm}, input units). Evidence gate: " + ", ".join(
                  f"{ROLES[k]}: {v['certified_checked_by_pgd']} certified (point, eps) pairs checked against PGD"
                  for k, v in sound.items()) + ", none broken (one would have refused the method).", "",
              f"![accuracy]({figs['accuracy']})", "",
              "## Does the student certify at least as robustly as the teacher?", "",
              "Two parts on the same points (theory.md §6): the **certified part** compares per-example "
              f"{method.upper()} certified radii r_S, r_T; the **empirical part** compares per-example APGD attack "
              "radii a_S, a_T (the smallest eps at which APGD found an adversarial example, an estimate).", "",
              f"**Rule.** {rule['part']} {rule['headline']}", "",
              f"Inputs of the rule: tie tolerance tol = {rule['tol']:g} (bisection tolerance of both radii; "
              f"differences within it count as ties), margin = {rule['margin']:g}, "
              f"{level} paired percentile-bootstrap CIs from {rule['n_boot']} resamples (the CI level; Wilcoxon "
              f"tests at {1 - rule['ci_level']:.2g}), fraction threshold = "
              f"{rule['fraction_threshold']:g}. Certificate looseness rho = median(r_T) / median(a_T); below "
              f"{rule['rho_threshold']:g} the certified part is labelled with the eps range it covers (up to the "
              f"{rule['coverage_quantile']:.0%} quantile of the teacher's radii). Wilcoxon p-values are one-sided "
              "with the alternative named in each column.", "",
              "| student | headline verdict | certified part | empirical part | rho | certified part covers eps <= "
              "| empirical part covers eps <= | Wilcoxon p, H1: student's certified radii smaller | Wilcoxon p, "
              "H1: student's attack radii smaller |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        cover = c["coverage"]
        rho = "undefined" if c["rho"] is None else f"{c['rho']:.3g}"
        lines.append(f"| {labels[name]} | **{c['verdict']}** | {c['certified']['verdict']}"
                     f"{' (' + c['certified_label'] + ')' if c['certified_label'] else ''} | "
                     f"{c['empirical']['verdict']} | {rho} | {_num(cover['certified'])} | "
                     f"{_num(cover['empirical'])} | {c['certified']['wilcoxon']['p_less']:.3g} | "
                     f"{c['empirical']['wilcoxon']['p_less']:.3g} |")
    for name, c in results["comparisons"].items():
        lines += ["", f"### {labels[name]} against the {labels['teacher']} (n = {c['n']})", "",
                  f"Headline verdict **{c['verdict']}**: {c['reason']}.", "",
                  f"- certified part: {c['certified']['verdict']}: {c['certified']['reason']}; "
                  f"median r_S - r_T = {c['certified']['median_radius_difference']:.4g}",
                  f"- empirical part (estimate): {c['empirical']['verdict']}: {c['empirical']['reason']}; "
                  f"median a_S - a_T = {c['empirical']['median_radius_difference']:.4g}", ""]
        lines += _part_rows({**c, "norm": norm}, level)
        lines += ["", f"Accuracies in %, differences in percentage points with their {level} CI.", "",
                  f"![certified part]({figs[f'{name}_certified']}) ![empirical part]({figs[f'{name}_empirical']})",
                  "", f"![radii]({figs[f'radius_{name}']})"]
    terms = ("output_gap", "eps * gradient_gap", "gamma_student", "gamma_teacher", "robust_loss_teacher", "bound",
             "robust_loss_student")
    lines += ["", f"## The transfer bound, term by term (theory.md §3; L-{norm} eps {s['transfer_eps']:g} in input "
              f"units, first {s['transfer_examples']} points; estimates)", "",
              "loss_S(x+delta) <= robust loss of T + [loss_S(x) - loss_T(x)] + eps ||grad loss_S - grad loss_T||_1 "
              "+ gamma_S + gamma_T. KD shrinks the output gap only; KDIGA also shrinks the gradient gap. Means over "
              "the points, in cross-entropy units; gammas and robust losses are PGD estimates.", "",
              "| student | output gap | eps x gradient gap | gamma_S | gamma_T | teacher robust loss | bound "
              "| student robust loss (PGD) | bound holds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in results["transfer"].items():
        m = t["mean"]
        lines.append(f"| {labels[name]} | " + " | ".join(f"{m[k]:.4f}" for k in terms)
                     + f" | {_pct(t['bound_holds_fraction'])} |")
    lines += ["", f"![transfer terms]({figs['transfer']})", "",
              "What the numbers mean: the gradient gap is the term KDIGA trains down; gamma terms measure how far "
              "each model is from linear on the ball (PGD lower estimates here; `certkd bounds --certified-gamma` "
              "gives certified upper bounds). A certified 'yes' with a small rho says little about the teacher's "
              "robustness at larger eps: read the empirical part beside it.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
