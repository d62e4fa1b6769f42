"""Datasets: the embedded digits split, and the idx / CIFAR-batch readers on tiny files in the standard formats."""

import gzip
import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import idx_bytes, write_idx, write_mnist_split
from hostile import RunsCodeWhenUnpickled

from certkd.data import dataset_info, list_datasets, load_dataset
from certkd.data.cifar import read_cifar_batch
from certkd.data.mnist import read_idx
from certkd.errors import DataError

# ---------------------------------------------------------------- writers of the standard formats


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, protocol: int = 2) -> None:
    """A CIFAR-10 python batch: a pickled dict with bytes keys, data uint8 (N, 3072) (R, G, B planes)."""
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(images), -1), b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)


def random_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=n)




# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_stratified_and_in_unit_box():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    again = load_dataset("digits", "test")
    assert torch.equal(test.x, again.x) and torch.equal(test.y, again.y)
    assert (len(train), len(test)) == (1347, 450)
    assert train.x.shape[1:] == test.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    # stratified: each class's share of the test split is the overall test fraction (up to rounding)
    totals = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * totals) <= 1)
    assert np.array_equal(test_counts + np.bincount(train.y.numpy(), minlength=10), totals)
    # train and test partition the 1,797 images (as multisets of (image, label) rows)
    full = load_digits()
    full_rows = Counter(((row / 16.0).astype(np.float32).tobytes(), int(y)) for row, y in zip(full.data, full.target,
                                                                                             strict=True))
    split_rows = Counter((x.numpy().tobytes(), int(y)) for part in (train, test)
                         for x, y in zip(part.x, part.y, strict=True))
    assert split_rows == full_rows


def test_every_dataset_has_consistent_metadata():
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "imagenet"} <= set(list_datasets())
    for name in list_datasets():
        info = dataset_info(name)
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.input_shape[0]
        assert all(s > 0 for s in info.std) and all(0 <= m <= 1 for m in info.mean)
        assert not info.class_names or len(info.class_names) == info.num_classes


@pytest.mark.parametrize("name, split", [("no_such_dataset", "test"), ("digits", "validation")])
def test_unknown_dataset_or_split(name, split):
    with pytest.raises(DataError, match="unknown"):
        load_dataset(name, split)


# ---------------------------------------------------------------- idx (MNIST, Fashion-MNIST)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name, layout", [("mnist", ""), ("mnist", "MNIST/raw"),
                                          ("fashion-mnist", "FashionMNIST/raw")])
def test_idx_dataset_reads_the_standard_files(tmp_path, name, layout, gz):
    folder = tmp_path / layout if layout else tmp_path
    train_images, train_labels = write_mnist_split(folder, "train", 5, gz, seed=1)
    test_images, test_labels = write_mnist_split(folder, "test", 3, gz, seed=2)
    train, test = load_dataset(name, "train", tmp_path), load_dataset(name, "test", tmp_path)
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert torch.equal(train.x[:, 0], torch.from_numpy(train_images).float() / 255)
    assert torch.equal(test.x[:, 0], torch.from_numpy(test_images).float() / 255)
    assert train.y.tolist() == train_labels.tolist() and test.y.tolist() == test_labels.tolist()
    assert train.y.dtype == torch.int64 and train.info == dataset_info(name)


@pytest.mark.parametrize("dtype, type_byte", [(np.int32, 0x0C), (np.int16, 0x0B), (np.float32, 0x0D),
                                              (np.float64, 0x0E), (np.int8, 0x09)])
def test_read_idx_handles_big_endian_types(tmp_path, dtype, type_byte):
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    path = write_idx(tmp_path / "values-idx3", array, gz=False, type_byte=type_byte)
    result = read_idx(path)
    assert result.shape == (2, 3, 4) and np.array_equal(result, array)


