"""bounds.backends: the capability table of the installed auto_LiRPA, every entry proven on a witness model.

CI runs this file once per backend (.ci/run: auto_LiRPA 0.3, then 0.7.x in a second
environment). ``test_every_entry_is_sound_on_its_witness`` bounds witness models whose
graphs contain every operator of the table, with every method and norm the table allows
for them, directly with auto_LiRPA on certkd's verification view, and checks each lower
bound against a per-margin PGD; a table entry no witness covers fails the test.
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path

import pytest
import torch
from helpers import per_margin_attack
from torch import nn

from bounds.backends import (
    ALLOW_07,
    EVIDENCE,
    PERTURBED_PRODUCT,
    VIT_CAPABILITIES,
    current_backend,
    describe,
    family_of,
    probe,
)
from bounds.certify import bounded_module, margin_spec
from bounds.graph import ALLOW_03, ALLOW_LISTS, check_graph_supported
from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
from bounds.nn import Normalize
from bounds.view import verification_view
from certkd.models import create_model

SHAPE = (1, 8, 8)
EPS = {math.inf: 0.02, 2.0: 0.1}
REPO = Path(__file__).resolve().parents[1]
_STRUCTURAL = {"BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant", "BoundShape"}

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


# --------------------------------------------------------------------------- detection

def fake_lirpa(name: str, ops: dict, op_map: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.operators = types.SimpleNamespace(**ops)
    submodule = types.ModuleType(f"{name}.bound_op_map")
    submodule.bound_op_map = op_map
    import sys

    sys.modules[submodule.__name__] = submodule
    return module


def test_probe_and_family_by_capability_not_version():
    class Softmax03:
        pass

    class SoftmaxLse:
        def _softmax_lse_lower(self):
            pass

    class Mul07:
        def update_requires_input_bounds(self):
            pass

    old = fake_lirpa("fake_lirpa_03", {"BoundSoftmax": Softmax03, "BoundMul": object}, {"onnx::Gemm": object})
    assert probe(old) == frozenset() and family_of(probe(old)) == "0.3"
    new = fake_lirpa("fake_lirpa_07", {"BoundSoftmax": SoftmaxLse, "BoundMul": Mul07,
                                       "BoundLayerNormalization": object}, {"custom::Gelu": object})
    assert probe(new) == VIT_CAPABILITIES and family_of(probe(new)) == "0.7"
    # one capability missing (no GELU relaxation) falls back to the conservative table
    partial = fake_lirpa("fake_lirpa_partial", {"BoundSoftmax": SoftmaxLse, "BoundMul": Mul07,
                                                "BoundLayerNormalization": object}, {})
    assert family_of(probe(partial)) == "0.3"


def test_installed_backend_is_detected():
    backend = current_backend()
    version = auto_lirpa_version()
    assert backend.version == version
    expected = "0.3" if version.startswith("0.3") else "0.7"
    assert backend.family == expected
    assert backend.allow is ALLOW_LISTS[expected] and ALLOW_LISTS["0.7"] is ALLOW_07
    assert backend.bounds_vits == (expected == "0.7")
    shims = describe(backend)["shims_applied"]
    assert bool(shims) == (expected == "0.3")  # 0.3 needs the import shims on torch 2.13, 0.7.x none
    assert version in backend.tested


def test_0_7_table_only_adds_to_0_3():
    for kind, rule in ALLOW_03.operators.items():
        assert ALLOW_07.operators[kind].methods == rule.methods and ALLOW_07.operators[kind].norms == rule.norms
    assert {"BoundGelu", "BoundSoftmax", "BoundMatMul", PERTURBED_PRODUCT} <= set(ALLOW_07.operators) - set(
        ALLOW_03.operators)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("allowed", [ALLOW_03, ALLOW_07], ids=["0.3", "0.7"])
def test_every_entry_names_existing_tests(allowed):
    for kind, rule in allowed.operators.items():
        assert rule.methods and rule.norms and EVIDENCE.get(kind), kind
        for ref in EVIDENCE[kind]:
            file, name = ref.split("::")
            assert name in _test_names(REPO / file), f"{kind}: {ref} does not exist"


# --------------------------------------------------------------------------- witnesses

class Ops(nn.Module):
    """Pooling, means, Sub, Mul and Neg by constants, Unsqueeze/Squeeze, a residual Add and a Concat."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool, self.avg, self.gap = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)
        self.register_buffer("scale", torch.tensor([1.5, -0.5, 2.0, 1.0]))

    def forward(self, x):
        h = torch.relu(self.conv(x))
        m = self.avg(self.pool(h)).mean(dim=(2, 3))
        g = self.gap(h).flatten(1)
        u = (-(m * self.scale - g)).unsqueeze(1).squeeze(1)
        return self.fc(torch.cat([torch.relu(u) + m, g], dim=1))


class ReshapeCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.reshape(-1, 64))


