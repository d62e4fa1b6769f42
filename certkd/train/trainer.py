"""One trainer for every objective of theory.md §4: single process, or DistributedDataParallel under torchrun.

``train(TrainConfig) -> Path`` writes, beside ``out`` (``ckpt.pt``):

- ``ckpt.pt``: the latest epoch's student (atomic, rewritten every epoch);
- ``ckpt.best.pt``: the best epoch by the method's validation metric (clean or PGD accuracy);
- ``ckpt.metrics.jsonl``: one line per epoch (every loss term, lr, clean and PGD accuracy);
- ``ckpt.resume.pt``: optimizer, scheduler, scaler and epoch, for ``resume=True``.

Every epoch's randomness (shuffling, attack starts, noise, dropout) is drawn from generators
seeded by ``(seed, epoch, rank)``, so a resumed run replays the remaining epochs exactly: on CPU
it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from bounds import attack
from bounds.nn import Normalize
from certkd.checkpoint import (
    file_sha256,
    load_checkpoint,
    make_checkpoint,
    provenance,
    save_checkpoint,
    torch_load_weights_only,
)
from certkd.data import DatasetInfo, load_dataset
from certkd.errors import CertkdError, CheckpointError
from certkd.io import JsonlAppender, atomic_write, read_jsonl
from certkd.models import create_model
from certkd.train.losses import LossBatch, LossSpec, MethodParams, gaussian_noise, get_loss

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step")
VAL_SPLIT_SEED = 0
# settings that may differ between an interrupted run and its --resume
_RESUME_FREE = ("resume", "device", "progress")


class TrainingDiverged(CertkdError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything ``certkd train`` takes; recorded in the student checkpoint's ``config``."""

    method: str
    arch: str
    out: Path
    dataset: str = "digits"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    teacher: Path | None = None
    init: Path | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    amp: bool = False
    noise_sd: float = 0.0
    params: MethodParams = field(default_factory=MethodParams)
    val_size: int = 500
    val_eps: float | None = None  # PGD accuracy radius on the validation subset; None: params.eps
    val_attack_steps: int = 20
    progress: bool = True

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


