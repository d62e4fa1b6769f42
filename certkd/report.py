"""Markdown reports and multi-model figures for ``certkd demo`` and ``certkd ablate``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from certkd.io import atomic_write_text  # noqa: E402
from certkd.plots import _save, plot_radius_scatter  # noqa: E402

MODEL_LABELS = {"teacher": "teacher (PGD-AT, cnn4)", "kd": "KD student (mlp)", "kdiga": "KDIGA student (mlp)"}


def plot_accuracy_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                         ylabel: str, xlabel: str, dashed: Mapping[str, tuple[Sequence[float], Sequence[float]]]
                         | None = None) -> Path:
    """One line per model: accuracy against eps; ``dashed`` curves (estimates) share each model's colour."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = dict(zip(curves, sns.color_palette("deep", len(curves)), strict=True))
    for name, (eps, acc) in curves.items():
        ax.plot(eps, acc, marker="o", color=colors[name], label=name)
    for name, (eps, acc) in (dashed or {}).items():
        ax.plot(eps, acc, ls="--", marker="x", color=colors.get(name), alpha=0.8, label=f"{name}: PGD (estimate)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grouped_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, ylabel: str, xlabel: str) -> Path:
    """Bars of ``groups[series][category]``: one colour per series, categories on the x axis."""
    sns.set_theme(style="whitegrid")
    series = list(groups)
    categories = list(next(iter(groups.values())))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(categories) + 2.5, 4.2))
    for i, (name, color) in enumerate(zip(series, sns.color_palette("deep", len(series)), strict=True)):
        pos = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
        ax.bar(pos, [groups[name][c] for c in categories], width, color=color, label=name)
    ax.set_xticks(np.arange(len(categories)), categories, rotation=25, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _pct(v: float) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _cell(summary: dict[str, Any], method: str, eps: float) -> float:
    for r in summary["results"]:
        if r["method"] == method and abs(r["eps"] - eps) < 1e-12:
            return r["accuracy"]
    return float("nan")


def write_demo_report(out: Path, results: dict[str, Any]) -> Path:
    """``out/report.md`` with tables, verdicts and figures, from the demo's ``results``."""
    s = results["settings"]
    eps, method, norm = s["eps_grid"], s["method"], s["norm"]
    models = results["models"]
    fig_dir = out / "figures"
    plot_accuracy_curves(
        {MODEL_LABELS[n]: (eps, [_cell(m["certification"], method, e) for e in eps]) for n, m in models.items()},
        fig_dir / "certified_accuracy.png", f"accuracy ({method.upper()} certified; PGD dashed)",
        f"eps (L-{norm} radius, pixel units in [0, 1])",
        dashed={MODEL_LABELS[n]: (eps, [_cell(m["certification"], "pgd", e) for e in eps]) for n, m in models.items()})
    for student in ("kd", "kdiga"):
        plot_radius_scatter(models[student]["radius"], models["teacher"]["radius"],
                            fig_dir / f"radius_{student}_vs_teacher.png",
                            f"{MODEL_LABELS[student]} vs {MODEL_LABELS['teacher']}, {method.upper()}, "
                            f"n = {s['num_examples']}", kind=f"certified {method.upper()}", norm=norm)
    terms = ("output_gap", "eps * gradient_gap", "gamma_student", "gamma_teacher", "robust_loss_teacher", "bound",
             "robust_loss_student")
    plot_grouped_bars({MODEL_LABELS[k]: {t: v["mean"][t] for t in terms} for k, v in results["transfer"].items()},
                      fig_dir / "transfer_terms.png", "mean over points (CE loss units)",
                      f"transfer-bound term at eps {s['transfer_eps']:g} (PGD gammas: estimates)")

    lines = ["# certkd demo: does robustness transfer through distillation?", "",
             "A PGD-AT teacher (cnn4) was distilled into two small MLP students on the embedded `digits` data "
             "(8x8 grey images, 450 test points): one with plain KD, one with KDIGA (KD plus input-gradient "
             f"alignment, weight {s['iga_weight']:g}). All three were certified with {method.upper()} "
             f"(auto_LiRPA) on the first {s['num_examples']} test points under L-{norm}.", "",
             "Labels: **certified** numbers are proofs (never contradicted by an attack); **estimate** numbers "
             "come from attacks or sampling (PGD accuracy is an upper bound of robust accuracy).", "",
             f"## Certified accuracy ({method.upper()}, certified) and PGD accuracy (estimate)", "",
             "| model | clean | " + " | ".join(f"eps {e:g}" for e in eps) + " | median radius |",
             "|---|---|" + "---|" * len(eps) + "---|"]
    for name, m in models.items():
        cert = m["certification"]
        radius = next((r for r in cert["radius"] if r["method"] == method), {})
        row = [f"{_pct(_cell(cert, method, e))} (PGD {_pct(_cell(cert, 'pgd', e))})" for e in eps]
        lines.append(f"| {MODEL_LABELS[name]} | {_pct(cert['clean_accuracy']['accuracy'])} | " + " | ".join(row)
                     + f" | {radius.get('median', float('nan')):.4f} |")
    sound = {n: m["certification"]["soundness"] for n, m in models.items()}
    lines += ["", "Soundness cross-check: " + ", ".join(
        f"{n}: {v['contradictions']} of {v['certified_checked_by_pgd']} certified cells broken by PGD"
        for n, v in sound.items()) + " (must be 0).", "", "![certified accuracy](figures/certified_accuracy.png)", "",
        "## Does the student certify at least as robustly as the teacher?", "",
        "Paired over the same points: per-example certified radii r_S and r_T, the fraction with "
        "r_S >= r_T - tol, a one-sided Wilcoxon signed-rank test, and bootstrap confidence intervals of the "
        "certified-accuracy difference at each eps.", "",
        "| student | verdict | r_S >= r_T - tol | Wilcoxon p (student smaller) | median r_S - r_T | why |",
        "|---|---|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        lines.append(f"| {MODEL_LABELS[name]} | **{c['verdict']}** | {_pct(c['at_least_fraction'])} | "
                     f"{c['wilcoxon_p_less']:.3g} | {c['median_radius_difference']:.4f} | {c['reason']} |")
    lines += ["", "![KD radii](figures/radius_kd_vs_teacher.png) ![KDIGA radii](figures/radius_kdiga_vs_teacher.png)",
              "", f"## The transfer bound, term by term (theory.md §3, eps {s['transfer_eps']:g}, estimates)", "",
              "loss_S(x+delta) <= robust loss of T + [loss_S(x) - loss_T(x)] + eps ||grad loss_S - grad loss_T||_q "
              "+ gamma_S + gamma_T. KD shrinks the output gap only; KDIGA also shrinks the gradient gap.", "",
              "| student | output gap | eps x gradient gap | gamma_S | gamma_T | teacher robust loss | bound "
              "| student robust loss (PGD) | bound holds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in results["transfer"].items():
        m = t["mean"]
        lines.append(f"| {MODEL_LABELS[name]} | " + " | ".join(f"{m[k]:.4f}" for k in terms)
                     + f" | {_pct(t['bound_holds_fraction'])} |")
    lines += ["", "![transfer terms](figures/transfer_terms.png)", "",
              "What the numbers mean: the gradient gap is the term KDIGA trains down; with a smaller gradient gap "
              "the student's robust loss is tied more closely to the teacher's, and its certified radii follow "
              "the teacher's more closely. gamma terms measure how far each model is from linear on the ball "
              "(PGD lower estimates here; `certkd bounds --certified-gamma` gives certified upper bounds).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
