"""One trainer for every objective of theory.md §4: single process, or DistributedDataParallel under torchrun.

``train(TrainConfig) -> Path`` (``Trainer(cfg).run()``) writes, beside ``out`` (``ckpt.pt``):

- ``ckpt.pt``: the latest good epoch's student (atomic, rewritten every epoch);
- ``ckpt.best.pt``: the best epoch by the method's validation metric (clean or PGD accuracy);
- ``ckpt.metrics.jsonl``: one line per epoch (every loss term, lr, clean and PGD accuracy, the mean
  input-gradient norms of student and teacher, the IGA term relative to the KD term);
- ``ckpt.resume.pt``: optimizer, scheduler, scaler and epoch, for ``resume=True``.

The validation set is carved from the training split by a fixed permutation (the same for every
run and seed), so it never touches the test points that ``certify`` evaluates; the student trains
on the rest. Every epoch's randomness (shuffling, attack starts, noise, dropout) is drawn from
generators seeded by ``(seed, epoch, rank)``, so a resumed run replays the remaining epochs
exactly: on CPU it ends with the same weights as an uninterrupted run.

Training stops with one line (``TrainingDiverged``) when the loss is not finite, or when the
student is dead (``TrainingCollapsed``): its validation clean accuracy falls below twice chance
after being above it, stays below it with no progress (neither the training loss nor the
validation clean accuracy improving) over ``COLLAPSE_WINDOW`` epochs, or its mean input-gradient
norm stays near 0 for two epochs. The line names the setting to lower; ``ckpt.pt`` stays at the
last good epoch and ``ckpt.best.pt`` at the best epoch so far (an epoch with a problem updates
only the best checkpoint, and writes ``ckpt.pt`` only when there is none yet).

For the methods that pick their best epoch by PGD accuracy, catastrophic overfitting (theory.md
§8: the validation PGD accuracy falls to half of its best or less, by at least ``CO_MIN_DROP``,
while the clean accuracy holds or rises) ends training with one line naming the remedy;
``ckpt.pt`` is then the best epoch by PGD accuracy.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from bounds import attack
from bounds.nn import Normalize
from bounds.norms import batch_norm
from certkd.checkpoint import (
    file_sha256,
    load_checkpoint,
    make_checkpoint,
    provenance,
    save_checkpoint,
    torch_load_weights_only,
)
from certkd.data import BatchSource, DatasetInfo, load_dataset
from certkd.errors import CertkdError, CheckpointError, RunFailed
from certkd.io import JsonlAppender, atomic_write, read_jsonl
from certkd.models import create_model
from certkd.train.init import ibp_initialize
from certkd.train.losses import LossBatch, LossSpec, ObjectiveParams, gaussian_noise, get_loss, list_methods
from certkd.train.losses.distill import input_gradient
from certkd.train.recipes import RECIPES, apply_recipe
from certkd.train.schedules import EPS_SCHEDULES, eps_factor, progress

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "cyclic")
CYCLIC_PEAK = 0.4
"""The cyclic schedule rises linearly from 0 to --lr over the first 40 % of the steps, then falls to 0."""
VAL_SPLIT_SEED = 0
VAL_DEFAULT_SIZE = 500
VAL_DEFAULT_FRACTION = 0.1
COLLAPSE_CHANCE_FACTOR = 2.0
COLLAPSE_GRAD_FRACTION = 1e-3
COLLAPSE_GRAD_EPOCHS = 2
COLLAPSE_WINDOW = 3
"""Epochs without progress after which a run below the clean-accuracy floor is stopped."""
PROGRESS_LOSS = 0.01
"""Progress: a training loss at least this fraction below the lowest of the earlier epochs ..."""
PROGRESS_ACC = 0.01
"""... or a validation clean accuracy at least this much above the highest of the earlier epochs."""
CO_DROP = 0.5
CO_MIN_DROP = 0.05
CO_CLEAN_SLACK = 0.01
"""Catastrophic overfitting: validation PGD accuracy at most ``CO_DROP`` times its best and at least
``CO_MIN_DROP`` below it, with clean accuracy at least the best epoch's minus ``CO_CLEAN_SLACK``."""
IGA_SMALL = 0.05
"""Below this ratio of IGA to KD term a collapse is not blamed on --iga-weight."""
# settings that may differ between an interrupted run and its --resume (a run's files moved together keep it)
_RESUME_FREE = ("resume", "device", "progress", "out")


