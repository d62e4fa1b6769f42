"""``certkd ablate``: tidy cells, soundness ordering, resume, and bad study files."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from certkd.cli import main
from certkd.commands.ablate import COLUMNS, read_cells

METHODS = ["crown", "lipschitz", "pgd"]
EPS = [0.005, 0.02]


def _study(tmp_path: Path, teacher: Path, **extra: str) -> Path:
    text = (f"name: t\ncheckpoints: [{teacher}]\nmethods: [{', '.join(METHODS)}]\nnorms: [inf, 2]\n"
            f"eps: [{', '.join(map(str, EPS))}]\nnum_examples: 24\nbatch_size: 24\nparams: {{pgd_steps: 20}}\n")
    text += "".join(f"{k}: {v}\n" for k, v in extra.items())
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.usefixtures("lirpa")
def test_ablate_grid_is_tidy_sound_and_resumable(tmp_path: Path, digits_trio) -> None:
    study = _study(tmp_path, digits_trio.teacher_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ablate", str(study), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_cells(out / "cells.csv")
    assert len(rows) == 2 * len(METHODS) * len(EPS)  # norms x methods x eps, one model
    assert set(rows[0]) == set(COLUMNS)
    cell = {(r["norm"], r["method"], r["eps"]): r for r in rows}
    for norm in ("inf", "2"):
        for e in EPS:
            crown, lip, attack = (cell[(norm, m, e)] for m in ("crown", "lipschitz", "pgd"))
            assert crown["kind"] == lip["kind"] == "certified" and attack["kind"] == "estimate"
            # sound certificates never exceed the attack's robust accuracy; CROWN is tighter than global Lipschitz
            assert crown["certified_accuracy"] <= attack["certified_accuracy"]
            assert lip["certified_accuracy"] <= crown["certified_accuracy"]
    assert list((out / "figures").glob("*.png"))

    # drop the last (model, norm, method) block: the rerun recomputes exactly it, with the same numbers
    lines = (out / "cells.csv").read_text().splitlines(keepends=True)
    (out / "cells.csv").write_text("".join(lines[:-len(EPS)]))
    result = CliRunner().invoke(main, ["ablate", str(study), "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = read_cells(out / "cells.csv")
    assert _comparable(again) == _comparable(rows)


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows without their timing, NaN (no radius for an attack) as None so that equal rows compare equal."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "seconds"}
            for r in rows]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("methodz", "[crown]", "unknown key 'methodz'"),
    ("norms", "[3]", "unknown norm '3'"),
])
def test_bad_study_is_one_line_exit_2(tmp_path: Path, key: str, value: str, needle: str) -> None:
    path = _study(tmp_path, tmp_path / "missing.pt", **{key: value})
    proc = subprocess.run([sys.executable, "-m", "certkd", "ablate", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "study").exists()  # nothing written


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "study.yaml"


def test_example_study_runs_through_certkd_ablate(tmp_path: Path, digits_trio) -> None:
    """examples/study.yaml, next to the checkpoints `certkd demo` trains, runs and gives a sound grid."""
    import shutil

    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples" / "study.yaml")
    shutil.copytree(Path(digits_trio.teacher_path).parent, tmp_path / "demo_out" / "checkpoints")
    result = CliRunner().invoke(main, ["ablate", str(tmp_path / "examples" / "study.yaml")])
    assert result.exit_code == 0, result.output
    rows = read_cells(tmp_path / "demo_out" / "ablation" / "cells.csv")
    assert len(rows) == 2 * 2 * 5 * 3  # models x norms x methods x eps
    cell = {(r["model"], r["norm"], r["method"], r["eps"]): r for r in rows}
    for (model, norm, _method, e), r in cell.items():
        if r["kind"] == "certified" and r["target"] == "model":
            assert r["certified_accuracy"] <= cell[(model, norm, "pgd", e)]["certified_accuracy"]


def test_example_study_kdiga_block_is_valid(tmp_path: Path) -> None:
    """The commented kdiga sweep of the example parses: its train keys come from the trainer's dataclasses."""
    from certkd.study import load_study

    text = EXAMPLE.read_text().replace("\n# kdiga:", "\nkdiga:").replace("\n#   ", "\n  ")
    (tmp_path / "study.yaml").write_text(text)
    study = load_study(tmp_path / "study.yaml")
    assert study.kdiga is not None and study.kdiga.iga_weights == [0, 1, 10]
    assert study.kdiga.train["weight_decay"] == 0.0005 and study.params["smoothing_batch"] == 200
