"""MNIST and Fashion-MNIST from the standard idx files (LeCun et al.; Xiao et al. 2017).

Files, gzipped or not, in ``data_dir`` or in the folder torchvision uses
(``data_dir/MNIST/raw``, ``data_dir/FashionMNIST/raw``)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

Nothing is downloaded unless the user sets ``CERTKD_DOWNLOAD=1`` and torchvision is installed.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from certkd.data._files import DOWNLOAD_ENV, download_requested, resolve_data_dir, torchvision_download
from certkd.data._registry import Dataset, DatasetInfo, register_dataset
from certkd.errors import DataError

IMAGE_SIZE = 28
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
"""The idx element-type byte -> numpy dtype (multi-byte types are big-endian)."""
SPLIT_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

MNIST_INFO = DatasetInfo("mnist", (1, IMAGE_SIZE, IMAGE_SIZE), 10, (0.1307,), (0.3081,),
                         tuple(str(i) for i in range(10)))
FASHION_MNIST_INFO = DatasetInfo(
    "fashion-mnist", (1, IMAGE_SIZE, IMAGE_SIZE), 10, (0.2860,), (0.3530,),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))


@dataclass(frozen=True)
class IdxSource:
    """Where one idx dataset lives: torchvision's sub-folder and class, and where to get the files."""

    info: DatasetInfo
    subfolder: str
    torchvision_class: str
    url: str


MNIST = IdxSource(MNIST_INFO, "MNIST", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/")
FASHION_MNIST = IdxSource(FASHION_MNIST_INFO, "FashionMNIST", "FashionMNIST",
                          "https://github.com/zalandoresearch/fashion-mnist")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain, detected from its first bytes).

    Format: two zero bytes, one element-type byte (``IDX_DTYPES``), one byte with the
    number of dimensions ``n``, ``n`` big-endian uint32 sizes, then the elements in
    row-major order. Returns an array of the stored type in native byte order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read this idx file ({' '.join(str(exc).split())})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'none'}); "
                        f"expected the standard LeCun idx format")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx file is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: idx file holds {len(raw) - header} data bytes but its header {shape} announces "
                        f"{expected} (truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(folder: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx")
    return [folder / name for name in (stem, stem + ".gz", dotted, dotted + ".gz")]


def find_idx_file(folders: list[Path], stem: str) -> Path | None:
    """The first existing ``stem``, ``stem.gz`` (or the ``.idx`` dotted spelling) in ``folders``."""
    for folder in folders:
        for candidate in _candidates(folder, stem):
            if candidate.is_file():
                return candidate
    return None


def load_idx_split(source: IdxSource, split: str, data_dir: str | Path | None) -> Dataset:
    """Images (N, 1, 28, 28) in [0, 1] (pixel / 255) and labels of one split of ``source``."""
    root = resolve_data_dir(data_dir)
    folders = [root, root / source.subfolder / "raw", root / source.subfolder]
    stems = SPLIT_STEMS[split]
    paths = [find_idx_file(folders, stem) for stem in stems]
    if None in paths and download_requested():
        torchvision_download(source.torchvision_class, root, train=split == "train")
        paths = [find_idx_file(folders, stem) for stem in stems]
    images_path, labels_path = paths
    if images_path is None or labels_path is None:
        raise DataError(
            f"{source.info.name} {split} data not found: expected {stems[0]}[.gz] and {stems[1]}[.gz] in {root} "
            f"or {root / source.subfolder / 'raw'}; download them from {source.url} (or install torchvision and "
            f"set {DOWNLOAD_ENV}=1)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{images_path}: expected uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), found "
                        f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise DataError(f"{labels_path}: expected {images.shape[0]} uint8 labels to match {images_path.name}, "
                        f"found {labels.dtype} {labels.shape}")
    if labels.size and int(labels.max()) >= source.info.num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} is out of range for "
                        f"{source.info.num_classes} classes")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), source.info)


@register_dataset("mnist", MNIST_INFO)
def load_mnist(split: str, data_dir: Path | None = None) -> Dataset:
    """MNIST handwritten digits, 28x28x1, 60,000 train / 10,000 test (idx files in DATA_DIR)."""
    return load_idx_split(MNIST, split, data_dir)


@register_dataset("fashion-mnist", FASHION_MNIST_INFO)
def load_fashion_mnist(split: str, data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST clothing images, 28x28x1, 60,000 train / 10,000 test (idx files in DATA_DIR)."""
    return load_idx_split(FASHION_MNIST, split, data_dir)
