"""The evidence gate (bounds.evidence): no certificate leaves certkd that a point it holds contradicts.

Hand-written models of the kinds that gave false certificates before (average pooling whose
stride differs from its kernel, forward hooks and overridden ``forward`` under the Lipschitz
walk, Python branches on the input, large cancelling weights under float32), each checked
with an attack written here (``test_hazards.per_margin_attack``) and, where it exists, the
raw auto_LiRPA 0.3 result that was wrong. The gate itself is tested with a test double that
shifts auto_LiRPA's bounds: the clean point, sampled points and the per-node intervals each
catch it, and the refusal names the node.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import (
    briefly_trained,
    count_violations,
    labels_of,
    per_margin_attack,
    raw_lower,
    registered_models,
)
from torch import nn

from bounds.certify import BoundEngine
from bounds.errors import ContradictionError, UnsupportedModelError
from bounds.lipschitz import lipschitz_radius
from bounds.nn import Normalize
from certkd.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")


def expect_hazard(count: int, what: str) -> None:
    """Raw auto_LiRPA 0.3 shows the hazard (the test then shows certkd does not); other backends may not."""
    from bounds.lirpa import auto_lirpa_version

    assert count > 0 or not auto_lirpa_version().startswith("0.3"), f"raw 0.3 no longer shows {what}"


@pytest.fixture(scope="module")
def digits():
    return {"train": load_dataset("digits", "train"), "test": load_dataset("digits", "test")}


# --------------------------------------------------------------------------- average pooling

class FunctionalPool(nn.Module):
    """A researcher's CNN with an inline ``F.avg_pool2d(h, 3, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        h = F.avg_pool2d(torch.relu(self.conv(x)), 3, 1)
        return self.fc(h.flatten(1))


def pooled(pool: nn.Module, side: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(6 * side * side, 10))


POOLS = {"avg3_stride1": lambda: pooled(nn.AvgPool2d(3, stride=1), 4),
         "avg3_stride2": lambda: pooled(nn.AvgPool2d(3, stride=2), 2),
         "blur2_stride1": lambda: pooled(nn.AvgPool2d(2, stride=1), 5),
         "functional": FunctionalPool}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_average_pooling_with_stride_other_than_kernel(name, digits):
    """Raw 0.3 CROWN bounds some margin above the model's own value at eps = 0; certkd refuses CROWN and
    CROWN-IBP for it, and its IBP bounds stay below an independent attack."""
    torch.manual_seed(0)
    model = briefly_trained(POOLS[name](), digits["train"])
    x = digits["test"].x[:8]
    y = labels_of(model, x)
    with torch.no_grad():
        logits = model(x)
    own = (logits.gather(1, y.view(-1, 1)) - logits)[torch.arange(10).view(1, -1) != y.view(-1, 1)].view(8, 9)
    raw = raw_lower(model, x, y, 0.0, "inf", "CROWN")
    expect_hazard(int((raw > own + 1e-4).sum()), f"average pooling {name} under CROWN")
    engine = BoundEngine(model, (1, 8, 8))
    for method in ("crown", "crown-ibp"):
        with pytest.raises(UnsupportedModelError, match="average pooling with a stride other than its kernel"):
            engine.margin_bounds(x, y, 0.02, "inf", method)
    lower = engine.margin_bounds(x, y, 0.05, "inf", "ibp").lower
    assert count_violations(lower, per_margin_attack(model, x, y, 0.05, "inf")) == 0


# --------------------------------------------------------------------------- the gate on a wrong relaxation

def shifted_bounds(monkeypatch, engine: BoundEngine, shift_final: float = 0.0, node: str | None = None,
                   shift_node: float = 0.0) -> None:
    """A test double of a wrong relaxation: auto_LiRPA's margin bounds raised by ``shift_final``, or the
    interval of intermediate ``node`` moved up by ``shift_node`` (its lower end above its values)."""
    bounded = engine.bounded
    original = bounded.compute_bounds

    def compute_bounds(*args, **kwargs):
        result = original(*args, **kwargs)
        if node is not None:
            target = bounded[node]
            target.lower = target.lower + shift_node
            target.upper = target.upper + shift_node
        if shift_final and kwargs.get("C") is not None:
            return (result[0] + shift_final, *result[1:])
        return result

    monkeypatch.setattr(bounded, "compute_bounds", compute_bounds)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained_mlp(digits):
    return briefly_trained(mlp(), digits["train"])


