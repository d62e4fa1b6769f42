"""``certkd demo``: the paper's story on the embedded digits data, end to end.

A PGD-AT teacher (cnn4), a KD student and a KDIGA student (a smaller MLP) are
trained (theory.md §4); all three are certified with CROWN over an eps grid with
per-example certified radii (§2.1) and attacked with APGD (per-example attack radii,
estimates); each student is compared with the teacher on the same points, in a
certified and an empirical part with the headline of §6; the transfer-bound terms of
§3 are computed. Every step is resumable: trained checkpoints and finished
certification records are reused when the demo runs again into the same folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bounds.transfer import transfer_bound
from certkd.certification import CertifyJob, CertifyOptions, prepare_methods
from certkd.checkpoint import load_checkpoint, load_model
from certkd.commands.certify import CERTIFY, certify_run, checkpoint_sources
from certkd.commands.compare import CompareJob, judge
from certkd.data import Points, load_dataset
from certkd.io import atomic_write_json
from certkd.run import Run, RunSettings
from certkd.runs import seed_stream
from certkd.train import ObjectiveParams as TrainParams
from certkd.train import TrainConfig, train

ATTACK = "apgd"  # the attack of the empirical part (certify method apgd: attack radii, estimates)
#: the training settings the report states for each model
TRAINING_KEYS = ("method", "arch", "arch_kwargs", "epochs", "batch_size", "lr", "optimizer", "schedule", "seed",
                 "eps", "norm", "attack_steps", "alpha", "tau", "iga_weight", "iga_norm", "iga_on")
TEACHER: tuple[str, dict[str, Any]] = ("cnn4", {})
STUDENT: tuple[str, dict[str, Any]] = ("mlp", {"hidden": [64]})


@dataclass
class DemoSettings:
    """What the demo trains and measures (``quick`` shrinks epochs and points)."""

    seed: int = 0
    train_eps: float = 0.2  # L-inf radius of the teacher's PGD-AT
    student_eps: float = 0.15  # radius the students' validation PGD accuracy is measured at
    iga_weight: float = 1.0
    teacher_epochs: int = 20
    student_epochs: int = 20
    num_examples: int = 300
    eps_grid: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15])
    transfer_eps: float = 0.05
    transfer_examples: int = 100
    method: str = "crown"
    norm: str = "inf"

    @classmethod
    def make(cls, quick: bool, seed: int) -> DemoSettings:
        if quick:  # the same models, fewer evaluated points
            return cls(seed=seed, num_examples=60, transfer_examples=30)
        return cls(seed=seed)


@dataclass
class ModelRun:
    """One trained model and what certification said about it."""

    name: str
    path: Path
    summary: dict[str, Any]
    radius: torch.Tensor  # (N,) certified radius per evaluated point (0 when misclassified)
    attack: torch.Tensor  # (N,) APGD attack radius (an estimate; inf when no adversarial example was found)
    correct: torch.Tensor  # (N,) clean prediction is right
    training: dict[str, Any]  # the checkpoint's training settings (method, arch, eps, epochs, lr, seed, ...)


def train_trio(out: Path, settings: DemoSettings, progress: bool = False) -> dict[str, Path]:
    """Train (or resume) the teacher and its KD and KDIGA students (theory.md §4).

    Parameters
    ----------
    out : Path
        Folder of the three checkpoints (training resumes there).
    settings : DemoSettings
        Radii, epochs, iga weight, seed.
    progress : bool
        Progress bars.

    Returns
    -------
    dict of str to Path
        ``teacher``, ``kd`` and ``kdiga`` checkpoints.
    """
    common: dict[str, Any] = {"val_size": 200, "val_attack_steps": 10, "progress": progress, "seed": settings.seed,
                              "resume": True}
    teacher = train(TrainConfig(
        method="pgd-at", arch=TEACHER[0], arch_kwargs=TEACHER[1], out=out / "teacher.pt",
        epochs=settings.teacher_epochs, batch_size=128, lr=0.1,
        params=TrainParams(eps=settings.train_eps, norm="inf", attack_steps=5), **common))
    paths = {"teacher": teacher}
    for method, params in (("kd", TrainParams(eps=settings.student_eps)),
                           ("kdiga", TrainParams(eps=settings.student_eps, iga_weight=settings.iga_weight,
                                                 iga_norm="2"))):
        paths[method] = train(TrainConfig(
            method=method, arch=STUDENT[0], arch_kwargs=STUDENT[1], teacher=teacher, out=out / f"{method}.pt",
            epochs=settings.student_epochs, batch_size=64, lr=0.05, params=params, **common))
    return paths


def certify_trained(name: str, path: Path, data: Points, count: int, settings: DemoSettings,
                    records_path: Path, overwrite: bool = False, progress: bool = False) -> ModelRun:
    """CROWN certified accuracy and APGD accuracy on the eps grid, per-example radii of both, of one model.

    Parameters
    ----------
    name : str
        ``teacher``, ``kd`` or ``kdiga``.
    path : Path
        Its checkpoint.
    data : Points
        The digits test split.
    count : int
        Certify the first ``count`` points.
    settings : DemoSettings
        Method, norm, eps grid, seed.
    records_path : Path
        The record log: resumed when its configuration (checkpoint hash included) is
        unchanged; a different configuration is refused unless ``overwrite``.
    overwrite, progress : bool
        Recompute a log of another configuration; progress bars.

    Returns
    -------
    ModelRun
        The summary, per-example radii and clean correctness.
    """
    ckpt = load_checkpoint(path)
    model = ckpt.build_model("cpu")
    job = CertifyJob(methods=[settings.method, ATTACK], eps=list(settings.eps_grid), norm=settings.norm, radius=True,
                     batch_size=50, seed=settings.seed, params=CertifyOptions(pgd_steps=20))
    ctx = prepare_methods(model, ckpt.input_shape, job.all_methods(), job.norm, job.params)
    run = Run.start(CERTIFY, RunSettings(resume=True, overwrite=overwrite, progress=progress), records_path)
    certify_run(run, ctx, data, job, checkpoint_sources(path, ckpt, "digits", "test", count))
    summary = run.summarize()[0]
    radius = torch.zeros(count, dtype=torch.float64)
    attack = torch.zeros(count, dtype=torch.float64)
    correct = torch.zeros(count, dtype=torch.bool)
    for r in run.records:
        i = int(r["index"])
        if r["method"] == settings.method:
            radius[i] = float(r["radius"])
            correct[i] = int(r["pred"]) == int(r["label"])
        elif r["method"] == ATTACK:
            attack[i] = float("inf") if r["radius"] is None else float(r["radius"])
    training = {k: ckpt.config.get(k) for k in TRAINING_KEYS if k in ckpt.config}
    return ModelRun(name, path, summary, radius, attack, correct, training)


def transfer_terms(student: Path, teacher: Path, x: torch.Tensor, y: torch.Tensor, settings: DemoSettings
                   ) -> dict[str, Any]:
    """Mean transfer-bound terms (theory.md §3) with PGD gammas (estimates) on a subset.

    Parameters
    ----------
    student, teacher : Path
        Checkpoints.
    x, y : torch.Tensor
        The points.
    settings : DemoSettings
        ``transfer_eps``, norm, seed (the stream is ``seed_stream(seed, "transfer", student name)``).

    Returns
    -------
    dict
        Means and per-example values of each term, the mean gradient gap, how often the bound holds.
    """
    tb = transfer_bound(load_model(student), load_model(teacher), x, y, settings.transfer_eps, settings.norm,
                        generator=seed_stream(settings.seed, "transfer", student.stem))
    check = tb.check()
    terms = {"output_gap": tb.output_gap, "eps * gradient_gap": settings.transfer_eps * tb.gradient_gap,
             "gamma_student": tb.gamma_student, "gamma_teacher": tb.gamma_teacher,
             "robust_loss_teacher": tb.robust_teacher, "bound": tb.bound, "robust_loss_student": tb.robust_student}
    return {
        "eps": settings.transfer_eps, "norm": settings.norm, "kind": "estimate",
        "mean": {k: float(v.double().mean()) for k, v in terms.items()},
        "gradient_gap_mean": float(tb.gradient_gap.double().mean()),
        "bound_holds_fraction": float(check.holds.double().mean()),
        "per_example": {k: v.tolist() for k, v in terms.items()},
    }


def run_demo(out: Path, quick: bool = False, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Run every step into ``out``; writes ``results.json``, ``report.md`` and PNG figures.

    Parameters
    ----------
    out : Path
        The demo's folder; running again into it reuses finished checkpoints and records.
    quick : bool
        Certify and compare fewer points.
    seed : int
        Fixes every step on CPU.
    overwrite : bool
        Recompute certification records that a run with other settings left in ``out``
        (without it, such records are refused with one sentence).
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    from certkd.report import write_demo_report

    settings = DemoSettings.make(quick, seed)
    out = Path(out)
    ckpts = train_trio(out / "checkpoints", settings, progress)
    data = load_dataset("digits", "test")
    count = min(settings.num_examples, len(data))
    runs = {name: certify_trained(name, path, data, count, settings, out / "records" / f"{name}.jsonl", overwrite,
                                  progress) for name, path in ckpts.items()}
    teacher = runs["teacher"]
    comparisons, transfers = {}, {}
    xt, yt = data.batch(list(range(min(settings.transfer_examples, count))))
    rule = CompareJob(method=settings.method, norm=settings.norm, attack=ATTACK, seed=seed)
    for student in ("kd", "kdiga"):
        s = runs[student]
        radii = {"radius_student": s.radius, "radius_teacher": teacher.radius, "attack_student": s.attack,
                 "attack_teacher": teacher.attack}
        comparisons[student] = judge(radii, s.correct, teacher.correct, rule)
        transfers[student] = transfer_terms(s.path, teacher.path, xt, yt, settings)
    results = {
        "settings": asdict(settings),
        "models": {name: {"checkpoint": str(r.path), "certification": r.summary, "training": r.training,
                          "radius": r.radius.tolist(),
                          "attack_radius": [None if math.isinf(v) else v for v in r.attack.tolist()]}
                   for name, r in runs.items()},
        "comparisons": comparisons,
        "transfer": transfers,
    }
    atomic_write_json(out / "results.json", results)
    write_demo_report(out, results)
    return results


def _rho_text(rho: float | None) -> str:
    return "undefined" if rho is None else f"{rho:.3g}"


def format_demo(results: dict[str, Any], out: Path) -> str:
    """The text ``certkd demo`` prints: verdicts, transfer terms, clean accuracies.

    Parameters
    ----------
    results : dict
        From :func:`run_demo`.
    out : Path
        The demo's folder.

    Returns
    -------
    str
        One line per comparison and per transfer study, then the clean accuracies as JSON.
    """
    lines = [f"certkd demo: results in {out}/report.md and {out}/results.json"]
    for name, c in results["comparisons"].items():
        label = f"; certified part {c['certified_label']}" if c["certified_label"] else ""
        lines.append(f"  {name:5s} student vs teacher: {c['verdict']:12s} (certified part {c['certified']['verdict']}, "
                     f"empirical part {c['empirical']['verdict']}; rho {_rho_text(c['rho'])}{label})")
    lines += [f"  {name:5s} gradient gap at x (mean) {t['gradient_gap_mean']:.4f}; transfer bound (PGD gammas, an "
              f"estimate) holds on {100 * t['bound_holds_fraction']:.0f}% of points"
              for name, t in results["transfer"].items()]
    lines.append(json.dumps({n: m["certification"]["clean_accuracy"]["accuracy"] for n, m in results["models"].items()}))
    return "\n".join(lines)
