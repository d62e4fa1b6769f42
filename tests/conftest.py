"""Shared fixtures: trained digits checkpoints (a PGD-AT teacher, a KD and a KDIGA student).

``digits_trio`` trains once per test session with ``certkd.train.train`` (20-40 s on 2 cores)
and is deterministic (fixed seeds, CPU, one thread). Measured with seeds 0 / 1 / 2 on the 450 test
images, PGD-20 L-inf accuracy:

    model            clean   eps 0.1  eps 0.15  eps 0.2
    teacher (cnn4)   0.94+   0.76+    0.65-0.68 0.46-0.52
    KD  (mlp 64)     0.97    0.60+    0.26-0.29 0.05-0.08
    KDIGA (mlp 64)   0.96+   0.76+    0.54-0.55 0.24-0.26

and the mean L2 input-gradient gap to the teacher, ||grad CE_S - grad CE_T||_2: KD 0.57-0.64,
KDIGA 0.36-0.44 (L1: KD 3.4-3.7, KDIGA 1.95-2.25).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from certkd.checkpoint import load_model
from certkd.commands.demo import DemoSettings, train_trio
from certkd.data import BatchSource, load_dataset

DIGITS_TRAIN_EPS = 0.2  # L-inf radius of the teacher's PGD-AT (inputs in [0, 1], 8x8)
DIGITS_EVAL_EPS = 0.15  # where the KD-versus-KDIGA gap is clearest


@dataclass
class DigitsTrio:
    """Paths and loaded (eval-mode) models of the three digits checkpoints."""

    teacher_path: Path
    kd_path: Path
    kdiga_path: Path
    teacher: nn.Module
    kd: nn.Module
    kdiga: nn.Module
    train_eps: float = DIGITS_TRAIN_EPS
    eval_eps: float = DIGITS_EVAL_EPS
    norm: str = "inf"


def train_digits_trio(out_dir: Path, seed: int = 0) -> DigitsTrio:
    """Train the teacher (PGD-AT, cnn4), then a KD and a KDIGA student (mlp, 64 hidden units).

    Runs on one thread: these models are too small to gain from more, and on a busy machine
    extra threads only wait for each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits_trio(out_dir, seed)
    finally:
        torch.set_num_threads(threads)


def _train_digits_trio(out_dir: Path, seed: int) -> DigitsTrio:
    settings = DemoSettings(seed=seed, train_eps=DIGITS_TRAIN_EPS, student_eps=DIGITS_EVAL_EPS)
    paths = train_trio(out_dir, settings)
    return DigitsTrio(teacher_path=paths["teacher"], kd_path=paths["kd"], kdiga_path=paths["kdiga"],
                      teacher=load_model(paths["teacher"]), kd=load_model(paths["kd"]),
                      kdiga=load_model(paths["kdiga"]))


@pytest.fixture(scope="session")
def digits_trio(tmp_path_factory: pytest.TempPathFactory) -> DigitsTrio:
    """A PGD-AT teacher and its KD and KDIGA students on digits, trained once per session (seed 0)."""
    return train_digits_trio(tmp_path_factory.mktemp("digits_demo") / "checkpoints")


@pytest.fixture(scope="session")
def digits() -> tuple[BatchSource, BatchSource]:
    """The embedded digits data: ``(train, test)`` splits."""
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lirpa():
    """auto_LiRPA, for a test that bounds by propagation (builds a ``BoundEngine`` or calls auto_LiRPA).

    Requesting it (``pytest.mark.usefixtures("lirpa")`` per test or module, or from a fixture that
    bounds) marks the test
    ``lirpa`` (pyproject.toml): .ci/run runs those a second time against auto_LiRPA 0.7.x
    (``-m "lirpa and not slow"`` in .venv-lirpa07/).
    """
    from bounds.lirpa import import_auto_lirpa

    return import_auto_lirpa()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "lirpa" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lirpa)
