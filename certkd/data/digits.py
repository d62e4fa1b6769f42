"""scikit-learn's embedded 8x8 digits (1,797 images, ships inside the package: no download)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from certkd.data._registry import Dataset, DatasetInfo, register_dataset

SPLIT_SEED = 0
TEST_FRACTION = 0.25
INFO = DatasetInfo("digits", (1, 8, 8), 10, (0.305,), (0.378,), tuple(str(i) for i in range(10)))


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y))


@register_dataset("digits", INFO)
def load_digits_split(split: str, data_dir: Path | None = None) -> Dataset:
    """A fixed stratified 75/25 split (seed 0): 1,347 train and 450 test images in [0, 1]."""
    x_train, x_test, y_train, y_test = _split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), INFO)
