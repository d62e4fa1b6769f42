"""bounds.lirpa: each compatibility shim is applied exactly where the installed versions need it."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy
import pytest
import torch
from torch import nn

from bounds import lirpa
from bounds.errors import AutoLirpaMissing

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


@pytest.fixture(scope="module")
def auto_lirpa():
    return lirpa.import_auto_lirpa()


def test_legacy_versions():
    assert lirpa.is_legacy("0.3")
    assert lirpa.is_legacy("0.3.1")
    assert not lirpa.is_legacy("0.6.0")
    assert not lirpa.is_legacy(None)


def test_condition_arraysetops_against_fake_numpy():
    assert lirpa.needs_arraysetops(lambda name: False)  # numpy 2: module gone
    assert not lirpa.needs_arraysetops(lambda name: name == "numpy.lib.arraysetops")  # numpy 1


def test_condition_set_opset_version_against_fake_torch():
    assert lirpa.needs_set_opset_version(types.SimpleNamespace())  # torch 2.13: gone
    assert not lirpa.needs_set_opset_version(types.SimpleNamespace(_set_opset_version=lambda v: None))


def test_condition_node_getitem_against_fake_node():
    class OldNode:
        def __getitem__(self, key):
            return key

    class NewNode:
        pass

    assert not lirpa.needs_node_getitem(OldNode)
    assert lirpa.needs_node_getitem(NewNode)


def test_condition_named_members_against_fake_modules():
    class TorchNew:
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return iter(())

    class TorchOld:
        def _named_members(self, get_members_fn, prefix="", recurse=True):
            return iter(())

    class LirpaOld(TorchOld):
        pass

    class LirpaNew(TorchNew):
        pass

    assert lirpa.needs_named_members(LirpaOld, TorchNew)
    assert not lirpa.needs_named_members(LirpaNew, TorchNew)
    assert not lirpa.needs_named_members(LirpaOld, TorchOld)


def test_shims_applied_exactly_where_this_stack_needs_them(auto_lirpa):
    version = lirpa.auto_lirpa_version()
    assert auto_lirpa.__version__ == version
    legacy = lirpa.is_legacy(version)
    numpy2 = int(numpy.__version__.split(".")[0]) >= 2
    assert lirpa.APPLIED_SHIMS["numpy_arraysetops"] == (legacy and numpy2)
    assert set(lirpa.APPLIED_SHIMS) == {"numpy_arraysetops", "onnx_set_opset_version", "node_getitem",
                                        "named_members_remove_duplicate"}
    if not legacy:
        assert not any(lirpa.APPLIED_SHIMS.values())
    # whatever was needed is in place now
    assert not lirpa.needs_node_getitem() or not legacy
    assert not lirpa.needs_set_opset_version() or not legacy
    if lirpa.APPLIED_SHIMS["numpy_arraysetops"]:
        assert sys.modules["numpy.lib.arraysetops"].isin is numpy.isin


def test_newer_auto_lirpa_gets_no_patch(monkeypatch):
    saved = dict(lirpa.APPLIED_SHIMS)
    monkeypatch.setattr(lirpa, "_MODULE", None)
    monkeypatch.setattr(lirpa, "auto_lirpa_version", lambda: "0.6.0")
    try:
        lirpa.import_auto_lirpa()
        assert lirpa.APPLIED_SHIMS and not any(lirpa.APPLIED_SHIMS.values())
    finally:
        lirpa.APPLIED_SHIMS.clear()
        lirpa.APPLIED_SHIMS.update(saved)


def test_missing_auto_lirpa_is_one_sentence(monkeypatch):
    monkeypatch.setattr(lirpa, "_MODULE", None)
    monkeypatch.setattr(lirpa, "auto_lirpa_version", lambda: None)
    with pytest.raises(AutoLirpaMissing, match=r"pip install --no-deps auto-LiRPA==0\.3") as info:
        lirpa.import_auto_lirpa()
    assert "\n" not in str(info.value)


def test_missing_opset_state_is_one_sentence(monkeypatch):
    monkeypatch.setattr(lirpa, "_module_exists", lambda name: False)
    with pytest.raises(AutoLirpaMissing, match="torch") as info:
        lirpa._onnx_globals()
    assert "\n" not in str(info.value)


def test_self_test_on_an_untested_torch(auto_lirpa, monkeypatch):
    monkeypatch.setattr(lirpa, "TESTED_TORCH", ())
    lirpa._self_test(auto_lirpa, "0.3")  # passes on a working stack
    broken = types.SimpleNamespace(BoundedModule=None, PerturbationLpNorm=None, BoundedTensor=None)
    with pytest.raises(AutoLirpaMissing, match="tested with torch"):
        lirpa._self_test(broken, "0.3")


class MeanPoolNet(nn.Module):
    """A mean over the spatial axes: ReduceMean needs the opset 0.3 asks for (12), not torch's 20."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_opset_really_set_and_means_bound(auto_lirpa):
    torch.manual_seed(0)
    net = MeanPoolNet().eval()
    x = torch.rand(3, 1, 6, 6)
    bounded = auto_lirpa.BoundedModule(net, torch.zeros(1, 1, 6, 6))
    if lirpa.APPLIED_SHIMS["onnx_set_opset_version"]:
        assert lirpa.onnx_opset_version() == lirpa.LEGACY_OPSET
    ptb = auto_lirpa.PerturbationLpNorm(norm=float("inf"), eps=0.05)
    with torch.no_grad():
        lower, upper = bounded.compute_bounds(x=(auto_lirpa.BoundedTensor(x, ptb),), method="CROWN")
        out = net(x)
    assert bool((lower <= out + 1e-6).all()) and bool((out <= upper + 1e-6).all())
    assert bool((upper - lower > 0).all())  # the perturbation really reached the output


def test_parameters_accept_remove_duplicate(auto_lirpa):
    bounded = auto_lirpa.BoundedModule(MeanPoolNet(), torch.zeros(1, 1, 6, 6))
    names = [n for n, _ in bounded.named_parameters(remove_duplicate=False)]
    assert len(names) == 4 and len(list(bounded.parameters())) == 4


def test_import_restores_warnings_and_root_logger():
    code = (
        "import json, logging, warnings, torch, torch.onnx\n"
        "import bounds.lirpa as L\n"
        "filters = list(warnings.filters); root = logging.getLogger()\n"
        "handlers, level = list(root.handlers), root.level\n"
        "L.import_auto_lirpa()\n"
        "print(json.dumps({'filters': filters == list(warnings.filters), 'handlers': handlers == root.handlers,"
        " 'level': level == root.level, 'applied': L.APPLIED_SHIMS}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["filters"] and result["handlers"] and result["level"]
    assert result["applied"] == lirpa.APPLIED_SHIMS
