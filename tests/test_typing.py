"""Static checks in CI: ``mypy`` (``bounds/`` under the strict settings of pyproject.toml) and ``ruff`` report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error(tmp_path):
    """One mypy run over both packages (torch's stubs read once); pyproject.toml holds bounds/ to ``--strict``."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "bounds", "certkd"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_bounds_is_held_to_strict_settings():
    """The per-module part of ``mypy --strict`` is what pyproject.toml sets for ``bounds``."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    overrides = next(o for o in config["overrides"] if "bounds.*" in o["module"])
    strict_per_module = {"disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls",
                         "disallow_untyped_defs", "disallow_incomplete_defs", "check_untyped_defs",
                         "disallow_untyped_decorators", "warn_unused_ignores", "warn_return_any",
                         "no_implicit_reexport", "strict_equality", "extra_checks"}
    assert {k for k, v in overrides.items() if v is True} >= strict_per_module
    assert config["warn_redundant_casts"] and config["warn_unused_configs"]


def test_ruff_finds_no_problem():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