class TrainingDiverged(RunFailed):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingCollapsed(RunFailed):
    """The student collapsed (constant classifier, or input gradients near 0); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything ``certkd train`` takes; recorded in the student checkpoint's ``config``.

    Each field's ``metadata["help"]`` says what it does: the command's options are generated from the
    fields (``certkd.cli.options.dataclass_options``). ``eps_warmup`` and ``eps_start`` ramp the radius
    with ``eps_schedule`` (certkd.train.schedules); ``ibp_init`` is certkd.train.init. ``recipe`` is
    the recipe the settings were resolved from (recorded only; build with :meth:`from_flat` to apply one).
    """

    method: str = field(metadata={"choices": list_methods, "help": "Training objective (required unless --recipe)."})
    arch: str = field(metadata={"required": True,
                                "help": "Student (or teacher) architecture from the model registry."})
    out: Path = field(metadata={"type": Path, "output": True, "required": True, "help": "Checkpoint path (ckpt.pt); "
                                "beside it: ckpt.best.pt, ckpt.metrics.jsonl (one line per epoch), ckpt.resume.pt."})
    recipe: str | None = field(default=None, metadata={
        "choices": lambda: RECIPES.names(), "help": "Set the method and its settings as a paper's authors train "
        "(listed below); options given explicitly override it; `certkd info` shows the resolved values."})
    dataset: str = field(default="digits", metadata={"help": "Dataset name (see the data registry)."})
    arch_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "parse": "json", "help": "JSON keyword arguments of the architecture, e.g. '{\"width\": 8}'."})
    data_dir: Path | None = field(default=None, metadata={"type": Path, "help": "Where the dataset files live."})
    teacher: Path | None = field(default=None, metadata={
        "type": Path, "help": "Teacher checkpoint (kd, kdiga, ard, rslad, cert-kd, cert-kdiga, cert-advkd); any "
        "architecture with the dataset's input shape and class count; frozen, eval mode."})
    init: Path | None = field(default=None, metadata={
        "type": Path, "help": "Start the student from this checkpoint: every tensor whose name and shape match is "
        "copied (another family is allowed)."})
    epochs: int = field(default=10, metadata={"help": "Passes over the training split."})
    batch_size: int = field(default=128, metadata={"help": "Global batch (split over torchrun processes)."})
    lr: float = field(default=0.1, metadata={"help": "Initial (cyclic: peak) learning rate."})
    optimizer: str = field(default="sgd", metadata={"choices": OPTIMIZERS, "help": "SGD with momentum, or Adam."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay of the optimizer."})
    schedule: str = field(default="cosine", metadata={
        "option": ("--lr-schedule", "--schedule"), "choices": SCHEDULES, "help": "Cosine annealing per epoch; "
        "x0.1 at 50% and 75% of the epochs; or cyclic (linear up to --lr over the first 40% of the steps, then "
        "down to 0; Wong et al. 2020)."})
    clip_grad: float | None = field(default=None, metadata={
        "type": float, "help": "Clip the L2 norm of the parameter gradient of every step to this."})
    eps_warmup: float = field(default=0.0, metadata={
        "metavar": "EPOCHS", "help": "Epochs of a ramp of the training radius (and its step sizes) from 0 to --eps (after --eps-start); "
        "kappa and beta of the certified methods follow the same ramp."})
    eps_start: float = field(default=0.0, metadata={
        "metavar": "EPOCHS", "help": "Epochs of training at radius 0 before the ramp (the warm-up of Shi et al. 2021)."})
    eps_schedule: str = field(default="linear", metadata={
        "choices": EPS_SCHEDULES, "help": "Shape of the ramp: linear, or smoothed (Shi et al. 2021: t^4 growth "
        "over the first quarter, then linear with the same slope)."})
    ibp_init: bool = field(default=False, metadata={
        "option": "--ibp-init/--no-ibp-init", "help": "IBP initialization (Shi et al. 2021): Linear/Conv weights "
        "N(0, 2 pi / fan_in^2), for models with BatchNorm after each layer (e.g. cnn7)."})
    collapse_floor: float = field(default=COLLAPSE_CHANCE_FACTOR, metadata={
        "help": "Stop (keeping the last good and the best checkpoint) when the validation clean accuracy falls "
        "below this multiple of chance after being above it, or stays below it with no progress in loss or "
        f"accuracy over {COLLAPSE_WINDOW} epochs; 0 turns the check off."})
    seed: int = field(default=0, metadata={"help": "Seed: fixes every run on CPU."})
    resume: bool = field(default=False, metadata={
        "help": "Continue the interrupted run writing --out (same settings); on CPU it ends with the same weights "
        "as an uninterrupted run."})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu, cuda, cuda:1."})
    amp: bool = field(default=False, metadata={
        "help": "Mixed precision (float16 with loss scaling on CUDA, bfloat16 on CPU)."})
    noise_sd: float = field(default=0.0, metadata={
        "help": "Gaussian noise augmentation (any method), for randomized-smoothing comparisons."})
    params: ObjectiveParams = field(default_factory=ObjectiveParams, metadata={"cli": False})
    val_size: int | None = field(default=None, metadata={
        "type": int, "help": "Size of the validation set, carved from the training split (never the test points) "
        "[default: min(500, 10% of the training split)]."})
    val_eps: float | None = field(default=None, metadata={
        "parse": "number", "help": "Radius of the validation PGD accuracy [default: --eps]."})
    val_attack_steps: int = field(default=20, metadata={"help": "PGD steps of the validation attack."})
    progress: bool = field(default=True, metadata={
        "option": "--progress/--no-progress", "help": "tqdm bars and one line per epoch on stderr."})

    @classmethod
    def from_flat(cls, values: dict[str, Any], explicit: set[str] | None = None) -> TrainConfig:
        """Build from flat settings (``TrainConfig`` and ``ObjectiveParams`` field names), recipe applied.

        ``explicit``: the keys the user gave (they override the recipe); default every key.

        Example
        -------
        >>> cfg = TrainConfig.from_flat({"method": "kdiga", "arch": "mlp", "out": "s.pt", "recipe": "shao2021"})
        >>> cfg.params.iga_on, cfg.schedule
        ('adversarial', 'cyclic')
        """
        resolved = apply_recipe(values, explicit)
        own = {f.name for f in fields(cls)} - {"params"}
        objective = {f.name for f in fields(ObjectiveParams)}
        unknown = set(resolved) - own - objective
        if unknown:
            raise CertkdError(f"unknown training settings: {', '.join(sorted(unknown))}")
        params = ObjectiveParams(**{k: v for k, v in resolved.items() if k in objective})
        return cls(params=params, **{k: v for k, v in resolved.items() if k in own})

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-friendly record (paths as strings, method parameters inlined)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        for key in ("out", "data_dir", "teacher", "init"):
            d[key] = None if d[key] is None else str(d[key])
        d["arch_kwargs"] = dict(self.arch_kwargs)
        d.update(asdict(self.params))
        return d

    def paths(self) -> dict[str, Path]:
        out = Path(self.out)
        stem = out.name[:-3] if out.name.endswith(".pt") else out.name
        return {"last": out, "best": out.with_name(f"{stem}.best.pt"),
                "metrics": out.with_name(f"{stem}.metrics.jsonl"), "resume": out.with_name(f"{stem}.resume.pt")}


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _setup_distributed(device: str) -> _Dist:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return _Dist(rank=rank, world=world, device=dev, owns_group=owns)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def check_config(cfg: TrainConfig, spec: LossSpec) -> ObjectiveParams:
    """Every setting of ``cfg`` checked before long work starts; returns the resolved objective params."""
    params = cfg.params.resolved()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise CertkdError(f"--epochs and --batch-size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CertkdError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in OPTIMIZERS:
        raise CertkdError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise CertkdError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not (math.isfinite(cfg.noise_sd) and cfg.noise_sd >= 0):
        raise CertkdError(f"--noise-sd must be a number >= 0, got {cfg.noise_sd}")
    if cfg.clip_grad is not None and not (math.isfinite(cfg.clip_grad) and cfg.clip_grad > 0):
        raise CertkdError(f"--clip-grad must be a positive number, got {cfg.clip_grad}")
    if not (math.isfinite(cfg.collapse_floor) and cfg.collapse_floor >= 0):
        raise CertkdError(f"--collapse-floor must be a number >= 0 (a multiple of chance), got {cfg.collapse_floor}")
    if not (math.isfinite(cfg.eps_warmup) and 0 <= cfg.eps_warmup <= cfg.epochs):
        raise CertkdError(f"--eps-warmup must lie in [0, --epochs], got {cfg.eps_warmup}")
    if not (math.isfinite(cfg.eps_start) and 0 <= cfg.eps_start and cfg.eps_start + cfg.eps_warmup <= cfg.epochs):
        raise CertkdError(f"--eps-start must be >= 0 with --eps-start + --eps-warmup <= --epochs, got {cfg.eps_start}")
    if cfg.eps_schedule not in EPS_SCHEDULES:
        raise CertkdError(f"--eps-schedule must be one of {', '.join(EPS_SCHEDULES)}, got {cfg.eps_schedule!r}")
    if cfg.val_size is not None and cfg.val_size < 1 or cfg.val_attack_steps < 1:
        raise CertkdError("--val-size and --val-attack-steps must be >= 1")
    if spec.needs_teacher and cfg.teacher is None:
        raise CertkdError(f"method {spec.name} distils a teacher: give --teacher t.pt")
    if not spec.needs_teacher and cfg.teacher is not None:
        raise CertkdError(f"method {spec.name} uses no teacher; drop --teacher (distillation methods: "
                          f"{', '.join(m for m in list_methods() if get_loss(m).needs_teacher)})")
    needs_eps = spec.needs_eps or (spec.name == "kdiga" and params.iga_on != "clean")
    if needs_eps and not params.eps:
        raise CertkdError(f"method {spec.name} attacks within a ball: give --eps > 0 (e.g. 8/255 on CIFAR, "
                          "0.1 on digits)")
    return params


def validation_split(n: int, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, validation_indices)`` of a training split of ``n`` examples, disjoint.

    A fixed permutation (seed ``VAL_SPLIT_SEED``, the same for every run) puts its first ``size``
    indices in the validation set; ``size`` ``None`` means ``min(500, n // 10)``. At least half
    of the split stays for training.

    Example
    -------
    >>> train_idx, val_idx = validation_split(1000, None)
    >>> len(train_idx), len(val_idx), bool(set(train_idx.tolist()) & set(val_idx.tolist()))
    (900, 100, False)
    """
    size = min(VAL_DEFAULT_SIZE, max(1, int(n * VAL_DEFAULT_FRACTION))) if size is None else size
    if size > n // 2:
        raise CertkdError(f"--val-size {size} leaves fewer than half of the {n} training examples for training; "
                          f"give at most {n // 2}")
    order = torch.randperm(n, generator=_generator(VAL_SPLIT_SEED, torch.device("cpu")))
    return order[size:], order[:size]


def _load_teacher(path: Path, info: DatasetInfo, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen teacher (eval mode, no parameter gradients) and its checkpoint's sha256."""
    ckpt = load_checkpoint(path)
    if tuple(ckpt.input_shape) != tuple(info.input_shape) or ckpt.num_classes != info.num_classes:
        raise CheckpointError(
            f"teacher {path} takes inputs {tuple(ckpt.input_shape)} with {ckpt.num_classes} classes, but dataset "
            f"{info.name} has inputs {tuple(info.input_shape)} with {info.num_classes} classes")
    teacher = ckpt.build_model(device)
    teacher.requires_grad_(False)
    return teacher.eval(), file_sha256(path)


def _load_init(student: nn.Module, path: Path) -> dict[str, Any]:
    """Copy every weight of ``path`` whose name and shape match the student (any family); report it.

    The student keeps its own dataset's input normalization (the ``Normalize`` buffers).
    """
    ckpt = load_checkpoint(path)
    normalization = {f"{name}.{buf}" for name, module in student.named_modules() if isinstance(module, Normalize)
                     for buf in ("mean", "std")}
    own = {k: v for k, v in student.state_dict().items() if k not in normalization}
    matched = {k: v for k, v in ckpt.state_dict.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise CheckpointError(f"--init {path}: none of its {ckpt.model_name} weights fits the student's shapes")
    student.load_state_dict(matched, strict=False)
    return {"path": str(path), "sha256": file_sha256(path), "model": ckpt.model_name,
            "loaded": len(matched), "total": len(own), "skipped": sorted(set(own) - set(matched))}


def lr_factor(schedule: str, epochs: int, steps_per_epoch: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of --lr.

    ``cosine``: ``(1 + cos(pi e / E)) / 2`` with ``e`` the epoch (constant within an epoch);
    ``step``: ``0.1`` at 50 % and again at 75 % of the epochs; ``cyclic`` (Wong et al. 2020, as the
    KDIGA authors use it): linear from 0 to 1 over the first 40 % of the steps, then back to 0.

    Example
    -------
    >>> lr_factor("cyclic", 10, 100, 399), lr_factor("cosine", 10, 100, 500)
    (1.0, 0.5)
    """
    epoch = step // steps_per_epoch
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        milestones = sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)})
        return 0.1 ** sum(epoch >= m for m in milestones)
    t = (step + 1) / (steps_per_epoch * epochs)
    return t / CYCLIC_PEAK if t <= CYCLIC_PEAK else max(0.0, (1.0 - t) / (1.0 - CYCLIC_PEAK))


def no_progress(history: list[dict[str, Any]], window: int = COLLAPSE_WINDOW) -> bool:
    """Whether the last ``window`` epochs of ``history`` (metric rows) made no progress.

    Progress: the lowest training loss of the window is at least ``PROGRESS_LOSS`` (relative)
    below the lowest before it, or the highest validation ``clean_acc`` at least ``PROGRESS_ACC``
    above the highest before it. The loss is the classification part, ``kd_term``, where the
    method logs one (a regularizer such as the IGA term can shrink while the classifier stays
    dead), else ``loss``. Fewer than ``window + 1`` epochs: progress (too early to tell).

    Example
    -------
    >>> rows = [{"loss": 2.30, "clean_acc": 0.10}] * 4
    >>> no_progress(rows), no_progress(rows[:3] + [{"loss": 2.0, "clean_acc": 0.10}])
    (True, False)
    """
    if len(history) <= window:
        return False
    before, recent = history[:-window], history[-window:]
    key = "kd_term" if all("kd_term" in r for r in history) else "loss"
    loss_better = min(r[key] for r in recent) < (1 - PROGRESS_LOSS) * min(r[key] for r in before)
    acc_better = max(r["clean_acc"] for r in recent) >= max(r["clean_acc"] for r in before) + PROGRESS_ACC
    return not (loss_better or acc_better)


def catastrophic_overfitting(history: list[dict[str, Any]]) -> str | None:
    """What shows catastrophic overfitting in the last epoch of ``history`` (theory.md §8); None if nothing.

    Fires when the validation ``pgd_acc`` of the last epoch is at most ``CO_DROP`` times the best of
    the earlier epochs and at least ``CO_MIN_DROP`` below it, while its ``clean_acc`` is at least the
    best epoch's minus ``CO_CLEAN_SLACK`` (robustness lost, clean accuracy kept or rising).

    Example
    -------
    >>> rows = [{"epoch": 1, "clean_acc": 0.80, "pgd_acc": 0.40}, {"epoch": 2, "clean_acc": 0.90, "pgd_acc": 0.02}]
    >>> catastrophic_overfitting(rows)[:44]
    'validation PGD accuracy fell from 0.400 (epo'
    >>> catastrophic_overfitting(rows[:1] + [{"epoch": 2, "clean_acc": 0.85, "pgd_acc": 0.38}]) is None
    True
    """
    rows = [r for r in history if r.get("pgd_acc") is not None]
    if len(rows) < 2:
        return None
    peak, now = max(rows[:-1], key=lambda r: r["pgd_acc"]), rows[-1]
    if (now["pgd_acc"] <= CO_DROP * peak["pgd_acc"] and peak["pgd_acc"] - now["pgd_acc"] >= CO_MIN_DROP
            and now["clean_acc"] >= peak["clean_acc"] - CO_CLEAN_SLACK):
        return (f"validation PGD accuracy fell from {peak['pgd_acc']:.3f} (epoch {peak['epoch']}) to "
                f"{now['pgd_acc']:.3f} while clean accuracy went from {peak['clean_acc']:.3f} to {now['clean_acc']:.3f}")
    return None


def _make_optimizer(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum, weight decay) or Adam, with the schedule of :func:`lr_factor` stepped per batch."""
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(cfg.schedule, cfg.epochs, steps_per_epoch, step))
    return opt, sched


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision for --amp: float16 on CUDA (with a GradScaler), bfloat16 on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, norm: str, steps: int,
             seed: int, batch_size: int = 500, dist_info: _Dist | None = None) -> dict[str, float | None]:
    """Clean accuracy, PGD accuracy (margin loss, ``steps`` steps; an estimate) and the mean input-gradient
    norm ``mean_i ||grad_x CE(model(x_i), y_i)||_2`` (per-sample scale) of ``model`` on (x, y).

    Under torchrun each rank takes a slice and the sums are added up.
    """
    d = dist_info or _Dist(device=next(model.parameters()).device)
    idx = torch.arange(d.rank, len(y), d.world)
    x, y = x[idx], y[idx]
    gen = _generator(_epoch_seed(seed, 0, d.rank), d.device)
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)
    was_training = model.training
    model.eval()
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(d.device), y[i:i + batch_size].to(d.device)
        logits, grad = input_gradient(model, xb, yb, create_graph=False)
        sums[0] += (logits.detach().argmax(1) == yb).sum()
        sums[3] += batch_norm(grad, 2.0).double().sum()
        if eps is not None:
            res = attack.pgd(model, xb, yb, eps, norm, steps=steps, generator=gen)
            sums[1] += (res.margin > 0).sum()
        sums[2] += len(yb)
    model.train(was_training)
    sums = d.all_sum(sums)
    n = max(float(sums[2]), 1.0)
    return {"clean_acc": float(sums[0]) / n, "pgd_acc": float(sums[1]) / n if eps is not None else None,
            "grad_norm": float(sums[3]) / n}


def compute_loss(spec: LossSpec, params: ObjectiveParams, batch: LossBatch, amp: bool = False
                 ) -> dict[str, torch.Tensor]:
    """The objective's terms on one batch (under autocast with ``amp``)."""
    with _autocast(batch.x.device, amp):
        return spec.fn(batch, params)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float | None = None) -> None:
    """Backward pass (through the loss scaler), optional clipping of the gradient's L2 norm, one step.

    The backward pass computes the gradients of the optimized parameters only: an objective that
    differentiates in the input (KDIGA's input gradients) leaves its input out of it.
    """
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    torch.autograd.backward(scaler.scale(loss), inputs=params or None)
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


class Trainer:
    """Train the student of one :class:`TrainConfig` (theory.md §4).

    ``Trainer(cfg).run()`` checks the settings, joins torchrun's process group, loads data, teacher
    and student, restores the resume state, then runs :meth:`train_epoch` and :meth:`validate`
    once per epoch, writing checkpoints and metrics as it goes. Subclasses may override either.

    Example
    -------
    >>> Trainer(TrainConfig(method="natural", arch="mlp", out=Path("m.pt"))).params.iga_weight
    1.0
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.spec = get_loss(cfg.method)
        self.params = check_config(cfg, self.spec)
        self.paths = cfg.paths()
        self.record = replace(cfg, params=self.params).to_dict()

    # ------------------------------------------------------------------ set-up
    def run(self) -> Path:
        """Train every remaining epoch; returns the path of the final checkpoint ``cfg.out``.

        Raises ``CertkdError`` (one sentence) for bad settings or an incompatible teacher,
        ``TrainingDiverged`` for a NaN/Inf loss and ``TrainingCollapsed`` for a collapsed student
        (the checkpoints of the last good epoch stay on disk).
        """
        self.dist = _setup_distributed(self.cfg.device)
        try:
            self._prepare()
            return self._epoch_loop()
        finally:
            if self.dist.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _prepare(self) -> None:
        cfg, d = self.cfg, self.dist
        full = load_dataset(cfg.dataset, "train", cfg.data_dir)
        self.info = full.info
        self.data: BatchSource = full
        self.train_idx, val_idx = validation_split(len(full), cfg.val_size)
        self.x_val, self.y_val = full.batch(val_idx)
        self.val_eps = cfg.val_eps if cfg.val_eps is not None else self.params.eps
        self.teacher: nn.Module | None = None
        self.teacher_sha: str | None = None
        if cfg.teacher is not None:
            self.teacher, self.teacher_sha = _load_teacher(Path(cfg.teacher), self.info, d.device)
        torch.manual_seed(cfg.seed)
        self.student = create_model(cfg.arch, num_classes=self.info.num_classes, input_shape=self.info.input_shape,
                                    mean=self.info.mean, std=self.info.std, **cfg.arch_kwargs)
        if cfg.ibp_init:
            ibp_initialize(self.student)
        init_report = _load_init(self.student, Path(cfg.init)) if cfg.init is not None else None
        if init_report and d.main:
            _say(f"init: loaded {init_report['loaded']} of {init_report['total']} tensors from {cfg.init} "
                 f"({init_report['model']} -> {cfg.arch})"
                 + (f"; kept fresh: {', '.join(init_report['skipped'])}" if init_report["skipped"] else ""))
        self.student.to(d.device).train()
        self.per_rank = cfg.batch_size // d.world if d.world > 1 else cfg.batch_size
        if self.per_rank < 1:
            raise CertkdError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} processes")
        self.n_per_rank = len(self.train_idx) // d.world
        self.steps_per_epoch = math.ceil(self.n_per_rank / self.per_rank)
        if self.params.iga_scale == "batch-mean":
            self.record["iga_weight_per_sample"] = self.params.iga_weight / self.per_rank
        self.optimizer, self.scheduler = _make_optimizer(cfg, self.student, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and d.device.type == "cuda")
        self.model = nn.parallel.DistributedDataParallel(self.student) if d.world > 1 else self.student
        extra: dict[str, Any] = {"method": self.spec.name, "world_size": d.world}
        if init_report:
            extra["init"] = init_report
        self.provenance = provenance(cfg.seed, teacher=cfg.teacher, **extra)
        self.teacher_val = evaluate(self.teacher, self.x_val, self.y_val, None, self.params.norm, 1, cfg.seed,
                                    dist_info=d) if self.teacher is not None else None
        self.start_epoch, self.best, self.flat_epochs, self.top_grad_norm = 0, -math.inf, 0, 0.0
        self.above_floor = False
        self.history: list[dict[str, Any]] = []
        self._restore()

    def _restore(self) -> None:
        """Load the resume state (``cfg.resume``) or clear the files of an earlier run."""
        cfg, d = self.cfg, self.dist
        state = self._resume_state() if cfg.resume else None
        if cfg.resume and state is None and d.main:
            _say(f"resume: no state at {self.paths['resume']}, starting at epoch 1")
        if state is None:
            if d.main:
                for key in ("metrics", "resume"):
                    self.paths[key].unlink(missing_ok=True)
            return
        if state["teacher_sha256"] != self.teacher_sha:
            raise CertkdError(f"--resume: the teacher file {cfg.teacher} changed since the interrupted run")
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best = int(state["epoch"]), float(state["best"])
        # states written before the collapse check lack its counters
        self.flat_epochs, self.top_grad_norm = int(state.get("flat_epochs", 0)), float(state.get("top_grad_norm", 0))
        self.above_floor = bool(state.get("above_floor", True))
        if d.main:
            _keep_metrics_until(self.paths["metrics"], self.start_epoch)
            _say(f"resume: continuing after epoch {self.start_epoch} of {cfg.epochs}")
        self.history = [r for r in read_jsonl(self.paths["metrics"]) if int(r.get("epoch", 0)) <= self.start_epoch]

    def _resume_state(self) -> dict[str, Any] | None:
        path = self.paths["resume"]
        if not path.exists():
            return None
        state = torch_load_weights_only(path, "resume state")
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{path}: not a certkd resume state; delete it to start over")
        old = state["config"]
        defaults = {f.name: f.default for cls in (TrainConfig, ObjectiveParams) for f in fields(cls)}
        # a setting the interrupted run's version did not have yet is no difference at its default
        diff = [k for k in self.record if k not in _RESUME_FREE and old.get(k) != self.record[k]
                and not (k not in old and defaults.get(k, MISSING) == self.record[k])]
        if diff:
            raise CertkdError(f"--resume with different settings than the interrupted run ({', '.join(diff)}); "
                              "use the same command or a new --out")
        return state

    # ------------------------------------------------------------------ epochs
    def _epoch_loop(self) -> Path:
        cfg, d = self.cfg, self.dist
        metrics_log = JsonlAppender(self.paths["metrics"]) if d.main else None
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                terms = self.train_epoch(epoch)
                row = {"epoch": epoch + 1, "lr": lr, **terms, **self._diagnostics(terms), **self.validate(),
                       "val_eps": self.val_eps, "norm": self.params.norm,
                       "seconds": round(time.perf_counter() - t0, 3)}
                self.history.append(row)
                problem, stop = self._health(epoch, row)
                if problem:
                    row["collapse"] = problem
                overfit = catastrophic_overfitting(self.history) if self.spec.select == "pgd_acc" else None
                if overfit:
                    row["catastrophic_overfitting"] = overfit
                if metrics_log is not None:
                    metrics_log.write([row])
                self._save_epoch(epoch, row, good=not problem or cfg.epochs == 1)
                if stop:
                    raise TrainingCollapsed(self._collapse_message(epoch, problem, row))
                if d.main and cfg.progress:
                    _say(_epoch_line(self.spec.name, cfg.epochs, row))
                if overfit:
                    self._stop_overfit(epoch, overfit)
                    break
            if d.world > 1:
                dist.barrier()
        finally:
            if metrics_log is not None:
                metrics_log.close()
        return self.paths["last"]

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's share of a (seed, epoch)-shuffled training set; returns mean loss terms."""
        cfg, d = self.cfg, self.dist
        seed = _epoch_seed(cfg.seed, epoch + 1, d.rank)
        torch.manual_seed(seed)
        shuffle = _generator(_epoch_seed(cfg.seed, epoch + 1), torch.device("cpu"))  # the same on every rank
        order = torch.randperm(len(self.train_idx), generator=shuffle)
        mine = order[d.rank::d.world][:self.n_per_rank]
        gen = _generator(seed, d.device)
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(range(0, self.n_per_rank, self.per_rank), desc=f"{self.spec.name} epoch {epoch + 1}/{cfg.epochs}",
                   file=sys.stderr, leave=False, disable=not (cfg.progress and d.main))
        self.model.train()
        for step, start in enumerate(bar):
            idx = mine[start:start + self.per_rank]
            x, y = self.data.batch(self.train_idx[idx])
            at = epoch * self.steps_per_epoch + step
            batch = LossBatch(x=gaussian_noise(x.to(d.device), cfg.noise_sd, gen), y=y.to(d.device),
                              student=self.model, student_bare=self.student, teacher=self.teacher, generator=gen,
                              ramp=self._ramp(at), eps_factor=self._warmup_factor(at))
            params = self.params.eps_scaled(batch.eps_factor)
            out = compute_loss(self.spec, params, batch, cfg.amp)
            loss = out["loss"]
            finite = d.all_sum(torch.isfinite(loss.detach()).float().reshape(1)).item() == d.world
            if not finite:
                raise TrainingDiverged(self._diverged_message(epoch, step, out))
            optimizer_step(loss, self.optimizer, self.scaler, cfg.clip_grad)
            self.scheduler.step()
            for key, value in out.items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=d.device)) \
                    + value.detach().double() * len(idx)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        count = d.all_sum(torch.tensor(float(self.n_per_rank), dtype=torch.float64, device=d.device))
        terms = {key: float(d.all_sum(total) / count) for key, total in sums.items()}
        if self.params.eps is not None and (cfg.eps_warmup > 0 or cfg.eps_start > 0):
            terms["train_eps"] = self.params.eps * self._warmup_factor((epoch + 1) * self.steps_per_epoch - 1)
        return terms

    def _ramp(self, step: int) -> float:
        """Progress of the eps ramp (--eps-start, --eps-warmup) at a step, in [0, 1] (certkd.train.schedules)."""
        return progress(step, self.steps_per_epoch, self.cfg.eps_start, self.cfg.eps_warmup)

    def _warmup_factor(self, step: int) -> float:
        """``eps_t / eps`` at a step: the --eps-schedule shape of :meth:`_ramp`."""
        return eps_factor(self.cfg.eps_schedule, self._ramp(step))

    def validate(self) -> dict[str, float | None]:
        """Clean and PGD accuracy and the mean input-gradient norm of the student on the validation set."""
        return evaluate(self.student, self.x_val, self.y_val, self.val_eps, self.params.norm, self.cfg.val_attack_steps,
                        self.cfg.seed, dist_info=self.dist)

    def _diagnostics(self, terms: dict[str, float]) -> dict[str, float]:
        """The teacher's validation gradient norm, and the IGA part of the loss over its KD part."""
        out: dict[str, float] = {}
        if self.teacher_val is not None:
            out["teacher_grad_norm"] = float(self.teacher_val["grad_norm"] or 0.0)
        if "iga_weighted" in terms and terms.get("kd_term"):
            out["iga_to_kd"] = terms["iga_weighted"] / terms["kd_term"]
        return out

    # ------------------------------------------------------------------ health and checkpoints
    def _health(self, epoch: int, row: dict[str, Any]) -> tuple[str, bool]:
        """``(problem, stop)``: what is wrong with this epoch's student ('' if nothing), whether to stop.

        Below the floor means a validation clean accuracy under ``collapse_floor / K`` (2x chance by
        default). It stops training at once when the student was above the floor before (it fell),
        and otherwise once ``COLLAPSE_WINDOW`` epochs pass without progress (:func:`no_progress`): a
        slow start that still learns, e.g. adversarial training under a cyclic schedule, goes on.
        A mean input-gradient norm below ``1e-3`` of a reference (the teacher's norm, else the
        student's largest so far) stops it when it lasts two epochs. An epoch with a problem
        updates only the best checkpoint, unless the run has only one epoch.
        """
        floor = self.cfg.collapse_floor / self.info.num_classes
        if row["clean_acc"] < floor:
            fell = self.above_floor
            dead = no_progress(self.history)
            why = "" if fell else (f" with no progress in loss or accuracy over {COLLAPSE_WINDOW} epochs" if dead
                                   else f" after {epoch + 1} epoch(s), still progressing")
            return (f"validation clean accuracy {row['clean_acc']:.3f} is below {self.cfg.collapse_floor:g}x chance "
                    f"({floor:.3f}){why}"), fell or dead
        self.above_floor = True
        self.top_grad_norm = max(self.top_grad_norm, row["grad_norm"])
        reference = row.get("teacher_grad_norm") or self.top_grad_norm
        if row["grad_norm"] < COLLAPSE_GRAD_FRACTION * reference:
            self.flat_epochs += 1
            return (f"the student's mean input-gradient norm {row['grad_norm']:.3g} is near 0 (reference "
                    f"{reference:.3g}) for {self.flat_epochs} epoch(s)"), self.flat_epochs >= COLLAPSE_GRAD_EPOCHS
        self.flat_epochs = 0
        return "", False

    def _save_epoch(self, epoch: int, row: dict[str, Any], good: bool = True) -> None:
        """Write ``ckpt.pt`` and the resume state (a good epoch, or no ``ckpt.pt`` yet), ``ckpt.best.pt`` (a new best)."""
        score = row[self.spec.select] if row[self.spec.select] is not None else row["clean_acc"]
        if self.dist.main:
            ckpt = make_checkpoint(self.student, self.cfg.arch, self.cfg.arch_kwargs, self.info, config=self.record,
                                   metrics={**row, "best_" + self.spec.select: max(self.best, score)},
                                   provenance_info=self.provenance)
            if score > self.best:
                save_checkpoint(ckpt, self.paths["best"])
            if good or not self.paths["last"].exists():
                save_checkpoint(ckpt, self.paths["last"])
        if self.dist.main and good:
            _save_resume_state(self.paths["resume"], {
                "epoch": epoch + 1, "best": max(self.best, score), "config": self.record,
                "teacher_sha256": self.teacher_sha, "flat_epochs": self.flat_epochs, "above_floor": self.above_floor,
                "top_grad_norm": self.top_grad_norm, "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()})
        self.best = max(self.best, score)

    def _kept(self) -> str:
        if not self.paths["last"].exists():
            return "no checkpoint was written"
        metrics = load_checkpoint(self.paths["last"]).metrics
        best = load_checkpoint(self.paths["best"]).metrics if self.paths["best"].exists() else metrics
        return (f"the last good checkpoint {self.paths['last']} (epoch {metrics.get('epoch')}, validation clean "
                f"accuracy {metrics.get('clean_acc', math.nan):.3f}) and the best, {self.paths['best'].name} "
                f"(epoch {best.get('epoch')}), are kept")

    def _stop_overfit(self, epoch: int, what: str) -> None:
        """Catastrophic overfitting: ``ckpt.pt`` becomes the best epoch by PGD accuracy; one line with the remedy."""
        if self.dist.main:
            best = self.paths["best"].read_bytes()
            atomic_write(self.paths["last"], lambda fh: fh.write(best), mode="wb")
            epoch_best = load_checkpoint(self.paths["last"]).metrics.get("epoch")
            remedy = ("--iga-on nfgsm (N-FGSM) or --iga-on pgd" if self.spec.name == "kdiga"
                      else "more --attack-steps or a smaller --eps")
            _say(f"{self.spec.name}: catastrophic overfitting at epoch {epoch + 1} ({what}); training stopped and "
                 f"{self.paths['last']} is the best epoch by PGD accuracy (epoch {epoch_best}); use {remedy} "
                 "(theory.md §8)")

    def _weight_hint(self, row: dict[str, Any] | None = None) -> str:
        """Which setting to lower: the method's weight, unless the diagnostics show its term is small."""
        option = self.spec.weight_option
        if option != "--iga-weight":
            return f"lower {option}"
        p = self.params
        per_sample = f", {p.iga_weight / self.per_rank:.3g} per sample" if p.iga_scale == "batch-mean" else ""
        ratio = None if row is None else row.get("iga_to_kd")
        if ratio is not None and ratio < IGA_SMALL:
            return (f"lower --lr or give --eps-warmup: the IGA term is only {ratio:.2g} of the KD term, so "
                    f"--iga-weight (now {p.iga_weight:g} on the {p.iga_scale} scale{per_sample}) is not the cause")
        return f"lower --iga-weight (now {p.iga_weight:g} on the {p.iga_scale} scale{per_sample})"

    def _collapse_message(self, epoch: int, problem: str, row: dict[str, Any]) -> str:
        return (f"{self.spec.name} collapsed at epoch {epoch + 1}: {problem}; training stopped and {self._kept()}; "
                f"{self._weight_hint(row)}")

    def _diverged_message(self, epoch: int, step: int, out: dict[str, torch.Tensor]) -> str:
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.items())
        hint = "lower --lr or check the data" if self.spec.weight_option == "--lr" else \
            f"{self._weight_hint()} or --lr, or give --clip-grad"
        return (f"{self.spec.name} loss is not finite at epoch {epoch + 1}, step {step + 1} ({terms}); training "
                f"stopped and {self._kept()}; {hint}")


def train(cfg: TrainConfig) -> Path:
    """Train the student of ``cfg`` (theory.md §4); returns the path of the final checkpoint ``cfg.out``.

    ``Trainer(cfg).run()``; raises ``CertkdError`` (one sentence) for bad settings, an incompatible
    teacher, a NaN/Inf loss (``TrainingDiverged``) or a collapsed student (``TrainingCollapsed``).
    """
    return Trainer(cfg).run()


def _epoch_line(method: str, epochs: int, row: dict[str, Any]) -> str:
    """The per-epoch progress line: loss, validation accuracies, gradient norms, IGA over KD."""
    parts = [f"{method} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4g}", f"val clean {row['clean_acc']:.3f}"]
    if row.get("pgd_acc") is not None:
        parts.append(f"PGD {row['pgd_acc']:.3f} at {row['val_eps']:g} (estimate)")
    grad = f"|grad_x CE| student {row['grad_norm']:.3g}"
    if "teacher_grad_norm" in row:
        grad += f" teacher {row['teacher_grad_norm']:.3g}"
    parts.append(grad)
    if "iga_to_kd" in row:
        parts.append(f"IGA/KD {row['iga_to_kd']:.3g}")
    return ", ".join(parts)


def _keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after the resume point (written just before an interruption)."""
    rows = [r for r in read_jsonl(path) if int(r.get("epoch", 0)) <= epoch]
    atomic_write(path, lambda fh: fh.writelines(json.dumps(r) + "\n" for r in rows))


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
