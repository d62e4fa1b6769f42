"""The bound methods proven on a device: one table of throughput and soundness checks.

Run through ``bench/gpu_check.sh`` (which installs auto_LiRPA from wheels carried in the
working tree first). Rows, all on CIFAR-shaped inputs (3x32x32, uniform in [0, 1], seed 0;
labels = the model's own clean predictions, so every point starts correctly classified):

- ``crown`` / ``ibp``: certified accuracy of cnn7 at L-inf 2/255; check: no certified point
  is broken by PGD (20 steps);
- ``radius``: CROWN certified radii (``BoundEngine.certified_radius``); check: every radius
  is at most the attack's upper end and survives a 50-step PGD at that radius;
- ``clever``: CLEVER scores (an **estimate**), 8 batches x 128 = 1,024 samples per point;
  check: all finite and in [0, R];
- ``kd-epoch`` / ``kdiga-epoch``: one training epoch of resnet18 (KD, then KDIGA, same
  teacher and data); the KDIGA row's result is its time over KD's (side by side, one run);
- ``ibp-epoch`` / ``crown-ibp-epoch``: one certified-training epoch (10,000 points) of cnn7 (BatchNorm) at
  L-inf 8/255, mid-ramp (kappa 0.5, beta 0.5: the CROWN pass runs), bounds by auto_LiRPA with
  gradients; the CROWN-IBP row's result is its time over IBP's. The full CNN7 runs compared
  with CTBench are ``bench/certified_cnn7.sh``;
- ``cpu-agree``: CROWN lower bounds on the device against the same bounds on the CPU;
  check: max abs difference <= 1e-4 (relative to max(1, |bound|)).

``--small`` shrinks every size (the model widths, and the inputs to 3x16x16) so that the whole table takes about
half a minute on a CPU: CI runs ``bench/gpu_check.sh --backend installed --device cpu --small``
and checks the table's columns (tests/test_gpu_check.py).

    bash bench/gpu_check.sh --device cuda              # the device run (bench/README.md)
    bash bench/gpu_check.sh --backend installed --device cpu --small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bounds.attack import pgd
from bounds.certify import BoundEngine
from bounds.clever import clever
from certkd.models import create_model
from certkd.train.losses import LossBatch, ObjectiveParams, get_loss
from certkd.train.trainer import compute_loss, optimizer_step

COLUMNS = ("task", "points", "device", "seconds", "result", "check")
EPS = 2 / 255
AGREE_TOL = 1e-4
CERTIFIED_EPOCH_POINTS = 10_000
"""Points of the certified-training epochs (a fifth of CIFAR-10's training set: CROWN-IBP is the slow one)."""


@dataclass(frozen=True)
class Sizes:
    """How much each row does (``FULL`` is the issue's device run, ``SMALL`` the CI smoke run)."""

    certify_points: int
    radius_points: int
    clever_points: int
    clever_batches: int
    train_points: int
    agree_points: int
    cnn7: dict[str, Any]
    resnet18: dict[str, Any]
    batch_size: int
    train_batch: int
    shape: tuple[int, int, int] = (3, 32, 32)


FULL = Sizes(10_000, 1_000, 1_000, 8, 50_000, 256, {}, {}, 256, 256)
SMALL = Sizes(16, 2, 2, 2, 64, 4, {"width": 4, "linear": 32}, {"width": 4}, 16, 32, (3, 16, 16))


@dataclass
class Row:
    task: str
    points: int
    device: str
    seconds: float
    result: str
    check: str
    ok: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _points(n: int, sizes: Sizes, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *sizes.shape), generator=torch.Generator().manual_seed(seed)).to(device)


