"""Plugin architectures: an installed package's ``certkd.models`` entry point is usable from fresh processes,
a missing provider is one line, and a checkpoint never makes certkd import a module it names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import write_mnist_split

import certkd
from certkd.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from certkd.cli import main
from certkd.data import dataset_info
from certkd.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
PACKAGE, DIST, VERSION = "certkd_lenet_plugin", "certkd-lenet-plugin", "1.2.0"
PLUGIN_CODE = '''
"""A researcher's own MNIST CNN, shipped as a certkd plugin."""
from torch import nn


def tiny_lenet(num_classes, input_shape, width=4):
    """LeNet-style: conv 3x3 -> ReLU -> MaxPool -> conv 3x3 -> ReLU -> MaxPool -> Linear."""
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), num_classes))
'''


def install_plugin(site: Path) -> Path:
    """A package plus its ``.dist-info`` (METADATA, entry_points.txt): what ``pip install`` leaves behind."""
    (site / PACKAGE).mkdir(parents=True)
    (site / PACKAGE / "__init__.py").write_text(PLUGIN_CODE)
    info = site / f"{PACKAGE}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text(f"[certkd.models]\ntiny_lenet = {PACKAGE}:tiny_lenet\n")
    (info / "top_level.txt").write_text(PACKAGE + "\n")
    return site


def certkd_process(args: list[str], cwd: Path, site: Path | None, data_dir: Path) -> subprocess.Popen:
    paths = [str(REPO)] + ([str(site)] if site is not None else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "CERTKD_DATA_DIR": str(data_dir),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "certkd", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[str, str, int]:
    out, err = proc.communicate(timeout=600)
    return out, err, proc.returncode


@pytest.fixture(scope="module")
def plugin_world(tmp_path_factory):
    """The plugin installed in a site folder, MNIST test idx files (64 points) and the plugin's raw weights."""
    root = tmp_path_factory.mktemp("plugin")
    site = install_plugin(root / "site")
    data = root / "data"
    write_mnist_split(data, "test", 64, gz=False)
    sys.path.insert(0, str(site))
    try:
        module = __import__(PACKAGE)
        torch.manual_seed(0)
        body = module.tiny_lenet(10, (1, 28, 28))
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(PACKAGE, None)
    torch.save(body.state_dict(), root / "weights.pt")
    return root, site, data, body


@pytest.mark.usefixtures("lirpa")
def test_plugin_models_convert_info_certify_compare_in_fresh_processes(plugin_world):
    root, site, data, body = plugin_world
    listed = finish(certkd_process(["models"], root, site, data))
    converted = finish(certkd_process(["convert", "--arch", "tiny_lenet", "--dataset", "mnist", "--weights",
                                       "weights.pt", "--out", "plugin.pt"], root, site, data))
    assert listed[2] == 0 and converted[2] == 0, listed[1] + converted[1]
    line = next(s for s in listed[0].splitlines() if s.startswith("tiny_lenet"))
    assert f"{DIST} {VERSION}" in line and "LeNet-style" in line and "width=4" in line
    ckpt = load_checkpoint(root / "plugin.pt")
    assert ckpt.model_provider == {"package": DIST, "version": VERSION}

    runs = {"info": ["info", "plugin.pt"],
            "certify": ["certify", "plugin.pt", "--method", "crown", "-n", "4", "--pgd-steps", "2",
                        "--out", "certify.json"],
            "compare": ["compare", "plugin.pt", "plugin.pt", "--method", "ibp", "-n", "4", "--n-boot", "20",
                        "--out", "compare"],
            "missing": ["info", "plugin.pt"]}
    procs = {k: certkd_process(a, root, None if k == "missing" else site, data) for k, a in runs.items()}
    results = {k: finish(p) for k, p in procs.items()}
    for kind in ("info", "certify", "compare"):
        assert results[kind][2] == 0, f"{kind}: {results[kind][1]}"
    n_params = sum(p.numel() for p in body.parameters())
    assert f"tiny_lenet (default arguments), {n_params:,} parameters, from {DIST} {VERSION}" in results["info"][0]
    assert (root / "certify.json").is_file() and (root / "compare" / "compare.json").is_file()

    out, err, code = results["missing"]
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [f"certkd: error: plugin.pt: model 'tiny_lenet' comes from package {DIST} "
                                        f"{VERSION}, which is not installed: pip install {DIST}"]


EVIL = "certkd_evil_probe"


def forged_checkpoint(folder: Path, name: str, package: str) -> Path:
    meta = dataset_info("mnist")
    model = certkd.models.create_model("lenet5", 10, meta.input_shape, conv=[2], linear=[4])
    ckpt = make_checkpoint(model, "lenet5", {"conv": [2], "linear": [4]}, meta)
    ckpt.model_name, ckpt.model_provider = name, {"package": package, "version": "6.6.6"}
    return save_checkpoint(ckpt, folder / f"forged_{abs(hash((name, package)))}.pt")


@pytest.mark.parametrize(("name", "package"), [
    ("evil_net", EVIL),  # the provider names an importable module
    (f"{EVIL}:build", EVIL),  # an entry-point-style "module:function" as the model name
    ("lenet5", f"{EVIL}"),  # a built-in name claimed by a forged provider
])
def test_forged_provider_is_refused_without_importing_it(tmp_path, monkeypatch, name, package):
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{EVIL}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                         f"def build(num_classes, input_shape):\n    raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = forged_checkpoint(tmp_path, name, package)
    with pytest.raises(CheckpointError, match=f"pip install {EVIL}|from package {EVIL}"):
        load_checkpoint(path).build_model()
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert EVIL not in sys.modules and not marker.exists()
