"""Figures of the theory commands (``certkd bounds``, ``certkd compare``), saved as PNG (Agg backend).

Every function takes plain sequences, writes one file atomically and returns its path;
axis labels carry the kind of each number (certified / estimate).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from certkd.io import atomic_write  # noqa: E402

STUDENT_COLOR = "#d95f02"
TEACHER_COLOR = "#1b9e77"


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
    return path


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def plot_certified_accuracy(eps: Sequence[float], accuracy_student: Sequence[float],
                            accuracy_teacher: Sequence[float], path: str | Path, kind: str = "certified",
                            ci_low: Sequence[float] | None = None, ci_high: Sequence[float] | None = None,
                            norm: str = "inf") -> Path:
    """Certified (or estimated) accuracy against eps for student and teacher, CI of the difference shaded."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(eps, accuracy_teacher, marker="o", color=TEACHER_COLOR, label="teacher")
    ax.plot(eps, accuracy_student, marker="s", color=STUDENT_COLOR, label="student")
    if ci_low is not None and ci_high is not None:
        base = np.asarray(accuracy_teacher, dtype=float)
        ax.fill_between(eps, base + np.asarray(ci_low), base + np.asarray(ci_high), color=STUDENT_COLOR,
                        alpha=0.15, label="teacher + CI of (student - teacher)")
    ax.set_xlabel(f"eps (L-{norm} radius)")
    ax.set_ylabel(f"{kind} accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    return _save(fig, path)


def plot_radius_scatter(radius_student: Sequence[float], radius_teacher: Sequence[float], path: str | Path,
                        kind: str = "certified", norm: str = "inf") -> Path:
    """Per-example ``r_S`` against ``r_T`` with the diagonal ``r_S = r_T``."""
    sns.set_theme(style="whitegrid")
    rs, rt = np.asarray(radius_student, dtype=float), np.asarray(radius_teacher, dtype=float)
    keep = np.isfinite(rs) & np.isfinite(rt)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(rt[keep], rs[keep], s=12, alpha=0.6, color=STUDENT_COLOR, edgecolor="none")
    top = float(max(rs[keep].max(initial=0.0), rt[keep].max(initial=0.0))) or 1.0
    ax.plot([0, top], [0, top], color="black", lw=1, ls="--", label="r_S = r_T")
    ax.set_xlabel(f"teacher radius r_T ({kind}, L-{norm})")
    ax.set_ylabel(f"student radius r_S ({kind}, L-{norm})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_bound_vs_measured(bounds: Mapping[str, Sequence[float]], measured: Sequence[float],
                           path: str | Path) -> Path:
    """Transfer bounds (one series per kind) against the student's PGD-measured robust loss; diagonal marks 'holds'."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    m = np.asarray(measured, dtype=float)
    top = float(_finite(m).max(initial=0.0))
    for (label, values), color in zip(bounds.items(), sns.color_palette("deep"), strict=False):
        b = np.asarray(values, dtype=float)
        keep = np.isfinite(b) & np.isfinite(m)
        ax.scatter(m[keep], b[keep], s=12, alpha=0.6, color=color, edgecolor="none", label=label)
        top = max(top, float(b[keep].max(initial=0.0)))
    ax.plot([0, top], [0, top], color="black", lw=1, ls="--", label="bound = measured")
    ax.set_xlabel("student robust loss, PGD on CE (estimate)")
    ax.set_ylabel("transfer bound on the student's robust loss")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_terms(terms: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Distribution of every transfer-bound term over the examples (box plot, one box per term)."""
    sns.set_theme(style="whitegrid")
    names = list(terms)
    data = [_finite(terms[n]) for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_xlabel("term of the transfer bound (theory.md §3)")
    ax.set_ylabel("value per example")
    return _save(fig, path)