def test_gate_catches_a_bound_above_the_clean_margin(monkeypatch, trained_mlp, digits):
    x = digits["test"].x[:6]
    y = labels_of(trained_mlp, x)
    engine = BoundEngine(trained_mlp, (1, 8, 8))
    honest = engine.margin_bounds(x, y, 0.0, "inf", "crown").lower
    assert honest.shape == (6, 9)
    shifted_bounds(monkeypatch, engine, shift_final=1.0)
    with pytest.raises(ContradictionError, match="crown is refused for this model"):
        engine.margin_bounds(x, y, 0.0, "inf", "crown")


def test_gate_catches_a_bound_that_holds_only_at_the_clean_point(monkeypatch, trained_mlp, digits):
    """A bound just below the clean margin at a large eps: wrong over the ball, found at sampled points."""
    x = digits["test"].x[:6]
    y = labels_of(trained_mlp, x)
    engine = BoundEngine(trained_mlp, (1, 8, 8))
    eps = 0.3
    true_low = per_margin_attack(trained_mlp, x, y, eps, "inf", steps=20, restarts=1)
    honest = engine.margin_bounds(x, y, eps, "inf", "ibp").lower
    with torch.no_grad():
        logits = trained_mlp(x)
    own = (logits.gather(1, y.view(-1, 1)) - logits)[torch.arange(10).view(1, -1) != y.view(-1, 1)].view(6, 9)
    assert bool((true_low < own - 0.5).any())  # the ball reaches far below the clean margin
    shifted_bounds(monkeypatch, engine, shift_final=float((own - honest).min()) - 1e-3)
    with pytest.raises(ContradictionError):
        engine.margin_bounds(x, y, eps, "inf", "ibp")


def test_gate_names_the_node_whose_interval_is_wrong(monkeypatch, trained_mlp, digits):
    x = digits["test"].x[:6]
    y = labels_of(trained_mlp, x)
    engine = BoundEngine(trained_mlp, (1, 8, 8))
    linears = [n.name for n in engine.bounded._modules.values() if type(n).__name__ == "BoundLinear"]
    shifted_bounds(monkeypatch, engine, node=linears[1], shift_node=5.0)
    with pytest.raises(ContradictionError, match=f"node {linears[1]} \\(Linear"):
        engine.margin_bounds(x, y, 0.01, "inf", "crown")


def test_engine_bounds_again_after_a_refusal(monkeypatch, trained_mlp, digits):
    x = digits["test"].x[:4]
    y = labels_of(trained_mlp, x)
    engine = BoundEngine(trained_mlp, (1, 8, 8))
    with monkeypatch.context() as patch:
        shifted_bounds(patch, engine, shift_final=1.0)
        with pytest.raises(ContradictionError):
            engine.margin_bounds(x, y, 0.01, "inf", "crown")
    lower = engine.margin_bounds(x, y, 0.01, "inf", "crown").lower
    assert count_violations(lower, per_margin_attack(trained_mlp, x, y, 0.01, "inf")) == 0


def test_cli_refusal_exit_3_and_no_result_file(monkeypatch, digits, tmp_path):
    """Through ``certkd certify``: a contradicted bound is refused (exit 3), nothing is written."""
    from bounds import certify as certify_module
    from certkd.checkpoint import save_model
    from certkd.cli import main
    from certkd.models import create_model

    ckpt = tmp_path / "mlp.pt"
    torch.manual_seed(0)
    model = briefly_trained(create_model("mlp", 10, (1, 8, 8), hidden=[32]), digits["train"])
    save_model(model, ckpt, dataset="digits", arch="mlp", arch_kwargs={"hidden": [32]})
    original = certify_module.BoundEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        shifted_bounds(monkeypatch, self, shift_final=1.0)

    monkeypatch.setattr(certify_module.BoundEngine, "__init__", init)
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(main, ["certify", str(ckpt), "-n", "4", "--method", "crown", "--eps", "0.01",
                                       "--out", str(out), "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "refused" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_summary_refuses_certificates_its_own_attack_broke():
    """The run-level gate: a certified (point, eps) pair that the run's PGD broke refuses the method."""
    from certkd.certification.records import CertifyJob
    from certkd.certification.summary import summarize

    job = CertifyJob(methods=["crown"], eps=[0.1])
    config = {"num_examples": 2, **job.to_config()}
    base = {"label": 1, "pred": 1, "eps": 0.1, "target": "model"}
    records = [{**base, "index": 0, "method": "crown", "robust": True, "certified": True},
               {**base, "index": 1, "method": "crown", "robust": False, "certified": True},
               {**base, "index": 0, "method": "pgd", "robust": True, "certified": False},
               {**base, "index": 1, "method": "pgd", "robust": False, "certified": False}]
    assert summarize(config, records)["soundness"]["certified_checked_by_pgd"] == 1
    records[2]["robust"] = False
    with pytest.raises(ContradictionError, match="crown \\(1\\)"):
        summarize(config, records)


def test_compare_refuses_a_certified_radius_beyond_the_attack_radius():
    from certkd.commands.compare import summarize_compare

    rows = [{"index": i, "radius_student": 0.1, "radius_teacher": 0.1, "correct_student": True,
             "correct_teacher": True, "attack_student": 0.3, "attack_teacher": 0.3} for i in range(5)]
    assert summarize_compare({"method": "crown", "n_boot": 50}, rows)["verdict"] == "yes"
    rows[2]["attack_teacher"] = 0.05  # an adversarial example inside the teacher's certified ball
    with pytest.raises(ContradictionError, match="crown is refused for the teacher"):
        summarize_compare({"method": "crown", "n_boot": 50}, rows)
    assert summarize_compare({"method": "apgd", "n_boot": 50}, rows)["verdict"] in ("yes", "no", "inconclusive")


# --------------------------------------------------------------------------- Lipschitz sees what runs

class Scaled(Normalize):
    """A normalization that also brightens: its forward differs from Normalize's."""

    def forward(self, x):
        return super().forward(x) * 5


def hooked_relu() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    net[2].register_forward_hook(lambda module, inputs, output: output * 4)
    return net


def pre_hooked() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    net[3].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 3,))
    return net


