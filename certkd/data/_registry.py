"""Dataset registry and the datasets run loops read from.

Run loops read data only through :class:`Points`: ``len(dataset)`` and
``dataset.batch(indices) -> (x, y)``; training also reads ``dataset.info`` and ``dataset.y``
(labels, known without reading any input; :class:`BatchSource`). ``Dataset`` holds its tensors in memory;
streamed datasets (``certkd.data.imagenet.ImageFolderDataset``) decode each input when
a batch asks for it, so a 50,000-image split never sits in memory.

The registry is a :class:`certkd.registry.Registry` with the entry-point group
``certkd.datasets``: an installed package adds a dataset with::

    [project.entry-points."certkd.datasets"]
    mydata = "my_package.data:load_mydata"   # a loader fn(split, data_dir) with an ``info`` attribute
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from certkd.errors import CertkdError, DataError
from certkd.registry import Registry, describe

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


class Points(Protocol):
    """What certify, compare and bounds read data through: ``len`` and ``batch(indices) -> (x, y)`` (x in [0, 1])."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


class BatchSource(Points, Protocol):
    """What training reads besides: the dataset's ``info`` and its labels ``y``."""

    info: DatasetInfo
    y: torch.Tensor

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TensorPoints:
    """In-memory points ``(x, y)`` with no dataset behind them (the Python API's tensors), checked when made:
    floating-point, finite pixels and one integer class index per example, else one sentence.

    Example
    -------
    >>> pts = TensorPoints(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))
    >>> len(pts), pts.batch([2])[1].tolist()
    (3, [2])
    >>> TensorPoints(torch.zeros(2, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    Traceback (most recent call last):
    certkd.errors.CertkdError: the inputs are uint8; certkd takes floating-point pixels in [0, 1] ...
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        from bounds.inputs import check_finite

        x, y = torch.as_tensor(self.x), torch.as_tensor(self.y)
        if not x.is_floating_point():
            raise CertkdError(f"the inputs are {str(x.dtype).removeprefix('torch.')}; certkd takes floating-point "
                              "pixels in [0, 1] (for 0-255 images pass x.float() / 255)")
        check_finite(x)
        if y.dim() != 1:
            raise CertkdError(f"labels must be one class index per example, shape (B,); got shape {tuple(y.shape)}")
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise CertkdError("labels must be class indices (integers), got fractional values")
        if y.is_complex() or y.dtype == torch.bool:
            raise CertkdError(f"labels must be class indices (integers), got {str(y.dtype).removeprefix('torch.')}")
        if len(x) != len(y):
            raise CertkdError(f"inputs and labels differ in length ({len(x)} and {len(y)})")
        self.x, self.y = x.float(), y.long()

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]


@dataclass
class Dataset:
    """Inputs ``x`` in [0, 1] of shape (N, C, H, W) (float32) and labels ``y`` (int64), in memory."""

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


Loader = Callable[[str, "Path | None"], BatchSource]
DATASETS: Registry[Loader] = Registry("dataset", group="certkd.datasets")


def register_dataset(name: str, info: DatasetInfo | None = None) -> Callable[[Loader], Loader]:
    """Register a loader ``fn(split, data_dir)``; ``info`` (kept as ``fn.info``) makes ``dataset_info`` work
    without reading data."""
    def deco(fn: Loader) -> Loader:
        if info is not None:
            fn.info = info  # type: ignore[attr-defined]
        return DATASETS.add(name, fn)
    return deco


def list_datasets() -> list[str]:
    return DATASETS.names()


def _loader(name: str) -> Loader:
    try:
        return DATASETS.get(name)
    except CertkdError as exc:
        raise DataError(str(exc)) from None


def dataset_info(name: str) -> DatasetInfo:
    """The metadata (shape, classes, normalization) of dataset ``name``, without reading any data."""
    info = getattr(_loader(name), "info", None)
    if not isinstance(info, DatasetInfo):
        raise DataError(f"dataset {name!r} was registered without metadata (a DatasetInfo as the loader's .info)")
    return info


def dataset_description(name: str) -> str:
    """The first line of the loader's docstring (``certkd datasets``)."""
    return describe(_loader(name))


def load_dataset(name: str, split: str = "test", data_dir: str | Path | None = None) -> BatchSource:
    """Dataset ``name`` (``certkd datasets`` lists them), read through ``batch(indices)``.

    Parameters
    ----------
    name : str
        A registered dataset.
    split : str
        ``train`` or ``test``.
    data_dir : str or Path, optional
        Where its files live.

    Returns
    -------
    BatchSource
        Inputs in ``[0, 1]``; ``len``, ``batch(indices)`` and ``info``.

    Example
    -------
    >>> load_dataset("digits").info.num_classes
    10
    """
    loader = _loader(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use train or test")
    return loader(split, Path(data_dir) if data_dir is not None else None)
