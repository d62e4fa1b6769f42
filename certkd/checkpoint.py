"""The certkd checkpoint: one self-contained ``ckpt.pt`` (format version 1).

Saved atomically; loaded with ``torch.load(weights_only=True)`` so a checkpoint
never runs code. Every failure to load is a ``CheckpointError`` with one sentence.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkd.errors import CertkdError, CheckpointError
from certkd.io import atomic_write

FORMAT_VERSION = 1
MAGIC = "certkd-checkpoint"
_REQUIRED = ("format", "format_version", "model", "dataset", "input_shape", "num_classes", "normalization",
             "state_dict")


@dataclass
class Checkpoint:
    """The contents of a certkd checkpoint (see ``certkd info``)."""

    model_name: str
    model_kwargs: dict[str, Any]
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: list[float]
    std: list[float]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The registry model with these weights, in eval mode."""
        from certkd.models import create_model

        try:
            model = create_model(self.model_name, num_classes=self.num_classes, input_shape=self.input_shape,
                                 mean=self.mean, std=self.std, **self.model_kwargs)
        except CertkdError as exc:
            raise CheckpointError(f"{self._where()}: {exc}") from None
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(s.strip() for s in first[1:3]) if len(first) > 1 else first[0]
            raise CheckpointError(f"{self._where()}: weights do not match model {self.model_name!r}: {detail}") \
                from None
        return model.to(device).eval()

    def _where(self) -> str:
        return str(self.path) if self.path else "checkpoint"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MAGIC,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "kwargs": self.model_kwargs},
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "state_dict": self.state_dict,
            "config": self.config,
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    def summary(self) -> dict[str, Any]:
        """Everything but the weights, for ``certkd info`` and reports."""
        d = self.to_dict()
        d.pop("state_dict")
        d["parameters"] = int(sum(t.numel() for k, t in self.state_dict.items() if "running" not in k
                                  and "num_batches" not in k))
        return d


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(seed: int | None = None, teacher: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    import certkd

    prov: dict[str, Any] = {"certkd_version": certkd.__version__, "torch_version": str(torch.__version__),
                            "python_version": platform.python_version(), "seed": seed}
    if teacher is not None:
        prov["teacher_path"] = str(teacher)
        prov["teacher_sha256"] = file_sha256(teacher)
    prov.update(extra)
    return prov


def make_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict[str, Any], dataset_info: Any,
                    config: dict | None = None, metrics: dict | None = None,
                    provenance_info: dict | None = None) -> Checkpoint:
    """Wrap a registry model (built with ``dataset_info``'s shape and normalization)."""
    return Checkpoint(
        model_name=model_name,
        model_kwargs=dict(model_kwargs),
        dataset=dataset_info.name,
        input_shape=tuple(dataset_info.input_shape),
        num_classes=int(dataset_info.num_classes),
        mean=[float(v) for v in dataset_info.mean],
        std=[float(v) for v in dataset_info.std],
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        config=dict(config or {}),
        metrics=dict(metrics or {}),
        provenance=dict(provenance_info or provenance()),
    )


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Atomic save: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
    ckpt.path = path
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate; raises ``CheckpointError`` with one sentence on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise CheckpointError(f"{path}: refused to load (weights_only=True): {reason}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}") from None
    return _validate(raw, path)


def _validate(raw: Any, path: Path) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != MAGIC:
        raise CheckpointError(f"{path}: not a certkd checkpoint (wrap external weights with 'certkd convert')")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: certkd checkpoint is missing {', '.join(missing)}")
    if raw["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {raw['format_version']} is newer than this certkd "
                              f"supports ({FORMAT_VERSION}); upgrade certkd")
    state = raw["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of tensors")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: weight {name!r} contains NaN or Inf values")
    model = raw["model"]
    norm = raw["normalization"]
    return Checkpoint(
        model_name=str(model["name"]),
        model_kwargs=dict(model.get("kwargs", {})),
        dataset=str(raw["dataset"]),
        input_shape=tuple(int(s) for s in raw["input_shape"]),
        num_classes=int(raw["num_classes"]),
        mean=[float(v) for v in norm["mean"]],
        std=[float(v) for v in norm["std"]],
        state_dict=state,
        config=dict(raw.get("config") or {}),
        metrics=dict(raw.get("metrics") or {}),
        provenance=dict(raw.get("provenance") or {}),
        path=path,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """RobustBench-style: the model stored in ``path``, in eval mode, inputs in [0, 1]."""
    return load_checkpoint(path).build_model(device)


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Teacher and student must agree on input shape and number of classes."""
    if tuple(a.input_shape) != tuple(b.input_shape) or a.num_classes != b.num_classes:
        raise CheckpointError(
            f"checkpoints do not fit each other: {a._where()} takes {tuple(a.input_shape)} with "
            f"{a.num_classes} classes, {b._where()} takes {tuple(b.input_shape)} with {b.num_classes} classes")



__all__ = ["Checkpoint", "FORMAT_VERSION", "make_checkpoint", "save_checkpoint", "load_checkpoint", "load_model",
           "check_compatible", "file_sha256", "provenance"]
