"""Output hygiene of every command: bad --out paths refused at once, 0644 result files, Ctrl-C, info, --help."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from certkd.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from certkd.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("certkd: error:"), err
    assert "Traceback" not in err
    return lines[0]


def commands(trio, out: Path) -> dict[str, list[object]]:
    """One invocation per command that writes results under ``out``."""
    t, s = trio.teacher_path, trio.kd_path
    return {
        "certify": ["certify", t, "-n", 4, "--eps", "0.01", "--out", out / "summary.json"],
        "certify-per-example": ["certify", t, "-n", 4, "--eps", "0.01", "--per-example", out / "records.jsonl"],
        "compare": ["compare", s, t, "-n", 4, "--method", "ibp", "--out", out],
        "bounds": ["bounds", s, t, "-n", 4, "--eps", "0.01", "--out", out],
        "demo": ["demo", "--quick", "--out", out],
        "train": ["train", "--method", "natural", "--arch", "mlp", "--dataset", "digits", "--epochs", 1,
                  "--out", out / "model.pt"],
    }


@pytest.mark.parametrize("name", ["certify", "certify-per-example", "compare", "bounds", "demo", "train"])
def test_out_into_a_missing_parent_is_one_line_and_creates_nothing(digits_trio, tmp_path, name):
    missing = tmp_path / "missing"
    code, out, err = run(*commands(digits_trio, missing / "sub")[name])
    line = one_line_error(code, err)
    assert "does not exist" in line and str(missing) in line
    assert not missing.exists()
    assert out == ""  # refused before any computation printed anything


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may write to: a read-only one, or /sys when permissions do not bind (root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return locked
    locked.chmod(0o755)
    try:
        (Path("/sys") / ".certkd-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder on this machine")


@pytest.mark.parametrize("name", ["certify", "compare", "train"])
def test_unwritable_out_is_refused_before_any_computation(digits_trio, tmp_path, name):
    locked = _unwritable_folder(tmp_path)
    before = sorted(p.name for p in locked.iterdir())
    try:
        code, out, err = run(*commands(digits_trio, locked)[name])
        line = one_line_error(code, err)
        assert "not writable" in line and str(locked) in line
        assert out == ""
        assert sorted(p.name for p in locked.iterdir()) == before
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o755)


def test_file_and_folder_mix_ups_are_one_line(digits_trio, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(*run("certify", digits_trio.teacher_path, "--out", tmp_path)[::2])
    one_line_error(*run("compare", digits_trio.kd_path, digits_trio.teacher_path, "--out", a_file)[::2])
    line = one_line_error(*run("certify", digits_trio.teacher_path, "--out", a_file / "s.json")[::2])
    assert "not a folder" in line
    assert a_file.read_text() == "x"


@pytest.mark.usefixtures("lirpa")
def test_result_files_are_readable_by_the_group(digits_trio, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = run("certify", digits_trio.teacher_path, "-n", 4, "--eps", "0.01", "--method", "ibp",
                           "--out", tmp_path / "s.json", "--per-example", tmp_path / "r.jsonl")
        assert code == 0, err
        code, _, err = run("compare", digits_trio.kd_path, digits_trio.teacher_path, "-n", 4, "--method", "ibp",
                           "--out", tmp_path / "cmp")
        assert code == 0, err
    finally:
        os.umask(old)
    files = [tmp_path / "s.json", tmp_path / "r.jsonl", *(tmp_path / "cmp").iterdir()]
    assert len(files) >= 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize(("command", "hint"), [
    ("certify", "with --resume to continue"), ("demo", "rerun the same 'certkd demo' command to continue")])
def test_ctrl_c_prints_how_to_resume_and_leaves_no_partial_file(digits_trio, tmp_path, monkeypatch, command,
                                                                 hint):
    import certkd.commands.demo
    import certkd.data

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(certkd.data, "load_dataset", interrupt)
    monkeypatch.setattr(certkd.commands.demo, "run_demo", interrupt)
    args = {"certify": ["certify", digits_trio.teacher_path, "--out", tmp_path / "s.json"],
            "demo": ["demo", "--out", tmp_path / "demo"]}[command]
    code, _, err = run(*args)
    assert code == 130
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and hint in lines[0], err
    assert not (tmp_path / "s.json").exists()


def test_info_names_the_best_score_by_the_metric_it_really_is(digits_trio, tmp_path):
    ckpt = load_checkpoint(digits_trio.kd_path)
    model = ckpt.build_model()
    from certkd.data import dataset_info

    path = save_checkpoint(make_checkpoint(model, ckpt.model_name, ckpt.model_kwargs, dataset_info("digits"),
                                           metrics={"epoch": 1, "clean_acc": 0.91, "pgd_acc": None,
                                                    "best_pgd_acc": 0.91}), tmp_path / "m.pt")
    code, out, err = run("info", path)
    assert code == 0, err
    metrics = next(line for line in out.splitlines() if line.startswith("metrics"))
    assert "best_clean_acc=0.91" in metrics and "pgd_acc" not in metrics
    assert "last epoch 1" in metrics


def test_certify_help_lists_pgd():
    code, out, _ = run("certify", "--help")
    assert code == 0
    assert "pgd (estimate" in " ".join(out.split())


@pytest.mark.usefixtures("lirpa")
def test_no_torch_jit_deprecation_warning_reaches_the_user(digits_trio):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "certkd", "certify", str(digits_trio.teacher_path), "-n", "2",
                           "--eps", "0.01", "--method", "crown", "--pgd-steps", "0"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DeprecationWarning" not in proc.stderr and "torch.jit" not in proc.stderr
