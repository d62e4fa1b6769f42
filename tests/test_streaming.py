"""Streamed datasets end to end: an ImageNet-layout ImageFolder tree (300 small images) and a 10,000-point MNIST
idx set, certified in fresh processes with their peak memory measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bounds.memory import measure_peak
from certkd.data import check_dataset_fits, load_dataset
from certkd.data.imagenet import decode_image
from certkd.errors import CertkdError

PIL = pytest.importorskip("PIL.Image")
REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = ("n01440764", "n01443537", "n01484850"), 100
MB = 1 << 20


def write_image_tree(root: Path) -> None:
    """``root/val/<wnid>/*.JPEG`` (and PNGs), 40x30 pixels, colour by class plus noise."""
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(CLASSES):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, size=(30, 40, 3), dtype=np.uint8)
            pixels[..., label] += 190
            suffix = ".JPEG" if i % 2 else ".png"
            PIL.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")


def test_image_folder_streams_its_images(tmp_path):
    write_image_tree(tmp_path)
    data = load_dataset("imagenet", "test", tmp_path)
    assert len(data) == 300 and data.info.class_names == CLASSES and data.info.num_classes == 1000
    assert torch.equal(data.y, torch.arange(3).repeat_interleave(PER_CLASS))
    x, y = data.batch([0, 150, 299])
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y.tolist() == [0, 1, 2]
    assert float(x[1, 1].mean()) > float(x[1, 0].mean()) + 0.5  # class 1 images are green
    check_dataset_fits(data, (3, 224, 224), 1000, "imagenet")
    with pytest.raises(CertkdError, match="inputs of shape"):
        check_dataset_fits(data, (3, 32, 32), 1000, "imagenet")
    with measure_peak() as used:  # a pass over every image holds one batch at a time
        for start in range(0, len(data), 20):
            data.batch(list(range(start, start + 20)))
    whole_split = len(data) * 3 * 224 * 224 * 4
    assert used["bytes"] < whole_split / 3, used
    sub = data.subset([5, 7])
    assert torch.equal(sub.batch([1])[0], decode_image(data.paths[7]).unsqueeze(0))
