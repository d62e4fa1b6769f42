"""Reproduction (slow, not in CI, needs real MNIST): examples/mnist_transfer.sh at eps 0.1.

A PGD-AT LeNet5 teacher at eps 0.3, then `cnn4` width 8 students at eps 0.1 by ``--recipe shao2021``
and by KD; clean and PGD-40 accuracy by ``certkd certify``. Reads the MNIST idx files from
``$CERTKD_MNIST_DIR`` (skipped without). The thresholds are the claims, set below what the record in
examples/README.md measured with the script's defaults (6000 training images, 500 test points, seed 0).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CLAIMS = {
    "recipe_kept": 0.8,  # the recipe keeps at least 80 % of the teacher's PGD-40 accuracy at eps 0.1
    "kd_kept": 0.8,  # KD keeps less (measured 0.70: MNIST at 0.1 is partly robust without trying)
    "clean_drop": 0.03,  # and the recipe's clean accuracy is within 3 points of KD's
}


def pgd(evaluation: dict, eps: float) -> float:
    return next(r["accuracy"] for r in evaluation["results"] if r["method"] == "pgd" and r["eps"] == eps)


def test_mnist_transfer_claims(tmp_path):
    data_dir = os.environ.get("CERTKD_MNIST_DIR")
    if not data_dir:
        pytest.skip("set CERTKD_MNIST_DIR to a folder of the MNIST idx files")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "STUDENT_EPS": "0.1", "IGA_WEIGHTS": "1", "CONTROLS": "kd"}
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(REPO / "examples" / "mnist_transfer.sh"), data_dir, str(out)], env=env,
                          capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = {m: json.loads((out / f"{m}.eval.json").read_text()) for m in ("teacher", "kd", "kdiga_adversarial_w1_0.1")}
    teacher = pgd(ev["teacher"], 0.1)
    assert pgd(ev["kdiga_adversarial_w1_0.1"], 0.1) >= CLAIMS["recipe_kept"] * teacher
    assert pgd(ev["kd"], 0.1) <= CLAIMS["kd_kept"] * teacher
    clean = {m: e["clean_accuracy"]["accuracy"] for m, e in ev.items()}
    assert clean["kdiga_adversarial_w1_0.1"] >= clean["kd"] - CLAIMS["clean_drop"]
