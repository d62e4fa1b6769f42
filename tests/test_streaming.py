"""Streamed datasets end to end: an ImageNet-layout ImageFolder tree of small images and an MNIST idx set
(60 images and 2,000 points in CI, 300 and 10,000 in the slow run), certified in fresh processes with their
peak memory measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_mnist_split

from certkd.checkpoint import make_checkpoint, save_checkpoint
from certkd.data import dataset_info, load_dataset
from certkd.data.imagenet import decode_image
from certkd.errors import CertkdError
from certkd.loading import check_fits
from certkd.memory import measure_peak
from certkd.models import create_model

PIL = pytest.importorskip("PIL.Image")
REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = ("n01440764", "n01443537", "n01484850"), 100
MB = 1 << 20


def write_image_tree(root: Path, per_class: int = PER_CLASS) -> None:
    """``root/val/<wnid>/*.JPEG`` (and PNGs), 40x30 pixels, colour by class plus noise."""
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(CLASSES):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(30, 40, 3), dtype=np.uint8)
            pixels[..., label] += 190
            suffix = ".JPEG" if i % 2 else ".png"
            PIL.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")


def start_certkd(args: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """A fresh ``python -m certkd`` process, its output in ``cwd/name.{stdout,stderr}``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(cwd / f"{name}.stdout", "w") as out, open(cwd / f"{name}.stderr", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "certkd", *args], cwd=cwd, env=env, stdout=out, stderr=err)


def finish_certkd(proc: subprocess.Popen, cwd: Path, name: str) -> tuple[str, str, int, int]:
    """stdout, stderr, exit code and the peak resident set (bytes) of this one child (``os.wait4``)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ((cwd / f"{name}.stdout").read_text(), (cwd / f"{name}.stderr").read_text(), proc.returncode,
            usage.ru_maxrss * 1024)


def small_checkpoint(path: Path, arch: str, dataset: str, **kwargs) -> Path:
    meta = dataset_info(dataset)
    torch.manual_seed(0)
    model = create_model(arch, meta.num_classes, meta.input_shape, meta.mean, meta.std, **kwargs)
    return save_checkpoint(make_checkpoint(model, arch, kwargs, meta), path)


def test_image_folder_streams_its_images(tmp_path):
    write_image_tree(tmp_path)
    data = load_dataset("imagenet", "test", tmp_path)
    assert len(data) == 300 and data.info.class_names == CLASSES and data.info.num_classes == 1000
    assert torch.equal(data.y, torch.arange(3).repeat_interleave(PER_CLASS))
    x, y = data.batch([0, 150, 299])
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y.tolist() == [0, 1, 2]
    assert float(x[1, 1].mean()) > float(x[1, 0].mean()) + 0.5  # class 1 images are green
    check_fits((3, 224, 224), 1000, data, "imagenet")
    with pytest.raises(CertkdError, match="inputs of shape"):
        check_fits((3, 32, 32), 1000, data, "imagenet")
    with measure_peak() as used:  # a pass over every image holds one batch at a time
        for start in range(0, len(data), 20):
            data.batch(list(range(start, start + 20)))
    whole_split = len(data) * 3 * 224 * 224 * 4
    assert used["bytes"] < whole_split / 3, used
    sub = data.subset([5, 7])
    assert torch.equal(sub.batch([1])[0], decode_image(data.paths[7]).unsqueeze(0))


@pytest.mark.usefixtures("lirpa")
@pytest.mark.parametrize(("per_class", "mnist_points"), [
    (20, 2_000),  # several batches of each: what CI runs
    pytest.param(PER_CLASS, 10_000, marks=pytest.mark.slow),  # the whole MNIST test split
])
def test_certify_an_image_folder_and_mnist_points_in_fresh_processes(tmp_path, per_class, mnist_points):
    write_image_tree(tmp_path / "imagenet", per_class)
    write_mnist_split(tmp_path / "mnist", "test", mnist_points, gz=True)
    small_checkpoint(tmp_path / "inet.pt", "cnn4", "imagenet", width=2, linear=8)
    small_checkpoint(tmp_path / "mnist.pt", "lenet5", "mnist", conv=[4, 8], linear=[16])
    runs = {"inet": ["certify", "inet.pt", "--data-dir", "imagenet", "--method", "ibp", "--pgd-steps", "0",
                     "--batch-size", "25", "--no-progress", "--out", "inet.json"],
            "mnist": ["certify", "mnist.pt", "--data-dir", "mnist", "--method", "ibp", "--pgd-steps", "0",
                      "--batch-size", "1000", "--no-progress", "--out", "mnist.json"],
            "crown": ["certify", "mnist.pt", "--data-dir", "mnist", "--method", "crown", "-n", "24",
                      "--out", "crown.json"]}
    procs = {name: start_certkd(args, tmp_path, name) for name, args in runs.items()}
    inet, mnist, crown = (finish_certkd(procs[name], tmp_path, name) for name in runs)
    for _, err, code, _ in (inet, mnist, crown):
        assert code == 0, err
    assert json.loads((tmp_path / "inet.json").read_text())["num_examples"] == len(CLASSES) * per_class
    assert json.loads((tmp_path / "mnist.json").read_text())["num_examples"] == mnist_points
    # 300 decoded images alone would take 180 MB; the process stays well under 1.5 GB
    for name, (_, _, _, peak) in zip(runs, (inet, mnist, crown), strict=True):
        assert 0 < peak < 1536 * MB, f"{name}: peak RSS {peak / MB:.0f} MB"
    plan = json.loads((tmp_path / "crown.json").read_text())["provenance"]["memory_plan"]
    assert plan["batch_size"] >= 1 and plan["per_point_bytes"] > 0 and plan["budget_bytes"] > 0
    assert f"bound batch {plan['batch_size']}" in crown[1] and "\r" not in crown[1]