def parametrized() -> nn.Module:
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    parametrize.register_parametrization(net[1], "weight", Double())
    return net


LIPSCHITZ_CASES = {"forward hook": hooked_relu, "pre-hook": pre_hooked, "parametrization": parametrized,
                   "overridden forward": lambda: nn.Sequential(Scaled([0.5], [0.3]), nn.Flatten(),
                                                               nn.Linear(64, 10))}


@pytest.mark.parametrize("name", sorted(LIPSCHITZ_CASES))
def test_lipschitz_refuses_or_sees_code_fx_does_not_trace(name, digits):
    """Each case's true Jacobian norm is several times what the plain layers give: certkd refuses, or its
    radii survive an independent L2 attack."""
    torch.manual_seed(0)
    model = LIPSCHITZ_CASES[name]().eval()
    x = digits["test"].x[:6]
    y = labels_of(model, x)
    try:
        radius = lipschitz_radius(model, x, y, "2").radius
    except UnsupportedModelError as exc:
        assert len(str(exc).splitlines()) == 1
        return
    attack = per_margin_attack(model, x, y, radius.clamp_min(1e-6), "2")
    assert count_violations(torch.zeros_like(attack)[radius > 0], attack[radius > 0]) == 0


def test_lipschitz_gate_checks_gradients(monkeypatch, digits):
    """A constant below a measured gradient norm is refused (the gate, whatever missed the code)."""
    from bounds import lipschitz

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = digits["test"].x[:4]
    y = labels_of(model, x)
    bound = lipschitz.lipschitz_bound(model, (1, 8, 8))
    halved = lipschitz.LipschitzBound(bound.logits / 2, bound.margin / 2)
    with pytest.raises(ContradictionError, match="lipschitz is refused"):
        lipschitz_radius(model, x, y, "2", bound=halved)
    assert bool((lipschitz_radius(model, x, y, "2", bound=bound).radius >= 0).all())


# --------------------------------------------------------------------------- branches on the input

class Brighten(nn.Module):
    """Brightens dark images: a Python branch on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        if x.mean() < 0.26:
            x = (2.5 * x).clamp(0, 1)
        return self.net(x)


@pytest.mark.parametrize("method", ["ibp", "crown", "lipschitz"])
def test_branch_on_the_input_is_refused_naming_the_line(method):
    model = Brighten().eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"test_evidence_gate.py:\d+: if x.mean\(\) < 0.26"):
        if method == "lipschitz":
            lipschitz_radius(model, x, torch.zeros(2, dtype=torch.long), "2")
        else:
            BoundEngine(model, (1, 8, 8)).margin_bounds(x, torch.zeros(2, dtype=torch.long), 0.01, "inf", method)


# --------------------------------------------------------------------------- float32 cancellation

def cancelling(seed: int = 0) -> nn.Module:
    """Two identical hidden units whose output weights are +1e4 and -1e4 (they cancel exactly in real arithmetic)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():  # both units active on [0, 1]^d
        net[1].weight[0] = net[1].weight[0].abs()
        net[1].bias[0] = 1.0
        net[1].weight[1] = net[1].weight[0]
        net[1].bias[1] = net[1].bias[0]
        net[3].weight[:, 0] += 1e4
        net[3].weight[:, 1] -= 1e4
    return net.eval()


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_cancelling_weights_stay_below_the_float32_margin(method, digits):
    model = cancelling()
    x = digits["test"].x[:16]
    y = labels_of(model, x)
    with torch.no_grad():
        logits = model(x)
    own = (logits.gather(1, y.view(-1, 1)) - logits)[torch.arange(10).view(1, -1) != y.view(-1, 1)].view(16, 9)
    raw = raw_lower(model, x, y, 0.0, "inf", method.upper())
    expect_hazard(int((raw > own).sum()), "float32 cancellation above the model's own margin")
    engine = BoundEngine(model, (1, 8, 8))
    for eps in (0.0, 0.01):
        try:
            lower = engine.margin_bounds(x, y, eps, "inf", method).lower
        except ContradictionError:
            continue  # refused: sound
        assert count_violations(lower, per_margin_attack(model, x, y, eps, "inf", steps=20, restarts=1)) == 0
        assert bool((lower <= own).all())


