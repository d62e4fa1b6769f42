"""bench/gpu_check.sh --device cpu --small: the device check script runs, and its table has the columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = ["crown", "ibp", "radius", "clever", "kd-epoch", "kdiga-epoch", "ibp-epoch", "crown-ibp-epoch", "cpu-agree"]


def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--backend", "installed", "--device", "cpu", "--small",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check: auto_LiRPA ") and "device cpu" in lines[0]
    assert lines[1] == "| task | points | device | seconds | result | check |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert [r[0] for r in rows] == TASKS
    for task, points, device, seconds, result, check in rows:
        assert int(points) > 0 and device == "cpu" and float(seconds) >= 0 and result, task
        assert check.startswith("ok: "), f"{task}: {check}"
    assert [r["task"] for r in json.loads(out.read_text())["rows"]] == TASKS


def test_gpu_check_refuses_a_missing_gpu_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--backend", "installed", "--device", "cuda"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: device cuda asked for")
