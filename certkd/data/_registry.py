"""Dataset registry and the tensors-plus-metadata container."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certkd.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())


@dataclass
class Dataset:
    """Inputs ``x`` in [0, 1] of shape (N, C, H, W) (float32) and labels ``y`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: torch.Tensor | list[int]) -> Dataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], self.info)

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and labels at ``indices``: the one way run loops read data (streamed datasets too)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


Loader = Callable[[str, "Path | None"], Dataset]
_DATASETS: dict[str, Loader] = {}
_INFOS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, info: DatasetInfo | None = None) -> Callable[[Loader], Loader]:
    """Register a loader ``fn(split, data_dir)``; ``info`` makes ``dataset_info(name)`` work without data."""
    def deco(fn: Loader) -> Loader:
        _DATASETS[name] = fn
        if info is not None:
            _INFOS[name] = info
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def _check_known(name: str) -> None:
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")


def dataset_info(name: str) -> DatasetInfo:
    """The metadata (shape, classes, normalization) of dataset ``name``, without reading any data."""
    _check_known(name)
    if name not in _INFOS:
        raise DataError(f"dataset {name!r} was registered without metadata")
    return _INFOS[name]


def dataset_description(name: str) -> str:
    """The first line of the loader's docstring (``certkd datasets``)."""
    _check_known(name)
    doc = (_DATASETS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def load_dataset(name: str, split: str = "test", data_dir: str | Path | None = None) -> Dataset:
    """Load ``split`` (``train`` or ``test``) of dataset ``name``; see ``certkd datasets``."""
    _check_known(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use train or test")
    return _DATASETS[name](split, Path(data_dir) if data_dir is not None else None)
