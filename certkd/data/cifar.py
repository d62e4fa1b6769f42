"""CIFAR-10 (Krizhevsky 2009) from the standard python-pickle batches.

Expected files (the ``cifar-10-python.tar.gz`` archive, extracted), in
``data_dir/cifar-10-batches-py/`` or directly in ``data_dir``::

    data_batch_1 ... data_batch_5   test_batch   (batches.meta is not needed: the class names are fixed)

Each batch is a pickled dict ``{b"data": uint8 array (N, 3072), b"labels": [int] * N, ...}``
(rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image). The batches are
read with ``RestrictedUnpickler``, which builds numpy arrays and plain containers only
and refuses every other global, so a crafted file cannot run code.
Nothing is downloaded unless the user sets ``CERTKD_DOWNLOAD=1`` and torchvision is installed.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certkd.data._files import DOWNLOAD_ENV, download_requested, resolve_data_dir, torchvision_download
from certkd.data._registry import Dataset, DatasetInfo, register_dataset
from certkd.errors import DataError

SUBFOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
INFO = DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                   ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"))


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What rebuilds an ndarray from a pickle: numpy's reconstruction functions (numpy 1.x and 2.x names)
    and ``_codecs.encode`` (protocol-2 pickles written by Python 3 store bytes through it)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]  # numpy 1.x home
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): codecs.encode}
    frombuffer = numeric._frombuffer  # type: ignore[attr-defined]  # private: not in numpy's stubs
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referred to something other than numpy's array reconstruction."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: ``find_class`` allows only numpy array reconstruction.

    Pickle can call any importable function while loading; this subclass resolves only
    ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct``,
    ``numpy.core.numeric._frombuffer`` (and their ``numpy._core`` spellings) and
    ``_codecs.encode`` (str -> bytes), none of which runs code of the file's choosing, and
    raises ``ForbiddenGlobal`` for anything else, before it is imported or called.
    """

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def restricted_pickle_load(path: Path) -> Any:
    """Load a pickled data file with ``RestrictedUnpickler`` (``encoding="bytes"`` for Python 2 pickles)."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused to unpickle: the file refers to {exc}, not only numpy arrays") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read this file") from None
    except Exception as exc:  # arbitrary bytes fail to unpickle in many ways (EOFError, KeyError, ValueError, ...)
        raise DataError(f"{path}: not a readable python pickle (truncated or corrupt: "
                        f"{type(exc).__name__})") from None


def _field(batch: dict[Any, Any], key: str) -> Any:
    return batch.get(key.encode(), batch.get(key))


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    batch = restricted_pickle_load(path)
    data = _field(batch, "data") if isinstance(batch, dict) else None
    labels = _field(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict with 'data' and 'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: CIFAR-10 'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: CIFAR-10 'labels' must be a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= INFO.num_classes):
        raise DataError(f"{path}: labels must lie in 0..{INFO.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def cifar_folder(root: Path, batch_names: tuple[str, ...]) -> Path | None:
    """``root/cifar-10-batches-py`` or ``root``, whichever holds every file of ``batch_names``."""
    for folder in (root / SUBFOLDER, root):
        if all((folder / name).is_file() for name in batch_names):
            return folder
    return None


@register_dataset("cifar10", INFO)
def load_cifar10(split: str, data_dir: Path | None = None) -> Dataset:
    """CIFAR-10, 32x32x3, 50,000 train / 10,000 test (python batches in DATA_DIR/cifar-10-batches-py)."""
    root = resolve_data_dir(data_dir)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    folder = cifar_folder(root, names)
    if folder is None and download_requested():
        torchvision_download("CIFAR10", root, train=split == "train")
        folder = cifar_folder(root, names)
    if folder is None:
        raise DataError(f"cifar10 {split} data not found: expected {', '.join(names)} in {root / SUBFOLDER} "
                        f"(or {root}); download and extract {URL} there (or install torchvision and set "
                        f"{DOWNLOAD_ENV}=1)")
    parts = [read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return Dataset(x, torch.from_numpy(labels), INFO)