@pytest.mark.parametrize("defect, match", [
    ("truncated", "truncated or corrupt"),
    ("bad_magic", "not an idx file"),
    ("truncated_gzip", "cannot read this idx file"),
    ("wrong_image_size", "expected uint8 images of shape"),
    ("label_count", "labels to match"),
    ("label_range", "out of range"),
])
def test_malformed_idx_files_give_clear_errors(tmp_path, defect, match):
    write_mnist_split(tmp_path, "test", 4, gz=False)
    images_path, labels_path = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    if defect == "truncated":
        images_path.write_bytes(images_path.read_bytes()[:-1])
    elif defect == "bad_magic":
        images_path.write_bytes(b"\x12\x34" + images_path.read_bytes()[2:])
    elif defect == "truncated_gzip":
        images_path.rename(tmp_path / "unused")
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28),
                                                                                             np.uint8)))[:-20])
    elif defect == "wrong_image_size":
        write_idx(images_path, np.zeros((4, 8, 8), np.uint8), gz=False)
    elif defect == "label_count":
        write_idx(labels_path, np.zeros(3, np.uint8), gz=False)
    else:
        write_idx(labels_path, np.array([0, 1, 2, 10], np.uint8), gz=False)
    with pytest.raises(DataError, match=match) as info:
        load_dataset("mnist", "test", tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- CIFAR-10 batches


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("subfolder", ["cifar-10-batches-py", ""])
def test_cifar_batches_are_read_in_the_standard_layout(tmp_path, subfolder, protocol):
    folder = tmp_path / subfolder if subfolder else tmp_path
    parts = [random_cifar(2, seed) for seed in range(5)]
    for i, (images, labels) in enumerate(parts, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", images, labels, protocol)
    test_images, test_labels = random_cifar(3, 9)
    write_cifar_batch(folder / "test_batch", test_images, test_labels, protocol)

    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    expected = np.concatenate([p[0] for p in parts])
    assert torch.equal(train.x, torch.from_numpy(expected).float() / 255)
    assert train.y.tolist() == np.concatenate([p[1] for p in parts]).tolist()
    # pixel layout: row of 3072 = 1024 red, 1024 green, 1024 blue values, each plane row-major
    flat = test_images.reshape(3, -1)
    assert test.x[1, 2, 5, 7] == torch.tensor(float(flat[1, 2 * 1024 + 5 * 32 + 7])) / 255
    assert test.y.tolist() == test_labels.tolist() and test.info.class_names[0] == "airplane"


def test_cifar_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "test_batch"
    with open(path, "wb") as fh:
        pickle.dump({b"data": RunsCodeWhenUnpickled(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError, match="refused to unpickle"):
        read_cifar_batch(path)
    assert not marker.exists()


@pytest.mark.parametrize("defect, match", [
    ("truncated", "truncated or corrupt"),
    ("not_a_dict", "not a CIFAR-10 python batch"),
    ("wrong_width", "must be uint8 of shape"),
    ("label_count", "labels for"),
    ("missing_batch", "expected data_batch_1"),
])
def test_malformed_cifar_batches_give_clear_errors(tmp_path, defect, match):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", *random_cifar(2, i))
    target = folder / "data_batch_3"
    if defect == "truncated":
        target.write_bytes(target.read_bytes()[:-50])
    elif defect == "not_a_dict":
        with open(target, "wb") as fh:
            pickle.dump([1, 2, 3], fh, protocol=2)
    elif defect == "wrong_width":
        with open(target, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    elif defect == "label_count":
        write_cifar_batch(target, random_cifar(2, 0)[0], np.array([1]))
    else:
        target.unlink()
    with pytest.raises(DataError, match=match) as info:
        load_dataset("cifar10", "train", tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- missing data, downloads, imagenet


@pytest.mark.parametrize("name, expected", [
    ("mnist", "train-images-idx3-ubyte[.gz]"),
    ("fashion-mnist", "FashionMNIST/raw"),
    ("cifar10", "data_batch_1"),
    ("imagenet", "train/<wnid>/*.JPEG"),
])
def test_missing_data_dir_names_the_expected_files_and_where(tmp_path, monkeypatch, name, expected):
    monkeypatch.delenv("CERTKD_DOWNLOAD", raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found") as info:
        load_dataset(name, "train", missing)
    message = str(info.value)
    assert expected in message and str(missing) in message and "\n" not in message


def test_download_needs_opt_in_and_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    monkeypatch.setenv("CERTKD_DOWNLOAD", "1")
    with pytest.raises(DataError, match="needs torchvision"):
        load_dataset("mnist", "test", tmp_path)
    monkeypatch.setenv("CERTKD_DOWNLOAD", "0")
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", "test", tmp_path)


def test_imagenet_checks_folders_then_needs_pillow_only_to_decode(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    for split, wnids in (("train", ["n01", "n02"]), ("val", ["n01", "n03"])):
        for wnid in wnids:
            (tmp_path / split / wnid).mkdir(parents=True)
    with pytest.raises(DataError, match="different class folders"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "val" / "n03").rename(tmp_path / "val" / "n02")
    with pytest.raises(DataError, match="no image files"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "val" / "n02" / "a.JPEG").write_bytes(b"not decoded yet")
    data = load_dataset("imagenet", "test", tmp_path)  # the file list needs no Pillow
    assert len(data) == 1 and data.y.tolist() == [1] and data.info.class_names == ("n01", "n02")
    with pytest.raises(DataError, match="needs Pillow"):
        data.batch([0])
