"""Ordinary idioms are bounded through exact rewrites of the verification view, and soundly.

Hand-written models as researchers write them (batch-size-agnostic flatten, negative mean
axes, division by a constant, a log-softmax or max-shift head, zero ``F.pad``, PReLU and
LeakyReLU), briefly trained on digits: the raw model fails in auto_LiRPA 0.3 or is refused,
certkd's view bounds it, and no margin lower bound lies above an independent per-margin PGD
(or above the clean margin at eps = 0), for IBP, CROWN-IBP and CROWN under L-inf and L2, on
every backend (``lirpa`` marker); through ``certkd.certify`` and the CLI as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SLACK,
    briefly_trained,
    count_violations,
    labels_of,
    per_margin_attack,
    raw_lower,
    registered_models,
)
from torch import nn

from bounds.attack import margins
from bounds.certify import BoundEngine
from bounds.fold import zero_pad_conv
from bounds.nn import SlopeReLU

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py


class ConvNet(nn.Module):
    """conv 3x3 (padding 1) -> activation -> the idiom under test -> linear head."""

    def __init__(self, idiom: str):
        super().__init__()
        self.idiom = idiom
        self.conv = nn.Conv2d(1, 4, 3, padding=0 if "pad" in idiom else 1)
        self.act = {"prelu": nn.PReLU(4), "leaky": nn.LeakyReLU(0.1)}.get(idiom, nn.ReLU())
        self.fc = nn.Linear(4 if idiom == "mean" else 256 if idiom != "pad_unequal" else 4 * 7 * 7, 10)

    def forward(self, x):
        if self.idiom == "pad":
            x = F.pad(x, (1, 1, 1, 1))
        if self.idiom == "pad_unequal":
            x = F.pad(x, (0, 1, 1, 0))
        h = self.act(self.conv(x))
        if self.idiom == "leaky_functional":
            h = F.leaky_relu(self.conv(x), 0.2)
        if self.idiom == "mean":
            return self.fc(h.mean(dim=(-1, -2)))
        if self.idiom == "view":
            return self.fc(h.view(h.size(0), -1))
        if self.idiom == "len":
            return self.fc(h.reshape(len(h), -1))
        if self.idiom == "shape":
            return self.fc(h.view(h.shape[0], 4, 64).flatten(1))
        if self.idiom == "div":
            return self.fc(h.flatten(1) / 4.0)
        logits = self.fc(h.flatten(1))
        if self.idiom == "log_softmax":
            return F.log_softmax(logits, dim=1)
        if self.idiom == "max_shift":
            return logits - logits.max(dim=1, keepdim=True).values
        return logits


IDIOMS = ["view", "len", "shape", "mean", "div", "log_softmax", "max_shift", "pad", "pad_unequal", "prelu",
          "leaky", "leaky_functional"]


@pytest.fixture(scope="module")
def trained(digits):
    train, _ = digits
    return {idiom: briefly_trained(ConvNet(idiom), train) for idiom in IDIOMS}


@pytest.mark.parametrize("idiom", IDIOMS)
def test_idiom_bounded_soundly(idiom, trained, digits):
    model = trained[idiom]
    x = digits[1].x[:6]
    y = labels_of(model, x)
    engine = BoundEngine(model, (1, 8, 8))
    with torch.no_grad():
        clean = margins(model(x), y)
    for method in ("ibp", "crown-ibp", "crown"):
        at_zero = engine.margin_bounds(x, y, 0.0, "inf", method).lower
        assert bool((at_zero <= clean + SLACK).all()), (idiom, method)
    for norm, eps in (("inf", 0.02), ("2", 0.2)):
        attack = per_margin_attack(model, x, y, eps, norm, steps=30, restarts=1)
        for method in ("ibp", "crown-ibp", "crown"):
            lower = engine.margin_bounds(x, y, eps, norm, method).lower
            assert count_violations(lower, attack) == 0, (idiom, norm, method)
            assert bool(torch.isfinite(lower).all())


@pytest.mark.parametrize("idiom", ["view", "len", "mean", "log_softmax", "prelu", "pad"])
def test_raw_auto_lirpa_fails_where_the_view_does_not(idiom, trained, digits):
    """The raw model: auto_LiRPA raises, or its graph computes a different function (flatten keeps the traced
    batch of 1), or its bounds at eps = 0 are not the clean margins."""
    from bounds.lirpa import import_auto_lirpa

    model = trained[idiom]
    x = digits[1].x[:4]
    y = labels_of(model, x)
    try:
        with torch.no_grad():
            graph_out = import_auto_lirpa().BoundedModule(model, torch.zeros(1, 1, 8, 8))(x)
        lower = raw_lower(model, x, y, 0.0, "inf", "CROWN")
    except Exception:  # noqa: BLE001 - any foreign exception is the failure
        return
    with torch.no_grad():
        logits = model(x)
    clean = margins(logits, y)
    same_graph = graph_out.shape == logits.shape and torch.allclose(graph_out, logits, atol=1e-4)
    if same_graph and lower.shape == clean.shape and torch.allclose(lower, clean, atol=1e-4):
        pytest.skip(f"this auto_LiRPA bounds the raw {idiom} model itself")


def test_slope_relu_and_zero_pad_conv_are_exact():
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    slope = torch.tensor([0.25, -0.5, 1.5, 0.0])
    assert torch.allclose(SlopeReLU(slope)(x), F.prelu(x, slope), atol=1e-6)
    assert torch.allclose(SlopeReLU(0.1)(x), F.leaky_relu(x, 0.1), atol=1e-6)
    for pads in ((1, 1, 1, 1), (0, 2, 1, 0), (3, 0, 0, 1), (0, 0, 0, 0)):
        assert torch.equal(zero_pad_conv(4, pads, x)(x), F.pad(x, pads)), pads


def test_non_zero_padding_refused_by_name_or_bounded_soundly():
    class ConstantPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(F.pad(x, (1, 1, 1, 1), value=0.5))).flatten(1))

    from bounds.errors import UnsupportedModelError

    torch.manual_seed(0)
    model = ConstantPad().eval()
    x = torch.rand(4, 1, 8, 8)
    y = labels_of(model, x)
    try:
        lower = BoundEngine(model, (1, 8, 8)).margin_bounds(x, y, 0.02, "inf", "crown").lower
    except UnsupportedModelError as exc:
        assert "Pad" in str(exc) and "\n" not in str(exc)
    else:  # a backend that bounds a constant Pad: PGD must not break its bounds
        assert count_violations(lower, per_margin_attack(model, x, y, 0.02, "inf", steps=30, restarts=1)) == 0


def test_idioms_through_api_and_cli(trained, digits, tmp_path):
    """``certkd.certify`` and ``certkd certify`` accept an idiom model and publish nothing PGD breaks."""
    from click.testing import CliRunner

    import certkd
    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.cli import main
    from certkd.models import create_model

    test = digits[1]
    model = trained["view"]
    res = certkd.certify(model, (test.x[:8], test.y[:8]), ["crown", "ibp"], [0.01, 0.05], pgd_steps=10)
    assert res.data["soundness"]["certified_checked_by_pgd"] > 0  # the gate ran and passed
    for method in ("crown", "ibp"):
        for eps in (0.01, 0.05):
            assert res.accuracy(method, eps) <= res.accuracy("pgd", eps)
    name = "idioms_len"  # the registry puts Normalize in front: len(h) sits in a nested module's forward
    with registered_models({name: lambda: ConvNet("len")}):
        net = briefly_trained(create_model(name, 10, (1, 8, 8)), digits[0], steps=10)
        path = save_checkpoint(make_checkpoint(net, name, {}, test.info), tmp_path / "m.pt")
        result = CliRunner().invoke(main, ["certify", str(path), "-n", "4", "--method", "crown,ibp", "--eps", "0.01",
                                           "--pgd-steps", "5", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.json").exists() and "Traceback" not in result.output
