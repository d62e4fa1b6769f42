"""Figures of the theory commands (``certkd bounds``, ``certkd compare``), saved as PNG (Agg backend).

Every function writes one file atomically and returns its path. Every figure has a
title naming the model(s), the method and the number of points; axis labels carry the
kind of each number (certified / estimate) and the eps units; axis limits follow the
data (never a range that leaves the points in a corner); legends sit outside the data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from certkd.io import atomic_write  # noqa: E402

STUDENT_COLOR = "#d95f02"
TEACHER_COLOR = "#1b9e77"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
    return path


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.asarray([math.nan if v is None else v for v in values], dtype=float)
    finite: np.ndarray = arr[np.isfinite(arr)]
    return finite


def data_limits(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    """Axis limits around the finite ``values`` with ``pad`` of their span on each side.

    Examples
    --------
    >>> data_limits([2.0, 2.5])
    (1.975, 2.525)
    """
    v = _finite(values)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi), 1e-3)
    return lo - pad * span, hi + pad * span


def eps_axis_label(norm: str) -> str:
    """The eps axis of every figure: the ball and its units."""
    return f"eps (L-{norm} radius, input units in [0, 1])"


def _legend_below(ax: Axes, ncol: int = 2) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol, fontsize=8, frameon=False)


PART_TITLES = {"certified": "certified part", "empirical": "empirical part (estimate)"}
ACCURACY_LABELS = {"certified": "certified accuracy", "empirical": "attack accuracy (estimate, upper bound)"}


def model_names(summary: Mapping[str, Any]) -> tuple[str, str]:
    """Short names of the student and the teacher of a summary, for figure titles (its checkpoints' file names
    when its provenance has them)."""
    prov = summary.get("provenance") or {}
    return (Path(prov["student"]).stem if "student" in prov else "student",
            Path(prov["teacher"]).stem if "teacher" in prov else "teacher")


def _role(role: str, name: str) -> str:
    return role if name == role else f"{role} ({name})"


def plot_part(summary: Mapping[str, Any], part: str, names: tuple[str, str], path: str | Path) -> Path:
    """One part of ``certkd compare``: both accuracy curves, and the difference S - T with its CI band.

    The lower panel draws what the verdict tests: the paired bootstrap CI of the accuracy
    difference at each eps, against 0 and ``-margin``.
    """
    sns.set_theme(style="whitegrid")
    p, rule = summary[part], summary["rule"]
    norm = summary["config"]["norm"]
    eps = [r["eps"] for r in p["table"]]
    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(eps, [r["accuracy_teacher"] for r in p["table"]], marker="o", color=TEACHER_COLOR,
            label=_role("teacher", names[1]))
    ax.plot(eps, [r["accuracy_student"] for r in p["table"]], marker="s", color=STUDENT_COLOR,
            label=_role("student", names[0]))
    cover = summary["coverage"]["certified" if part == "certified" else "empirical"]
    if cover is not None and cover < max(eps, default=0):
        ax.axvspan(cover, max(eps), color="grey", alpha=0.12, lw=0,
                   label=f"beyond this part's coverage (eps > {cover:.3g})")
    ax.set_ylabel(ACCURACY_LABELS[part])
    ax.set_ylim(-0.03, 1.03)
    level = f"{rule['ci_level']:.0%}"
    diff = [r["difference"] for r in p["table"]]
    ax_d.fill_between(eps, [r["ci_low"] for r in p["table"]], [r["ci_high"] for r in p["table"]],
                      color=STUDENT_COLOR, alpha=0.25, lw=0, label=f"{level} paired bootstrap CI of S - T")
    ax_d.plot(eps, diff, marker="s", color=STUDENT_COLOR, label="S - T")
    ax_d.axhline(0, color="black", lw=0.8)
    ax_d.axhline(-rule["margin"], color="black", lw=0.8, ls="--", label=f"-margin ({rule['margin']:g})")
    lows = [r["ci_low"] for r in p["table"]] + [-rule["margin"]]
    highs = [r["ci_high"] for r in p["table"]] + [0.0]
    ax_d.set_ylim(*data_limits(lows + highs, pad=0.1))
    ax_d.set_ylabel("difference S - T")
    ax_d.set_xlabel(eps_axis_label(norm))
    verdict = p["verdict"].upper()
    label = summary.get("certified_label") if part == "certified" else None
    ax.set_title(f"{PART_TITLES[part]}: {p['radii']}\n{names[0]} vs {names[1]}, n = {summary['n']} points; "
                 f"part says {verdict}{'; ' + label if label else ''}", fontsize=10)
    handles = [h for a in (ax, ax_d) for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in (ax, ax_d) for lab in a.get_legend_handles_labels()[1]]
    ax_d.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
    return _save(fig, path)


def _scatter_pair(ax: Axes, rs: Sequence[float | None], rt: Sequence[float | None], what: str,
                  norm: str) -> int:
    """``r_S`` against ``r_T`` with the diagonal, limits from the data; returns the points not drawn (inf)."""
    s = np.asarray([math.inf if v is None else v for v in rs], dtype=float)
    t = np.asarray([math.inf if v is None else v for v in rt], dtype=float)
    keep = np.isfinite(s) & np.isfinite(t)
    ax.scatter(t[keep], s[keep], s=14, alpha=0.6, color=STUDENT_COLOR, edgecolor="none", label="one point")
    lo, hi = data_limits(np.concatenate([s[keep], t[keep]]).tolist())
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="student = teacher")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"teacher {what} (L-{norm})")
    ax.set_ylabel(f"student {what} (L-{norm})")
    return int((~keep).sum())


def plot_radius_pairs(summary: Mapping[str, Any], names: tuple[str, str], path: str | Path) -> Path:
    """Per-example radii of ``certkd compare``: certified ``r_S`` vs ``r_T`` and attack ``a_S`` vs ``a_T``."""
    sns.set_theme(style="whitegrid")
    norm = summary["config"]["norm"]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.8))
    fig.subplots_adjust(wspace=0.32)
    for ax, part, (s_key, t_key), what in (
            (axes[0], "certified", ("radius_student", "radius_teacher"), "certified radius r"),
            (axes[1], "empirical", ("attack_student", "attack_teacher"), "attack radius a (estimate)")):
        hidden = _scatter_pair(ax, summary[s_key], summary[t_key], what, norm)
        note = f"; {hidden} with no adversarial example found not drawn" if hidden else ""
        ax.set_title(f"{PART_TITLES[part]}: {summary[part]['radii']}{note}", fontsize=9)
    _legend_below(axes[0])
    fig.suptitle(f"per-example radii, {_role('student', names[0])} vs {_role('teacher', names[1])}, "
                 f"n = {summary['n']}",
                 fontsize=11)
    return _save(fig, path)


def plot_bound_vs_measured(bounds: Mapping[str, Sequence[float]], measured: Sequence[float],
                           path: str | Path, title: str) -> Path:
    """Transfer bounds (one series per kind) against the student's PGD-measured robust loss; diagonal marks 'holds'.

    Both axes cover the data (not from 0): a bound that holds lies above the diagonal.
    """
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    m = np.asarray(measured, dtype=float)
    drawn: list[float] = list(_finite(measured))
    for (label, values), color in zip(bounds.items(), sns.color_palette("deep"), strict=False):
        b = np.asarray(values, dtype=float)
        keep = np.isfinite(b) & np.isfinite(m)
        ax.scatter(m[keep], b[keep], s=14, alpha=0.6, color=color, edgecolor="none", label=label)
        drawn += b[keep].tolist()
    lo, hi = data_limits(drawn)
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="bound = measured")
    ax.set_xlim(*data_limits(_finite(measured).tolist()))
    ax.set_ylim(lo, hi)
    ax.set_xlabel("student robust loss, PGD on CE (estimate)")
    ax.set_ylabel("transfer bound on the student's robust loss")
    ax.set_title(title, fontsize=10)
    _legend_below(ax)
    return _save(fig, path)


def plot_terms(terms: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Distribution of every transfer-bound term over the examples (box plot, one box per term)."""
    sns.set_theme(style="whitegrid")
    names = list(terms)
    data = [_finite(terms[n]) for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 4.2))
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_xlabel("term of the transfer bound (theory.md §3)")
    ax.set_ylabel("value per example (CE loss units)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def eps_tag(eps: float) -> str:
    """The eps part of a figure's file name, the value written out.

    Examples
    --------
    >>> eps_tag(0.03), eps_tag(2 / 255)
    ('eps0.03', 'eps0.007843')
    """
    return f"eps{eps:.4g}"
