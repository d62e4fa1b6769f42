"""``certkd bounds`` and ``certkd compare``: JSON contents, figures, verdicts, resume, mismatched checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from certkd.checkpoint import make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.commands.bounds import CERTIFIED_TERMS, TERMS
from certkd.data import load_dataset
from certkd.io import read_jsonl
from certkd.models import create_model

KWARGS = {"hidden": [32]}


def run(*args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A small MLP trained on digits (teacher), itself again, a noisy (less robust) copy, a 5-class model."""
    root = tmp_path_factory.mktemp("theory")
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    teacher = create_model("mlp", 10, data.info.input_shape, data.info.mean, data.info.std, **KWARGS)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(teacher(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    noisy = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.startswith("1."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    other = create_model("mlp", 5, data.info.input_shape, data.info.mean, data.info.std, **KWARGS)
    other_info = SimpleNamespace(**{**vars(data.info), "num_classes": 5, "name": "digits"})
    return {"teacher": save_checkpoint(make_checkpoint(teacher, "mlp", KWARGS, data.info), root / "t.pt"),
            "same": save_checkpoint(make_checkpoint(teacher, "mlp", KWARGS, data.info), root / "same.pt"),
            "noisy": save_checkpoint(make_checkpoint(noisy, "mlp", KWARGS, data.info), root / "noisy.pt"),
            "five": save_checkpoint(make_checkpoint(other, "mlp", KWARGS, other_info), root / "five.pt")}


@pytest.fixture(scope="module")
def bounds_run(ckpts, tmp_path_factory, lirpa):
    out = tmp_path_factory.mktemp("bounds")
    args = ("bounds", ckpts["noisy"], ckpts["teacher"], "--eps", "0.02,0.05", "-n", 10, "--batch-size", 5,
            "--certified-gamma", "--steps", 15, "--restarts", 1, "--out", out)
    code, stdout, stderr = run(*args)
    assert code == 0, stderr
    return {"args": args, "out": out, "stdout": stdout, "summary": json.loads((out / "summary.json").read_text()),
            "rows": read_jsonl(out / "per_example.jsonl")}


def test_bounds_writes_every_term_per_example_and_eps(bounds_run):
    rows = bounds_run["rows"]
    assert rows[0]["config"]["eps"] == [0.02, 0.05]
    records = rows[1:]
    assert len(records) == 2 * 10
    assert {(r["index"], r["eps"]) for r in records} == {(i, e) for i in range(10) for e in (0.02, 0.05)}
    for r in records:
        for name in (*TERMS, *CERTIFIED_TERMS):
            assert r[name] is not None, name
        expected = (r["robust_teacher"] + r["output_gap"] + r["eps"] * r["gradient_gap"] + r["gamma_student"]
                    + r["gamma_teacher"])
        assert r["bound"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert r["output_gap"] == pytest.approx(r["loss_student"] - r["loss_teacher"], abs=1e-5)
        # certified: the bound holds against the measured robust loss, and transfer certificates are sound
        assert r["holds_certified"] and r["bound_certified"] >= r["robust_student"] - 1e-5
        assert r["gamma_student_certified"] >= r["gamma_student"] - 2e-5
        if r["certified_through_transfer"]:
            assert r["student_margin_lower_transfer"] > 0


def test_bounds_summary_has_quantiles_checks_and_counts(bounds_run):
    summary, records = bounds_run["summary"], bounds_run["rows"][1:]
    assert [e["eps"] for e in summary["per_eps"]] == [0.02, 0.05]
    for entry in summary["per_eps"]:
        rows = [r for r in records if r["eps"] == entry["eps"]]
        gap = entry["terms"]["gradient_gap"]
        assert gap["kind"] == "exact" and gap["n"] == 10
        assert gap["mean"] == pytest.approx(sum(r["gradient_gap"] for r in rows) / 10, rel=1e-9)
        assert gap["q10"] <= gap["q50"] <= gap["q90"]
        assert entry["terms"]["gamma_student"]["kind"] == "estimate"
        assert entry["terms"]["bound_certified"]["kind"] == "certified"
        checks = entry["bound_vs_measured"]
        assert checks["certified"]["holds_fraction"] == 1.0
        assert checks["estimate"]["holds_fraction"] == sum(r["holds"] for r in rows) / 10
        assert sum(entry["certificate_counts"].values()) == 10
        assert entry["certificate_counts"]["both"] + entry["certificate_counts"]["direct_only"] == sum(
            r["certified_directly"] for r in rows)
    assert "bound (certified)" in bounds_run["stdout"]
    for name in ("bound_vs_measured_eps0.02.png", "terms_eps0.05.png"):
        assert (bounds_run["out"] / name).read_bytes()[:4] == b"\x89PNG"


def test_bounds_refuses_to_mix_runs_and_resumes_without_recomputing(bounds_run):
    out = bounds_run["out"]
    code, _, stderr = run(*bounds_run["args"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--resume" in stderr
    before = (out / "per_example.jsonl").read_text()
    code, _, stderr = run(*bounds_run["args"], "--resume")
    assert code == 0, stderr
    assert (out / "per_example.jsonl").read_text() == before
    resumed = json.loads((out / "summary.json").read_text())
    first = json.loads(json.dumps(bounds_run["summary"]))
    # the bound batch is planned from this process's free memory: recorded, but not part of the results
    plans = [summary["provenance"].pop("memory_plan") for summary in (resumed, first)]
    assert all(plan and all(p["batch_size"] >= 1 for p in plan) for plan in plans)
    assert resumed == first


def test_bounds_shards_merge_to_the_unsharded_run(bounds_run, tmp_path):
    """``certkd bounds --shard k/n`` shards like the other commands; ``certkd merge`` gives the same summary."""
    args = [a for a in bounds_run["args"] if a != bounds_run["out"]][:-1]  # without --out DIR
    for k in (0, 1):
        code, stdout, stderr = run(*args, "--shard", f"{k}/2", "--out", tmp_path / f"s{k}")
        assert code == 0 and "certkd merge" in stdout, stderr
    code, _, stderr = run("merge", tmp_path / "s1" / "per_example.jsonl", tmp_path / "s0" / "per_example.jsonl",
                          "--out", tmp_path / "m")
    assert code == 0, stderr
    merged = json.loads((tmp_path / "m" / "summary.json").read_text())
    full = json.loads(json.dumps(bounds_run["summary"]))
    for key in [k for k in full if k not in ("provenance", "config")]:
        assert merged[key] == full[key], key
    rows = sorted(read_jsonl(tmp_path / "m" / "per_example.jsonl")[1:], key=lambda r: (r["index"], r["eps"]))
    assert rows == sorted(bounds_run["rows"][1:], key=lambda r: (r["index"], r["eps"]))


@pytest.mark.parametrize("command", ["bounds", "compare"])
def test_mismatched_checkpoints_exit_2_with_one_line(ckpts, command):
    extra = ["--eps", "0.1"] if command == "bounds" else []
    code, stdout, stderr = run(command, ckpts["five"], ckpts["teacher"], *extra, "-n", 2)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "classes" in lines[0]


def compare(ckpts, student: str, out: Path) -> dict:
    code, stdout, stderr = run("compare", ckpts[student], ckpts["teacher"], "--method", "crown", "-n", 40,
                               "--batch-size", 20, "--eps", "0,0.01,0.02,0.04", "--radius-tol", "2e-3",
                               "--n-boot", 300, "--out", out)
    assert code == 0, stderr
    result = json.loads((out / "compare.json").read_text())
    assert result["verdict"].upper() in stdout
    return result


@pytest.mark.usefixtures("lirpa")
def test_compare_student_identical_to_teacher_says_yes_with_equal_radii(ckpts, tmp_path):
    result = compare(ckpts, "same", tmp_path)
    rows = read_jsonl(tmp_path / "per_example.jsonl")[1:]
    assert len(rows) == 40
    assert all(r["radius_student"] == r["radius_teacher"] for r in rows)
    assert all(r["attack_student"] == r["attack_teacher"] for r in rows)
    cert, emp = result["certified"], result["empirical"]
    assert result["verdict"] == cert["verdict"] == emp["verdict"] == "yes" and cert["at_least_fraction"] == 1.0
    assert cert["kind"] == "certified" and emp["kind"] == "estimate"
    assert [row["eps"] for row in cert["table"]] == [row["eps"] for row in emp["table"]] == [0, 0.01, 0.02, 0.04]
    assert all(row["difference"] == 0 for part in (cert, emp) for row in part["table"])
    assert cert["wilcoxon"]["p_less"] == 1.0
    for name in ("certified_accuracy.png", "attack_accuracy.png", "radius_scatter.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("lirpa")
def test_compare_noisy_student_says_no(ckpts, tmp_path):
    result = compare(ckpts, "noisy", tmp_path)
    rows = read_jsonl(tmp_path / "per_example.jsonl")[1:]
    smaller = sum(r["radius_student"] < r["radius_teacher"] for r in rows)
    assert smaller > len(rows) / 2
    assert result["certified"]["verdict"] == "no" and result["verdict"] == "no", result["reason"]
    assert result["certified"]["wilcoxon"]["p_less"] < 0.05