def _labels(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def certify_rows(model: torch.nn.Module, engine: BoundEngine, sizes: Sizes, device: torch.device) -> list[Row]:
    """Certified accuracy with CROWN and IBP at 2/255; no certified point may fall to PGD."""
    x = _points(sizes.certify_points, sizes, device)
    y = _labels(model, x, sizes.batch_size)
    rows = []
    for method in ("crown", "ibp"):
        bounds, seconds = _timed(device, lambda m=method: engine.margin_bounds(x, y, EPS, "inf", m))
        certified = bounds.certified
        broken = 0
        if bool(certified.any()):
            attack = pgd(model, x[certified], y[certified], EPS, "inf", steps=20,
                         generator=torch.Generator(device=device).manual_seed(1))
            broken = int((attack.margin <= 0).sum())
        rows.append(Row(method, len(x), str(device), seconds,
                        f"certified acc {float(certified.float().mean()):.3f} at L-inf 2/255",
                        f"{broken} of {int(certified.sum())} certified broken by PGD-20", broken == 0))
    return rows


def radius_row(model: torch.nn.Module, engine: BoundEngine, sizes: Sizes, device: torch.device) -> Row:
    """CROWN certified radii; each at most the attack's upper end and unbroken by PGD-50 at the radius."""
    x = _points(sizes.radius_points, sizes, device, seed=1)
    y = _labels(model, x, sizes.batch_size)
    res, seconds = _timed(device, lambda: engine.certified_radius(
        x, y, "inf", "crown", eps_max=0.1, tol=1e-3, generator=torch.Generator(device=device).manual_seed(2)))
    ok = res.correct & (res.radius > 0)
    broken = 0
    if bool(ok.any()):
        attack = pgd(model, x[ok], y[ok], res.radius[ok], "inf", steps=50,
                     generator=torch.Generator(device=device).manual_seed(3))
        broken = int((attack.margin <= 0).sum())
    above = int((res.radius > res.upper + 1e-12).sum())
    return Row("radius", len(x), str(device), seconds,
               f"median radius {float(res.radius.median()):.5f} ({res.passes} passes)",
               f"{broken} broken at their radius, {above} above the attack", broken == 0 and above == 0)


def clever_row(model: torch.nn.Module, sizes: Sizes, device: torch.device) -> Row:
    """CLEVER scores (an estimate): finite and within [0, R]."""
    x = _points(sizes.clever_points, sizes, device, seed=2)
    y = _labels(model, x, sizes.batch_size)
    radius = 0.5
    res, seconds = _timed(device, lambda: clever(model, x, y, "inf", radius, n_batches=sizes.clever_batches,
                                                 batch_size=128,
                                                 generator=torch.Generator(device=device).manual_seed(4)))
    score = res.score
    ok = bool(torch.isfinite(score).all()) and bool(((score >= 0) & (score <= radius)).all())
    return Row("clever", len(x), str(device), seconds,
               f"median score {float(score.median()):.5f} (estimate, {sizes.clever_batches * 128} samples)",
               "finite, in [0, R]" if ok else "non-finite or out of [0, R]", ok)


def _epoch(method: str, teacher: torch.nn.Module | None, sizes: Sizes, device: torch.device, seed: int,
           arch: str = "resnet18", points: int | None = None) -> float:
    """Seconds of one epoch of ``method`` on ``points`` (default ``sizes.train_points``) CIFAR-shaped points
    (mid-ramp for the certified methods)."""
    total = sizes.train_points if points is None else points
    torch.manual_seed(seed)
    student = create_model(arch, 10, sizes.shape, **(sizes.resnet18 if arch == "resnet18" else sizes.cnn7))
    student = student.to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    params = ObjectiveParams(eps=8 / 255, iga_weight=1.0, crown_beta_end=0.0).resolved()
    spec = get_loss(method)
    generator = torch.Generator(device=device).manual_seed(seed)

    def step(start: int) -> None:
        n = min(sizes.train_batch, total - start)
        x = _points(n, sizes, device, seed=start + 7)
        y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(start)).to(device)
        batch = LossBatch(x=x, y=y, student=student, student_bare=student, teacher=teacher, generator=generator,
                          ramp=0.5, eps_factor=0.5)
        optimizer_step(compute_loss(spec, params, batch)["loss"], optimizer, scaler)

    def run() -> None:
        for start in range(0, total, sizes.train_batch):
            step(start)

    step(0)  # warm-up (kernels, allocator), not timed
    return float(_timed(device, run)[1])


def train_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    """A KD epoch and a KDIGA epoch of resnet18 (same teacher and data); KDIGA's time over KD's."""
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10, sizes.shape, **sizes.resnet18).to(device).eval().requires_grad_(False)
    kd = _epoch("kd", teacher, sizes, device, seed=5)
    kdiga = _epoch("kdiga", teacher, sizes, device, seed=5)
    ok = math.isfinite(kd) and math.isfinite(kdiga)
    return [Row("kd-epoch", sizes.train_points, str(device), kd, "resnet18, one epoch", "ran", ok),
            Row("kdiga-epoch", sizes.train_points, str(device), kdiga, f"{kdiga / kd:.2f}x the KD epoch",
                "ran", ok)]