def witnesses(vits: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {
        "mlp": nn.Sequential(Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
        "cnn": ReshapeCNN(),
        "ops": Ops(),
    }
    if vits:
        models["vit"] = create_model("vit", 10, SHAPE, (0.3,), (0.4,), patch=4, dim=8, depth=1, heads=2)
    return {name: m.eval() for name, m in models.items()}


def perturbed_kinds(bounded) -> set[str]:
    """Operator kinds on the input's value path (past a Shape node only shapes flow), with products marked."""
    frontier = [n for n in bounded._modules.values() if type(n).__name__ == "BoundInput"]
    seen = {n.name for n in frontier}
    while frontier:
        node = frontier.pop()
        if type(node).__name__ == "BoundShape":
            continue
        for name in getattr(node, "output_name", []):
            if name not in seen:
                seen.add(name)
                frontier.append(bounded[name])
    nodes = [n for n in bounded._modules.values() if n.name in seen]
    kinds = {getattr(n, "lirpa_kind", type(n).__name__) for n in nodes}
    if any(type(n).__name__ == "BoundMul" and all(i.name in seen for i in n.inputs) for n in nodes):
        kinds.add(PERTURBED_PRODUCT)
    return kinds - _STRUCTURAL


def raw_view_lower(lirpa, bounded, x, y, eps: float, norm: float, method: str) -> torch.Tensor:
    if math.isinf(norm):
        ptb = lirpa.PerturbationLpNorm(norm=norm, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    else:
        ptb = lirpa.PerturbationLpNorm(norm=norm, eps=eps)
    name = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}[method]
    with torch.set_grad_enabled(method == "alpha-crown"):
        lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method=name,
                                          bound_upper=False)
    for p in bounded.parameters():
        p.grad = None
    return lower.detach()


def test_every_entry_is_sound_on_its_witness():
    """Every (operator, method, norm) of the installed backend's table: bounds below PGD on a witness graph."""
    backend = current_backend()
    lirpa = import_auto_lirpa()
    covered: set[tuple[str, str, float]] = set()
    violations: list[str] = []
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(1))
    for name, model in witnesses(backend.bounds_vits).items():
        view = verification_view(model, SHAPE)  # GELU and attention rewritten where the backend bounds them
        with torch.no_grad():
            y = model(x).argmax(1)
            assert float((view(x) - model(x)).abs().max()) <= 1e-5
        bounded = bounded_module(view, torch.zeros(1, *SHAPE))
        kinds = perturbed_kinds(bounded)
        outside = kinds - set(backend.allow.operators)
        assert not outside, f"witness {name} uses operators outside the table: {outside}"
        rules = [backend.allow.operators[k] for k in kinds]
        methods = frozenset.intersection(*(r.methods for r in rules))
        norms = frozenset.intersection(*(r.norms for r in rules))
        for norm in sorted(norms):
            attack = per_margin_attack(model, x, y, EPS[norm], norm)
            for method in sorted(methods):
                check_graph_supported(bounded, method, norm, backend.version)  # attributes too
                lower = raw_view_lower(lirpa, bounded, x, y, EPS[norm], norm, method)
                slack = 1e-5 * attack.abs().clamp_min(1.0)
                bad = int((lower > attack + slack).sum())
                if bad:
                    violations.append(f"{name} {method} L{norm:g}: {bad} of {lower.numel()}")
                covered |= {(k, method, norm) for k in kinds}
    assert violations == []
    missing = [f"{kind} {m} L{p:g}" for kind, rule in backend.allow.operators.items() if kind not in _STRUCTURAL
               for m in rule.methods for p in rule.norms if (kind, m, p) not in covered]
    assert missing == [], f"table entries no witness proves: {missing}"


# --------------------------------------------------------------------------- certkd doctor

def test_doctor_prints_backend_shims_and_table(capsys):
    from certkd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["doctor"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    backend = current_backend()
    assert f"auto_LiRPA {backend.version}" in out
    assert f"capability set {backend.family}" in out
    assert ("none needed" in out) == (backend.family == "0.7")
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "operator" not in line]
    assert {r[0] for r in rows} >= {"Linear", "Conv", "Relu"}
    assert ("Softmax" in {r[0] for r in rows}) == backend.bounds_vits


def test_doctor_json_states_the_installed_backend_and_the_method_table(capsys):
    """Checked against independent sources: the installed distribution, torch, and the bound-method table."""
    import importlib.metadata
    import json

    from bounds.bound_methods import BOUND_METHODS
    from certkd.cli import main

    with pytest.raises(SystemExit):
        main(["doctor", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == importlib.metadata.version("auto_LiRPA") and info["torch"] == torch.__version__
    rows = info["may_bound"]
    assert {"Linear", "Conv", "Relu"} <= {r["operator"] for r in rows}
    for row in rows:  # every operator names some bound methods, in the table's order
        assert row["methods"] and row["methods"] == [m for m in BOUND_METHODS if m in row["methods"]], row
    assert len(rows) == len([k for k in current_backend().allow.operators if k not in _STRUCTURAL])
