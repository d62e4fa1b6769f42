"""``certkd compare`` with both parts (theory.md §6) on the digits trio; ``certify --method apgd``; reused records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from certkd.cli import main
from certkd.runs import read_log

N = "60"
FAST = ("--method", "ibp", "-n", N, "--batch-size", "60", "--n-boot", "400", "--param", "apgd_steps=10")


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def compare(trio, student: str, out: Path, *extra: object) -> tuple[dict, str]:
    code, stdout, stderr = run("compare", getattr(trio, f"{student}_path"), trio.teacher_path, *FAST, *extra,
                               "--out", out)
    assert code == 0, stderr
    return json.loads((out / "compare.json").read_text()), stdout


@pytest.fixture(scope="module")
def kd_run(digits_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_kd")
    return compare(digits_trio, "kd", out) + (out,)


def test_kd_student_is_no_by_its_empirical_part_although_the_certified_part_says_yes(kd_run):
    result, stdout, out = kd_run
    assert result["certified"]["verdict"] == "yes"  # IBP sees only a sliver of the teacher's robustness
    assert result["empirical"]["verdict"] == "no"
    assert result["verdict"] == "no" and "empirical part says no" in result["reason"]
    assert result["rho"] < 0.25
    assert result["certified_label"] == f"covers only eps <= {result['coverage']['certified']:.4g}"
    assert result["certified_label"] in stdout and stdout.splitlines()[0].endswith("NO (60 points, L-inf)")
    assert result["coverage"]["empirical"] > 3 * result["coverage"]["certified"]
    rule = result["rule"]
    assert {"tol", "margin", "ci_level", "fraction_threshold", "n_boot", "rho_threshold", "headline"} <= set(rule)
    for part in ("certified", "empirical"):
        table = result[part]["table"]
        assert all(row["ci_low"] <= row["difference"] <= row["ci_high"] for row in table)
    assert result["empirical"]["wilcoxon"]["p_less"] < 0.05 < result["empirical"]["wilcoxon"]["p_greater"]


def test_the_curves_span_the_teachers_empirical_robustness(kd_run):
    result, _, out = kd_run
    rows = read_log(out / "per_example.jsonl")[1]
    attack_teacher = sorted(r["attack_teacher"] for r in rows)
    q90 = attack_teacher[int(0.9 * len(attack_teacher)) - 1]
    eps = [row["eps"] for row in result["empirical"]["table"]]
    assert eps[-1] == pytest.approx(q90) and eps[-1] > max(r["radius_teacher"] for r in rows)
    assert all(r["radius_teacher"] <= r["attack_teacher"] + 1e-6 for r in rows)  # certified <= attack radius
    for name in ("certified_accuracy.png", "attack_accuracy.png", "radius_scatter.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_a_model_against_itself_says_yes(digits_trio, tmp_path):
    code, stdout, stderr = run("compare", digits_trio.kd_path, digits_trio.kd_path, *FAST, "--out", tmp_path)
    assert code == 0, stderr
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["verdict"] == result["certified"]["verdict"] == result["empirical"]["verdict"] == "yes"
    assert all(row["difference"] == 0 for row in result["empirical"]["table"])


def test_kdiga_is_not_no_when_its_empirical_part_is_within_the_margin(digits_trio, tmp_path):
    from certkd.commands.compare import summarize_compare

    strict, _ = compare(digits_trio, "kdiga", tmp_path)
    assert strict["empirical"]["verdict"] == "no" and strict["verdict"] == "no"
    # the same records under a rule that tolerates KDIGA's deficit (margin 0.5, CI level 1 - 1e-12)
    config, records = read_log(tmp_path / "per_example.jsonl")
    rule = {**config["config"]["rule"], "margin": 0.5, "ci_level": 1 - 1e-12}
    loose = summarize_compare({**config["config"], "rule": rule}, records)
    emp = loose["empirical"]
    assert all(row["ci_high"] >= -0.5 for row in emp["table"]) and emp["wilcoxon"]["p_less"] >= 1e-12
    assert emp["verdict"] != "no"  # its empirical part is within the margin
    assert loose["verdict"] != "no" and loose["verdict"] == loose["certified"]["verdict"]


@pytest.mark.usefixtures("lirpa")
def test_compare_reuses_certify_records_of_the_same_points_and_method(digits_trio, kd_run, tmp_path):
    result, _, out = kd_run
    for name in ("kd", "teacher"):
        code, _, stderr = run("certify", getattr(digits_trio, f"{name}_path"), "--method", "ibp", "--radius",
                              "-n", N, "--batch-size", 60, "--eps", "0.01", "--per-example", tmp_path / f"{name}.jsonl")
        assert code == 0, stderr
    reused, _ = compare(digits_trio, "kd", tmp_path / "reused", "--student-records", tmp_path / "kd.jsonl",
                        "--teacher-records", tmp_path / "teacher.jsonl")
    assert reused["certified"] == result["certified"]
    assert reused["empirical"] == result["empirical"]
    code, _, stderr = run("compare", digits_trio.kd_path, digits_trio.teacher_path, *FAST, "--method", "crown",
                          "--student-records", tmp_path / "kd.jsonl")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "method" in lines[0], stderr
    code, _, stderr = run("compare", digits_trio.kd_path, digits_trio.teacher_path, *FAST,
                          "--student-records", tmp_path / "teacher.jsonl")
    assert code == 2 and "checkpoint_sha256" in stderr and len(stderr.strip().splitlines()) == 1


def test_certify_method_apgd_is_an_estimate_at_least_as_strong_as_pgd(digits_trio, tmp_path):
    code, stdout, stderr = run("certify", digits_trio.teacher_path, "--method", "apgd", "--radius", "-n", 100,
                               "--batch-size", 100, "--eps", "0.1,0.15", "--out", tmp_path / "s.json")
    assert code == 0, stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    cells = {(r["method"], r["eps"]): r for r in summary["results"]}
    assert cells[("apgd", 0.1)]["kind"] == "estimate"
    for eps in (0.1, 0.15):
        assert cells[("apgd", eps)]["accuracy"] <= cells[("pgd", eps)]["accuracy"]
    radius = next(r for r in summary["radius"] if r["method"] == "apgd")
    assert radius["kind"] == "estimate" and 0.1 < radius["median"] < 0.4
    assert "apgd accuracy" in stdout and "estimate" in stdout