def test_rounding_allowance_grows_with_cancelled_magnitudes():
    """The allowance reads the magnitudes inside the computation, not the logits' scale."""
    from bounds.certify import margin_spec
    from bounds.evidence import rounding_allowance

    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    plain = BoundEngine(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval(),
                        (1, 8, 8))
    big = BoundEngine(cancelling(), (1, 8, 8))
    small = rounding_allowance(plain.bounded, x, margin_spec(y, 10), plain.version)
    large = rounding_allowance(big.bounded, x, margin_spec(y, 10), big.version)
    assert float(large.min()) > 100 * float(small.max())
    with torch.no_grad():
        logits = big.view(x)
    assert float(logits.abs().max()) < 1e3  # the logits themselves are not large: a logit-scaled allowance would miss
    assert math.isfinite(float(large.max()))


# --------------------------------------------------------------------------- the families through the CLI

CLI_FAMILIES = {  # case -> (model, method, exit code)
    "avgpool_stride1": (POOLS["avg3_stride1"], "crown", 2),
    "branch": (Brighten, "crown", 2),
    "branch_lipschitz": (Brighten, "lipschitz", 2),
    "hook_lipschitz": (hooked_relu, "lipschitz", 2),
    "pre_hook_lipschitz": (pre_hooked, "lipschitz", 2),
}


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, digits):
    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.models import create_model

    out = tmp_path_factory.mktemp("families")
    paths = {}
    with registered_models({f"gate_{case}": make for case, (make, _, _) in CLI_FAMILIES.items()}):
        for case in CLI_FAMILIES:
            torch.manual_seed(0)
            model = briefly_trained(create_model(f"gate_{case}", 10, (1, 8, 8)), digits["train"], steps=10)
            paths[case] = save_checkpoint(make_checkpoint(model, f"gate_{case}", {}, digits["test"].info),
                                          out / f"{case}.pt")
        yield paths


@pytest.mark.parametrize("case", sorted(CLI_FAMILIES))
def test_cli_families_refused_in_one_line(case, family_checkpoints, tmp_path):
    from certkd.cli import main

    _, method, code = CLI_FAMILIES[case]
    out = tmp_path / "s.json"
    result = CliRunner().invoke(main, ["certify", str(family_checkpoints[case]), "-n", "4", "--method", method,
                                       "--eps", "0.01", "--out", str(out), "--no-progress"])
    assert result.exit_code == code, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_many_classes_carry_rounding_forward(monkeypatch):
    """With more rows than ``GRADIENT_ROWS`` the allowance is carried forward (cost independent of the classes):
    it covers the per-row gradient allowance, and the gated bounds stay below the clean margins."""
    from bounds import evidence
    from bounds.certify import margin_spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 64), nn.ReLU(),
                          nn.Linear(64, 100)).eval()
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([3, 50, 99])
    engine = BoundEngine(model, (1, 8, 8))
    spec = margin_spec(y, 100)
    forward = evidence.rounding_allowance(engine.bounded, x, spec, engine.version)
    monkeypatch.setattr(evidence, "GRADIENT_ROWS", 1000)
    per_row = evidence.rounding_allowance(engine.bounded, x, spec, engine.version)
    assert bool((forward >= per_row).all())
    monkeypatch.undo()
    for method in ("ibp", "crown"):
        lower = engine.margin_bounds(x, y, 0.0, "inf", method).lower
        with torch.no_grad():
            logits = model(x)
        own = (logits.gather(1, y.view(-1, 1)) - logits)[torch.arange(100).view(1, -1) != y.view(-1, 1)].view(3, 99)
        assert bool((lower <= own).all())