def certified_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    """An IBP epoch and a CROWN-IBP epoch of cnn7 with BatchNorm (same data); CROWN-IBP's time over IBP's."""
    points = min(sizes.train_points, CERTIFIED_EPOCH_POINTS)
    ibp = _epoch("ibp", None, sizes, device, seed=5, arch="cnn7", points=points)
    crown = _epoch("crown-ibp", None, sizes, device, seed=5, arch="cnn7", points=points)
    ok = math.isfinite(ibp) and math.isfinite(crown)
    return [Row("ibp-epoch", points, str(device), ibp, "cnn7, one epoch at 8/255", "ran", ok),
            Row("crown-ibp-epoch", points, str(device), crown, f"{crown / ibp:.2f}x the IBP epoch",
                "ran", ok)]


def agree_row(model: torch.nn.Module, engine: BoundEngine, sizes: Sizes, device: torch.device) -> Row:
    """CROWN lower bounds on ``device`` against the CPU's: max relative difference <= ``AGREE_TOL``."""
    x = _points(sizes.agree_points, sizes, device, seed=3)
    y = _labels(model, x, sizes.batch_size)
    lower_dev, seconds = _timed(device, lambda: engine.margin_bounds(x, y, EPS, "inf", "crown").lower)
    cpu_engine = BoundEngine(model.cpu(), sizes.shape, device="cpu", batch_size=sizes.batch_size)
    model.to(device)
    lower_cpu = cpu_engine.margin_bounds(x.cpu(), y.cpu(), EPS, "inf", "crown").lower
    diff = float((lower_dev.cpu() - lower_cpu).abs().max())
    rel = diff / max(1.0, float(lower_cpu.abs().max()))
    note = " (cpu against cpu)" if device.type == "cpu" else ""
    return Row("cpu-agree", len(x), str(device), seconds, f"max abs(device - cpu) {diff:.2e}{note}",
               f"relative {rel:.1e} <= {AGREE_TOL:g}" if rel <= AGREE_TOL else f"relative {rel:.1e} > {AGREE_TOL:g}",
               rel <= AGREE_TOL)


def _guarded(task: str, device: torch.device, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one group of rows; an exception becomes one failed row (the table is always printed)."""
    try:
        return fn()
    except Exception as exc:  # the table must still come out, with the reason in it
        traceback.print_exc(file=sys.stderr)
        return [Row(task, 0, str(device), math.nan, f"error: {type(exc).__name__}: {str(exc)[:80]}", "failed",
                    False)]


def run(sizes: Sizes, device: torch.device) -> list[Row]:
    """Every row of the table, in order."""
    torch.manual_seed(0)
    model = create_model("cnn7", 10, sizes.shape, **sizes.cnn7).to(device).eval()
    engine = BoundEngine(model, sizes.shape, device=device, batch_size=sizes.batch_size)
    return [*_guarded("crown", device, lambda: certify_rows(model, engine, sizes, device)),
            *_guarded("radius", device, lambda: [radius_row(model, engine, sizes, device)]),
            *_guarded("clever", device, lambda: [clever_row(model, sizes, device)]),
            *_guarded("kd-epoch", device, lambda: train_rows(sizes, device)),
            *_guarded("ibp-epoch", device, lambda: certified_rows(sizes, device)),
            *_guarded("cpu-agree", device, lambda: [agree_row(model, engine, sizes, device)])]


def format_table(rows: list[Row], header: str) -> str:
    """A markdown table with ``COLUMNS``, preceded by one header line."""
    cells = [[r.task, str(r.points), r.device, f"{r.seconds:.2f}", r.result, ("ok: " if r.ok else "FAIL: ") + r.check]
             for r in rows]
    lines = [header, "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def _environment(device: torch.device) -> str:
    from bounds.backends import current_backend

    backend = current_backend()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"gpu_check: auto_LiRPA {backend.version} (capability set {backend.family}), torch {torch.__version__}, "
            f"device {device} ({name}), threads {torch.get_num_threads()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu (default cuda)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: the CI smoke run (about 30 s on a CPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (atomically)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: device {args.device} asked for, but torch {torch.__version__} sees no CUDA GPU",
              file=sys.stderr)
        return 2
    sizes = SMALL if args.small else FULL
    header = _environment(device)
    rows = run(sizes, device)
    print(format_table(rows, header))
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, fh, indent=2)
        os.replace(tmp, args.json)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
