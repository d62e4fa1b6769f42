"""The Python API: the README's researcher workflow runs as written and gives the CLI's numbers;
the docstring examples of every module of ``bounds`` and ``certkd`` run."""

from __future__ import annotations

import doctest
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import certkd
from certkd.cli import main
from certkd.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python workflow block"
    return blocks[0]


def _cli(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def workflow(digits_trio, tmp_path_factory, monkeypatch_module) -> dict:
    """The README block executed in a folder holding runs/teacher.pt and runs/kdiga.pt."""
    root = tmp_path_factory.mktemp("readme")
    (root / "runs").mkdir()
    shutil.copy(digits_trio.teacher_path, root / "runs" / "teacher.pt")
    shutil.copy(digits_trio.kdiga_path, root / "runs" / "kdiga.pt")
    monkeypatch_module.chdir(root)
    namespace: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), namespace)  # noqa: S102
    return {"root": root, **namespace}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.usefixtures("lirpa")
def test_readme_certify_equals_the_cli(workflow) -> None:
    root = workflow["root"]
    printed = _cli("certify", "runs/kdiga.pt", "-n", 50, "--method", "crown", "--eps", "0.01,0.02", "--radius",
                   "--out", root / "cli.json")
    cli = json.loads((root / "cli.json").read_text())
    result = workflow["result"]
    assert isinstance(result, certkd.CertifyResult)
    for key in ("clean_accuracy", "results", "radius", "soundness", "num_examples"):
        assert result.data[key] == cli[key], key
    assert result.summary().splitlines()[2:] == printed.strip().splitlines()[2:]  # the same table
    frame = workflow["table"]
    assert list(frame["method"]) == ["pgd", "pgd", "crown", "crown"] and set(frame["kind"]) == {"estimate", "certified"}
    assert workflow["crown_002"] == next(r["accuracy"] for r in cli["results"]
                                         if r["method"] == "crown" and r["eps"] == 0.02)
    assert json.loads(result.to_json())["summary"]["results"] == cli["results"]


def test_readme_compare_equals_the_cli(workflow) -> None:
    root = workflow["root"]
    _cli("compare", "runs/kdiga.pt", "runs/teacher.pt", "-n", 50, "--eps", "0,0.01,0.02,0.05", "--out", root / "cmp")
    cli = json.loads((root / "cmp" / "compare.json").read_text())
    comparison = workflow["comparison"]
    assert isinstance(comparison, certkd.CompareResult) and comparison.verdict == cli["verdict"]
    for key in ("reason", "certified", "empirical", "rho", "coverage", "certified_label", "rule"):
        assert comparison.data[key] == cli[key], key
    rows = sorted(read_jsonl(root / "cmp" / "per_example.jsonl")[1:], key=lambda r: r["index"])
    assert comparison.to_frame(per_example=True).to_dict("records") == rows
    assert list(comparison.to_frame()["eps"]) == [0, 0.01, 0.02, 0.05]


def test_readme_benchmark_is_certify_on_the_named_dataset(workflow) -> None:
    bench, result = workflow["bench"], workflow["result"]
    assert bench.data["config"]["eps"] == [2 / 255] and bench.data["num_examples"] == 50
    assert bench.clean_accuracy == result.clean_accuracy  # same model, same 50 points


def _modules() -> list[str]:
    """Every module of the two packages (a walk, not a list: a new module's examples run too)."""
    import pkgutil

    import bounds

    return sorted(m.name for pkg in (bounds, certkd) for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."))


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_doctest_walk_finds_the_examples() -> None:
    """The walk reaches the modules with examples, in both packages (it cannot silently find none)."""
    names = _modules()
    assert {"bounds.attack", "bounds.paired", "certkd.api", "certkd.runs", "certkd.verdict"} <= set(names)


def test_bounds_exports_its_public_names_lazily() -> None:
    """``from bounds import X`` works for every name of ``bounds.__all__``; ``import bounds`` loads neither
    scipy nor auto_LiRPA nor certkd."""
    import subprocess
    import sys

    code = ("import sys, bounds; heavy = [m for m in ('scipy', 'auto_LiRPA', 'certkd') if m in sys.modules]; "
            "assert not heavy, heavy; assert sorted(bounds.__all__) == sorted(bounds._WHERE); "
            "assert len(bounds.__all__) <= 20; "
            "[getattr(bounds, n) for n in bounds.__all__]; from bounds import BoundEngine, transfer_bound")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compare_rule_is_one_mechanism_for_cli_api_and_report() -> None:
    """Every ``CompareRule`` field is a ``compare`` option; ``rule=`` reaches the verdict; ``alpha`` is smoothing's."""
    import dataclasses

    import torch

    from certkd.models import create_model
    from certkd.verdict import CompareRule

    flags = {p.name: p for p in main.commands["compare"].params}
    for f in dataclasses.fields(CompareRule):
        assert f.name in flags and flags[f.name].default == f.default, f.name
    assert "ci_level" in flags and "alpha" not in flags
    net = create_model("mlp", 10, (1, 8, 8), (0.5,), (0.5,), hidden=[8])
    x, y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    res = certkd.compare(net, net, (x, y), "lipschitz", norm="2", rule={"ci_level": 0.8, "n_boot": 30}, alpha=0.01,
                         apgd_steps=2)
    assert res.data["rule"]["ci_level"] == 0.8 and res.data["rule"]["n_boot"] == 30
    assert res.data["config"]["params"]["alpha"] == 0.01
    with pytest.raises(certkd.api.CertkdError, match="unknown compare rule setting"):
        certkd.compare(net, net, (x, y), "lipschitz", norm="2", rule={"alpha": 0.1})
