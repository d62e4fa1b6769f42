"""Reproduction (slow, not in CI): the seed's claims 1 and 2 on MNIST-shaped data, by examples/mnist_transfer.sh.

A PGD-AT teacher, then students of a smaller cnn4 by KD, clean KDIGA, adversarial KDIGA
(``--recipe shao2021``) and, from a natural student's weights, adversarial KDIGA again; clean and
PGD-40 accuracy at three eps, by ``certkd certify``. Reads real MNIST idx files from
``$CERTKD_MNIST_DIR`` when set; otherwise writes the synthetic stand-in of examples/mnist_standin.py
(digits upsampled to 28x28: NOT MNIST). The thresholds are the claims, set a little below what the
stand-in run measured (examples/README.md; 1000 test points, PGD-40 at eps 0.2): teacher 33.2 %;
KD keeps 1 % of it; --recipe shao2021 from scratch 61 % (clean 77.8 %, KD 91.2 %); from the natural
student's weights 77 % with clean 91.6 % against the natural student's 92.7 %. About 25 minutes on
one busy CPU core.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CLAIMS = {
    "teacher_pgd": 0.25,  # the PGD-AT teacher is robust at the students' eps (measured 0.332)
    "kd_kept": 0.5,  # KD keeps at most half of it (measured 0.01)
    "recipe_kept": 0.5,  # adversarial KDIGA keeps at least half (measured 0.61 from scratch, 0.77 from natural)
    "clean_drop": 0.015,  # started from the natural student, it costs at most 1.5 points of clean accuracy (1.1)
}


def pgd(evaluation: dict, eps: float) -> float:
    return next(r["accuracy"] for r in evaluation["results"] if r["method"] == "pgd" and r["eps"] == eps)


def clean(evaluation: dict) -> float:
    return evaluation["clean_accuracy"]["accuracy"]


def test_mnist_transfer_claims(tmp_path):
    data_dir = os.environ.get("CERTKD_MNIST_DIR")
    if not data_dir:
        standin = runpy.run_path(str(REPO / "examples" / "mnist_standin.py"))
        data_dir = str(standin["write_standin"](tmp_path / "standin"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(REPO / "examples" / "mnist_transfer.sh"), data_dir, str(out)], env=env,
                          capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = {m: json.loads((out / f"{m}.eval.json").read_text()) for m in
          ("teacher", "natural", "kd", "kdiga_clean", "kdiga_adv", "kdiga_adv_from_natural")}
    eps = float(os.environ.get("STUDENT_EPS", "0.2"))
    teacher = pgd(ev["teacher"], eps)
    assert teacher >= CLAIMS["teacher_pgd"]
    # claim 1: KD loses the teacher's robustness, adversarial KDIGA keeps it
    assert pgd(ev["kd"], eps) <= CLAIMS["kd_kept"] * teacher
    assert pgd(ev["kdiga_adv"], eps) >= CLAIMS["recipe_kept"] * teacher
    # claim 2: adversarial KDIGA from the natural student's weights costs no clean accuracy
    assert clean(ev["kdiga_adv_from_natural"]) >= clean(ev["natural"]) - CLAIMS["clean_drop"]
    assert pgd(ev["kdiga_adv_from_natural"], eps) >= CLAIMS["recipe_kept"] * teacher
