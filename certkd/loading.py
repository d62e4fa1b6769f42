"""Loading what a run reads: checkpoints (one, or a student and its teacher) and the evaluated points.

Shared by every command (certify, compare, bounds, ablate, demo and the Python API); each check
fails with one sentence before any long work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkd.data import Points
from certkd.errors import CertkdError
from certkd.run import RunSettings


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or one sentence when it does not exist here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CertkdError(f"unknown device {device!r} (examples: cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertkdError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def check_fits(input_shape: Sequence[int], num_classes: int, data: Points, data_name: str = "data") -> None:
    """Raise ``CertkdError`` when the data cannot be fed to the model; reads one sample only.

    Classes are checked through ``data.info`` when the data has one (labels of every
    batch are checked again as they are read).
    """
    info = getattr(data, "info", None)
    if info is not None and int(info.num_classes) != int(num_classes):
        raise CertkdError(f"{data_name} has {info.num_classes} classes but the model has {num_classes}")
    if len(data) == 0:
        raise CertkdError(f"{data_name} holds no examples")
    x, _ = data.batch([0])
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise CertkdError(f"{data_name} has inputs of shape {tuple(x.shape[1:])} but the model takes "
                          f"{tuple(input_shape)}")


def load_points(ckpt: Any, dataset: str | None, split: str, data_dir: Path | None,
                num_examples: int | None) -> tuple[str, Any, int]:
    """``(dataset name, dataset, count)``: the checkpoint's dataset unless named, checked to fit it."""
    from certkd.data import load_dataset

    name = dataset or ckpt.dataset
    data = load_dataset(name, split, data_dir)
    check_fits(ckpt.input_shape, ckpt.num_classes, data, f"dataset {name!r}")
    return name, data, len(data) if num_examples is None else min(num_examples, len(data))


def load_pair(student_path: Path, teacher_path: Path, settings: RunSettings
              ) -> tuple[Any, nn.Module, nn.Module, Any, dict[str, Any]]:
    """``(student checkpoint, student, teacher, points, sources)`` of a run on a student and its teacher.

    The checkpoints are checked to fit each other (input shape, classes), their models built on
    ``settings.device``, the points those of ``settings`` (default: the student's dataset);
    ``sources`` says where the inputs come from, the first part of the run's configuration.
    """
    from certkd.checkpoint import check_compatible, file_sha256, load_checkpoint

    check_device(settings.device)
    student_ckpt, teacher_ckpt = load_checkpoint(student_path), load_checkpoint(teacher_path)
    check_compatible(student_ckpt, teacher_ckpt)
    student, teacher = student_ckpt.build_model(settings.device), teacher_ckpt.build_model(settings.device)
    name, data, count = load_points(student_ckpt, settings.dataset, settings.split, settings.data_dir,
                                    settings.num_examples)
    sources = {"student_sha256": file_sha256(student_path), "teacher_sha256": file_sha256(teacher_path),
               "dataset": name, "split": settings.split, "num_examples": count}
    return student_ckpt, student, teacher, data, sources
