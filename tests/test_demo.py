"""``certkd demo --quick``: the whole story end to end, sound, and resumable."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from certkd.cli import main


def test_demo_quick_end_to_end(digits_trio) -> None:
    # the session fixture trained the demo's three models (same settings) into OUT/checkpoints: the demo reuses them
    out = Path(digits_trio.teacher_path).parent.parent
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "kd", "kdiga"}
    for name, model in results["models"].items():
        cert = model["certification"]
        assert cert["soundness"]["certified_checked_by_pgd"] > 0, name  # the gate ran and passed
        crown = [r for r in cert["results"] if r["method"] == "crown"]
        attack = {r["eps"]: r["accuracy"] for r in cert["results"] if r["method"] == "pgd"}
        assert crown and all(r["kind"] == "certified" and r["accuracy"] <= attack[r["eps"]] for r in crown)
        accs = [r["accuracy"] for r in sorted(crown, key=lambda r: r["eps"])]
        assert accs == sorted(accs, reverse=True)  # certified accuracy never grows with eps
    for c in results["comparisons"].values():
        parts = (c["certified"]["verdict"], c["empirical"]["verdict"])
        # theory.md §6: the headline is never more favourable than either part
        expected = "no" if "no" in parts else "yes" if parts[0] == "yes" else "inconclusive"
        assert c["verdict"] == expected, (c["verdict"], parts)
        assert c["empirical"]["table"][-1]["eps"] > max(results["models"]["teacher"]["radius"])
    assert results["comparisons"]["kd"]["empirical"]["verdict"] == "no"  # KD loses the teacher's robustness
    # the paper's mechanism: KDIGA aligns input gradients better than KD
    assert results["transfer"]["kdiga"]["gradient_gap_mean"] < results["transfer"]["kd"]["gradient_gap_mean"]
    report = (out / "report.md").read_text()
    assert "verdict" in report and "certified" in report and "estimate" in report
    for model in results["models"].values():  # every model's training settings are stated
        t = model["training"]
        assert f"| {t['method']} | {t['arch']}" in report and t["epochs"] == 20
    for text in ("input units", "n = 60", "tie tolerance tol = 0.001", "never more favourable than either part",
                 "95% paired percentile-bootstrap CIs", "H1: student's attack radii smaller"):
        assert text in report, text
    for fig in ("certified_accuracy.png", "radius_kd_vs_teacher.png", "transfer_terms.png", "kd_empirical_part.png",
                "kdiga_certified_part.png"):
        assert (out / "figures" / fig).read_bytes()[:4] == b"\x89PNG"

    # a second run into the same folder reuses checkpoints and records and gives the same results
    before = (out / "results.json").read_text()
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").read_text() == before
