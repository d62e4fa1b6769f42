"""Static checks in CI: ``mypy`` (``bounds/`` and ``certkd/`` under the strict settings of pyproject.toml) and ``ruff``
report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error(tmp_path):
    """One mypy run over both packages (torch's stubs read once); pyproject.toml holds both to ``--strict``."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "bounds", "certkd"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("module", ["bounds", "bounds.evidence", "certkd", "certkd.cli.train"])
def test_packages_are_held_to_strict_settings(module):
    """Every setting ``mypy --strict`` changes holds for ``module`` under pyproject.toml (asked of mypy)."""
    from mypy.main import process_options
    from mypy.options import PER_MODULE_OPTIONS, Options

    _, strict = process_options(["--strict", "--config-file", "/dev/null", "-c", "pass"])
    _, ours = process_options(["--config-file", str(REPO / "pyproject.toml"), "-c", "pass"])
    defaults = Options()
    names = [k for k in dir(strict) if not k.startswith("_") and not callable(getattr(strict, k))]
    changed = {k for k in names if getattr(strict, k) != getattr(defaults, k)
               and (k in PER_MODULE_OPTIONS or k.startswith("warn_"))}
    assert len(changed) >= 10, changed
    in_module = ours.clone_for_module(module)
    assert {k for k in changed if getattr(in_module, k) != getattr(strict, k)} == set()


def test_ruff_finds_no_problem():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
