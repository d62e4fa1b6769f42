"""ViTs by bound propagation under auto_LiRPA 0.7.x: an exact view, and CROWN below a strong PGD.

CI runs this file against both backends (.ci/run). Under 0.3 the bound tests skip with the
reason and ``test_vit_refused_under_0_3_names_0_7`` checks the refusal instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import per_margin_attack
from torch import nn

from bounds.backends import current_backend
from bounds.certify import bounded_module, margin_spec
from bounds.lirpa import import_auto_lirpa
from bounds.view import verification_view
from bounds.vit_rewrite import ExactGELU, ExplicitAttention, rewrite_transformer
from certkd.data import load_dataset
from certkd.models import create_model

VIT = {"patch": 4, "dim": 8, "depth": 1, "heads": 2}  # 4 patches + the class token on 8x8 digits
N_POINTS = 200
CASES = [("inf", 0.002), ("inf", 0.01), ("2", 0.01), ("2", 0.03)]
NO_VITS = "auto_LiRPA 0.3 cannot bound ViTs (no GELU/LayerNorm relaxation, unsound softmax); .ci/run tests them on 0.7.x"

pytestmark = pytest.mark.usefixtures("one_thread", "lirpa")  # tests/conftest.py: every test bounds


def needs_vit_backend() -> None:
    if not current_backend().bounds_vits:
        pytest.skip(NO_VITS)


@pytest.fixture(scope="module")
def vit(digits):
    """The registry ViT (small), trained 200 Adam steps on digits (about 85 % test accuracy)."""
    train, test = digits
    torch.manual_seed(0)
    model = create_model("vit", 10, test.info.input_shape, test.info.mean, test.info.std, **VIT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(train.x), (128,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def points(vit, digits):
    x = digits[1].x[:N_POINTS]
    with torch.no_grad():
        return x, vit(x).argmax(1)


def rewritten(model: nn.Module, shape) -> nn.Module:
    return verification_view(model, shape, transformers=True)


# --------------------------------------------------------------------------- the rewrite (pure torch)

def test_rewrite_is_exact_and_replaces_gelu_and_attention(vit, points):
    x, _ = points
    view = rewritten(vit, (1, 8, 8))
    kinds = {type(m) for m in view.modules()}
    assert ExactGELU in kinds and ExplicitAttention in kinds
    assert not kinds & {nn.GELU, nn.MultiheadAttention}
    with torch.no_grad():
        assert float((view(x) - vit(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    ours = ExplicitAttention(mha)
    q, k = torch.randn(4, 5, 12), torch.randn(4, 7, 12)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    with torch.no_grad():
        out, weights = mha(q, k, k, need_weights=True)
        got, got_weights = ours(q, k, k, need_weights=True)
    assert float((out - got).abs().max()) <= 1e-5 and float((weights - got_weights).abs().max()) <= 1e-6


def test_exact_gelu_value_and_gradient():
    x = torch.linspace(-6, 6, 241, requires_grad=True)
    ours, ref = ExactGELU()(x), nn.GELU()(x)
    (g1,), (g2,) = torch.autograd.grad(ours.sum(), x), torch.autograd.grad(ref.sum(), x)
    assert float((ours - ref).abs().max()) == 0.0 and float((g1 - g2).abs().max()) <= 1e-6


def test_tanh_gelu_and_masks_are_not_rewritten_silently():
    block = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh"))
    rewrite_transformer(block)
    assert isinstance(block[1], nn.GELU)
    ours = ExplicitAttention(nn.MultiheadAttention(4, 2, batch_first=True))
    from bounds.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="masked attention"):
        ours(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), attn_mask=torch.zeros(3, 3))


# --------------------------------------------------------------------------- bound propagation (0.7.x)

def test_vit_graph_equals_model(vit, points):
    """auto_LiRPA's own forward of the rewritten view computes the model (1e-5) on 200 points."""
    needs_vit_backend()
    x, _ = points
    bounded = bounded_module(rewritten(vit, (1, 8, 8)), torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        assert float((bounded(x) - vit(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("norm,eps", CASES)
def test_vit_crown_below_pgd(vit, points, norm, eps):
    """CROWN's margin lower bounds never exceed a strong PGD's margins (200 points x 9 margins), and certify."""
    needs_vit_backend()
    x, y = points
    lirpa = import_auto_lirpa()
    bounded = bounded_module(rewritten(vit, (1, 8, 8)), torch.zeros(1, 1, 8, 8))
    p = math.inf if norm == "inf" else 2.0
    box = {"x_L": (x - eps).clamp(0, 1), "x_U": (x + eps).clamp(0, 1)} if math.isinf(p) else {}
    ptb = lirpa.PerturbationLpNorm(norm=p, eps=eps, **box)
    with torch.no_grad():
        lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method="CROWN",
                                          bound_upper=False)
    attack = per_margin_attack(vit, x, y, eps, norm)
    slack = 1e-5 * attack.abs().clamp_min(1.0)
    assert int((lower > attack + slack).sum()) == 0
    certified = float((lower.amin(dim=1) > 0).float().mean())
    assert certified >= 0.5  # the bounds are not vacuous: the comparison has teeth



# --------------------------------------------------------------------------- certkd's path (view + allow-list)

def test_vit_refused_under_0_3_names_0_7(vit, points):
    if current_backend().bounds_vits:
        pytest.skip("the installed auto_LiRPA bounds ViTs (the refusal is 0.3's)")
    from bounds.certify import BoundEngine
    from bounds.errors import UnsupportedModelError

    x, y = points
    with pytest.raises(UnsupportedModelError, match=r"0\.7\.x") as info:
        BoundEngine(vit, (1, 8, 8)).margin_bounds(x[:2], y[:2], 0.01, "inf", "crown")
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0 and "from git (README" in message


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_vit_certified_radius_survives_pgd(vit, points, norm):
    """certkd's CROWN radii of a ViT: positive, below the attack's upper end, and unbroken by PGD-50 x 3 there."""
    needs_vit_backend()
    from bounds.attack import pgd
    from bounds.certify import BoundEngine

    x, y = points[0][:12], points[1][:12]
    engine = BoundEngine(vit, (1, 8, 8))
    res = engine.certified_radius(x, y, norm, "crown", eps_max=0.2 if norm == "inf" else 1.0, tol=1e-3,
                                  generator=torch.Generator().manual_seed(0))
    assert bool((res.radius > 0).all()) and bool((res.radius <= res.upper).all())
    attack = pgd(vit, x, y, res.radius, norm, steps=50, restarts=3, generator=torch.Generator().manual_seed(3))
    assert bool((attack.margin > 0).all())
    assert bool(engine.margin_bounds(x, y, res.radius, norm, "crown").certified.all())


def test_vit_refuses_the_methods_the_table_leaves_out(vit, points):
    needs_vit_backend()
    from bounds.certify import BoundEngine
    from bounds.errors import UnsupportedModelError

    x, y = points[0][:2], points[1][:2]
    engine = BoundEngine(vit, (1, 8, 8))
    assert engine.margin_bounds(x, y, 0.002, "inf", "ibp").lower.shape == (2, 9)
    for method in ("crown-ibp", "alpha-crown"):
        with pytest.raises(UnsupportedModelError, match=method):
            engine.margin_bounds(x, y, 0.002, "inf", method)


def test_cli_certify_vit_crown_radius(vit, tmp_path, capsys):
    """``certkd certify vit.pt --method crown --radius`` under 0.7.x: certified radii, each sound."""
    needs_vit_backend()
    from certkd.checkpoint import make_checkpoint, save_checkpoint
    from certkd.cli import main
    from certkd.data import dataset_info

    path = tmp_path / "vit.pt"
    save_checkpoint(make_checkpoint(vit, "vit", dict(VIT), dataset_info("digits")), path)
    out, per_example = tmp_path / "summary.json", tmp_path / "records.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(path), "--method", "crown", "--radius", "-n", "8", "--eps", "0.005",
              "--out", str(out), "--per-example", str(per_example), "--pgd-steps", "10"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    import json

    from bounds.attack import pgd

    summary = json.loads(out.read_text())
    assert summary["soundness"]["certified_checked_by_pgd"] > 0  # the gate ran and passed
    crown = next(r for r in summary["results"] if r["method"] == "crown")
    assert crown["kind"] == "certified" and crown["accuracy"] >= 0.5
    records = [json.loads(line) for line in per_example.read_text().splitlines()[1:]]
    radii = {int(r["index"]): float(r["radius"]) for r in records if r["method"] == "crown" and r.get("radius")}
    assert len(radii) >= 4
    test = load_dataset("digits", "test")
    index = torch.tensor(sorted(radii))
    radius = torch.tensor([radii[i] for i in sorted(radii)])
    attack = pgd(vit, test.x[index], test.y[index], radius, "inf", steps=50, restarts=3,
                 generator=torch.Generator().manual_seed(5))
    assert bool((attack.margin > 0).all())