def _check_config(cfg: TrainConfig, spec: LossSpec) -> MethodParams:
    params = cfg.params.resolved()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise CertkdError(f"--epochs and --batch-size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CertkdError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in OPTIMIZERS:
        raise CertkdError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise CertkdError(f"--schedule must be cosine or step, got {cfg.schedule!r}")
    if not (math.isfinite(cfg.noise_sd) and cfg.noise_sd >= 0):
        raise CertkdError(f"--noise-sd must be a number >= 0, got {cfg.noise_sd}")
    if spec.needs_teacher and cfg.teacher is None:
        raise CertkdError(f"method {spec.name} distils a teacher: give --teacher t.pt")
    if not spec.needs_teacher and cfg.teacher is not None:
        raise CertkdError(f"method {spec.name} uses no teacher; drop --teacher (distillation methods: "
                          "kd, kdiga, ard, rslad)")
    needs_eps = spec.uses_attack or (spec.name == "kdiga" and params.iga_on == "noisy")
    if needs_eps and not params.eps:
        raise CertkdError(f"method {spec.name} attacks within a ball: give --eps > 0 (e.g. 8/255 on CIFAR, "
                          "0.1 on digits)")
    return params


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


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, weight decay) or Adam; cosine or step (x0.1 at 50 % and 75 %) per epoch."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    else:
        milestones = sorted({max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return opt, sched


def _resume_state(path: Path, cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch_load_weights_only(path, "resume state")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: not a certkd resume state; delete it to start over")
    old = state["config"]
    diff = [k for k in cfg_dict if k not in _RESUME_FREE and old.get(k) != cfg_dict[k]]
    if diff:
        raise CertkdError(f"--resume with different settings than the interrupted run ({', '.join(diff)}); "
                          "use the same command or a new --out")
    return state


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
    """Clean accuracy and PGD accuracy (margin loss, ``steps`` steps; an estimate) of ``model`` on (x, y).

    Under torchrun each rank takes a slice and the counts are summed.
    """
    d = dist_info or _Dist(device=next(model.parameters()).device)
    idx = torch.arange(d.rank, len(y), d.world)
    x, y = x[idx], y[idx]
    gen = _generator(_epoch_seed(seed, 0, d.rank), d.device)
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    was_training = model.training
    model.eval()
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(d.device), y[i:i + batch_size].to(d.device)
        with torch.no_grad():
            counts[0] += (model(xb).argmax(1) == yb).sum()
        if eps is not None:
            res = attack.pgd(model, xb, yb, eps, norm, steps=steps, generator=gen)
            counts[1] += (res.margin > 0).sum()
        counts[2] += len(yb)
    model.train(was_training)
    counts = d.all_sum(counts)
    n = max(float(counts[2]), 1.0)
    return {"clean_acc": float(counts[0]) / n, "pgd_acc": float(counts[1]) / n if eps is not None else None}


def _validation_subset(dataset: str, data_dir: Path | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of the test split (the same for every run and seed)."""
    test = load_dataset(dataset, "test", data_dir)
    order = torch.randperm(len(test), generator=_generator(VAL_SPLIT_SEED, torch.device("cpu")))
    idx = order[:size]
    return test.x[idx], test.y[idx]


def train(cfg: TrainConfig) -> Path:
    """Train the student of ``cfg`` (theory.md §4); returns the path of the final checkpoint ``cfg.out``.

    Raises ``CertkdError`` (one sentence) for bad settings, an incompatible teacher, or a NaN/Inf loss
    (``TrainingDiverged``; the checkpoints of the last good epoch stay on disk).
    """
    spec = get_loss(cfg.method)
    params = _check_config(cfg, spec)
    cfg_dict = replace(cfg, params=params).to_dict()
    d = _setup_distributed(cfg.device)
    try:
        return _train(cfg, spec, params, cfg_dict, d)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, spec: LossSpec, params: MethodParams, cfg_dict: dict[str, Any], d: _Dist) -> Path:
    paths = cfg.paths()
    train_set = load_dataset(cfg.dataset, "train", cfg.data_dir)
    info = train_set.info
    x_val, y_val = _validation_subset(cfg.dataset, cfg.data_dir, cfg.val_size)
    val_eps = cfg.val_eps if cfg.val_eps is not None else params.eps

    teacher, teacher_sha = (None, None)
    if cfg.teacher is not None:
        teacher, teacher_sha = _load_teacher(Path(cfg.teacher), info, d.device)
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.arch, num_classes=info.num_classes, input_shape=info.input_shape,
                           mean=info.mean, std=info.std, **cfg.arch_kwargs)
    init_report = _load_init(student, Path(cfg.init)) if cfg.init is not None else None
    if init_report and d.main:
        _say(f"init: loaded {init_report['loaded']} of {init_report['total']} tensors from {cfg.init} "
             f"({init_report['model']} -> {cfg.arch})"
             + (f"; kept fresh: {', '.join(init_report['skipped'])}" if init_report["skipped"] else ""))
    student.to(d.device).train()

    per_rank = cfg.batch_size // d.world if d.world > 1 else cfg.batch_size
    if per_rank < 1:
        raise CertkdError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} processes")
    n_per_rank = len(train_set) // d.world
    optimizer, scheduler = _make_optimizer(cfg, student)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and d.device.type == "cuda")

    start_epoch, best = 0, -math.inf
    state = _resume_state(paths["resume"], cfg_dict) if cfg.resume else None
    if cfg.resume and state is None and d.main:
        _say(f"resume: no state at {paths['resume']}, starting at epoch 1")
    if state is not None:
        if state["teacher_sha256"] != teacher_sha:
            raise CertkdError(f"--resume: the teacher file {cfg.teacher} changed since the interrupted run")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        if d.main:
            _keep_metrics_until(paths["metrics"], start_epoch)
            _say(f"resume: continuing after epoch {start_epoch} of {cfg.epochs}")
    elif d.main:
        for key in ("metrics", "resume"):
            paths[key].unlink(missing_ok=True)

    model = nn.parallel.DistributedDataParallel(student) if d.world > 1 else student
    prov_extra = {"method": spec.name, "world_size": d.world}
    if init_report:
        prov_extra["init"] = init_report
    prov = provenance(cfg.seed, teacher=cfg.teacher, **prov_extra)

    metrics_log = JsonlAppender(paths["metrics"]) if d.main else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            terms = _train_epoch(cfg, spec, params, model, student, teacher, train_set, epoch, per_rank,
                                 n_per_rank, optimizer, scaler, d, paths)
            scheduler.step()
            val = evaluate(student, x_val, y_val, val_eps, params.norm, cfg.val_attack_steps, cfg.seed,
                           dist_info=d)
            row = {"epoch": epoch + 1, "lr": lr, **terms, **val, "val_eps": val_eps, "norm": params.norm,
                   "seconds": round(time.perf_counter() - t0, 3)}
            score = val[spec.select] if val[spec.select] is not None else val["clean_acc"]
            if d.main:
                ckpt = make_checkpoint(student, cfg.arch, cfg.arch_kwargs, info, config=cfg_dict,
                                       metrics={**row, "best_" + spec.select: max(best, score)},
                                       provenance_info=prov)
                save_checkpoint(ckpt, paths["last"])
                if score > best:
                    save_checkpoint(ckpt, paths["best"])
                metrics_log.write([row])
                _save_resume_state(paths["resume"], {
                    "epoch": epoch + 1, "best": max(best, score), "config": cfg_dict, "teacher_sha256": teacher_sha,
                    "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})
            best = max(best, score)
        if d.world > 1:
            dist.barrier()
    finally:
        if metrics_log is not None:
            metrics_log.close()
    return paths["last"]


def _train_epoch(cfg: TrainConfig, spec: LossSpec, params: MethodParams, model: nn.Module, student: nn.Module,
                 teacher: nn.Module | None, train_set, epoch: int, per_rank: int, n_per_rank: int,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, d: _Dist,
                 paths: dict[str, Path]) -> dict[str, float]:
    """One pass over this rank's share of a (seed, epoch)-shuffled training set; returns mean loss terms."""
    seed = _epoch_seed(cfg.seed, epoch + 1, d.rank)
    torch.manual_seed(seed)
    shuffle = _generator(_epoch_seed(cfg.seed, epoch + 1), torch.device("cpu"))  # the same on every rank
    order = torch.randperm(len(train_set), generator=shuffle)
    mine = order[d.rank::d.world][:n_per_rank]
    gen = _generator(seed, d.device)
    sums: dict[str, torch.Tensor] = {}
    batches = range(0, n_per_rank, per_rank)
    bar = tqdm(batches, desc=f"{spec.name} epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, leave=False,
               disable=not (cfg.progress and d.main))
    model.train()
    for step, start in enumerate(bar):
        idx = mine[start:start + per_rank]
        x = gaussian_noise(train_set.x[idx].to(d.device), cfg.noise_sd, gen)
        batch = LossBatch(x=x, y=train_set.y[idx].to(d.device), student=model, student_bare=student,
                          teacher=teacher, generator=gen)
        out = compute_loss(spec, params, batch, cfg.amp)
        loss = out["loss"]
        finite = d.all_sum(torch.isfinite(loss.detach()).float().reshape(1)).item() == d.world
        if not finite:
            raise TrainingDiverged(_diverged_message(spec.name, epoch, step, out, paths))
        optimizer_step(loss, optimizer, scaler)
        for key, value in out.items():
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=d.device)) \
                + value.detach().double() * len(idx)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    count = d.all_sum(torch.tensor(float(n_per_rank), dtype=torch.float64, device=d.device))
    return {key: float(d.all_sum(total) / count) for key, total in sums.items()}


def compute_loss(spec: LossSpec, params: MethodParams, batch: LossBatch, amp: bool = False
                 ) -> dict[str, torch.Tensor]:
    """The objective's terms on one batch (under autocast with ``amp``)."""
    with _autocast(batch.x.device, amp):
        return spec.fn(batch, params)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward pass (through the loss scaler) and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _diverged_message(method: str, epoch: int, step: int, out: dict[str, torch.Tensor],
                      paths: dict[str, Path]) -> str:
    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.items())
    kept = f"the last good checkpoint {paths['last']} (epoch {epoch}) is kept" if epoch > 0 and \
        paths["last"].exists() else "no checkpoint was written"
    return (f"{method} loss is not finite at epoch {epoch + 1}, step {step + 1} ({terms}); training stopped and "
            f"{kept}; lower --lr or check the data")


def _keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after the resume point (written just before an interruption)."""
    rows = [r for r in read_jsonl(path) if int(r.get("epoch", 0)) <= epoch]
    atomic_write(path, lambda fh: fh.writelines(json.dumps(r) + "\n" for r in rows))


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
