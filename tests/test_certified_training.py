"""Certified training and certified distillation (theory.md §7): schedules, upper bounds, training, resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import InterruptedTrainer, affine_layers, exact_min_margin, train_natural

from bounds.attack import pgd
from bounds.certify import BoundEngine
from bounds.train_bounds import TrainingBounds
from certkd.checkpoint import load_checkpoint
from certkd.data import load_dataset
from certkd.errors import CertkdError
from certkd.io import read_jsonl
from certkd.models import create_model
from certkd.train import ObjectiveParams, TrainConfig, Trainer, get_loss, train
from certkd.train.init import ibp_initialize
from certkd.train.losses import LossBatch
from certkd.train.losses.certified import bound_logits
from certkd.train.schedules import eps_factor, interpolate, progress, smoothed_ramp

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CERTIFIED = ("ibp", "crown-ibp")


# --------------------------------------------------------------------------- schedules

def test_ramp_progress_endpoints():
    """0 through the --eps-start epochs, 1 from the last step of the ramp on, linear between."""
    spe = 10
    assert progress(0, spe, start=1.0, length=2.0) == 0.0
    assert progress(9, spe, start=1.0, length=2.0) == 0.0  # the whole first epoch at eps 0
    assert progress(10, spe, start=1.0, length=2.0) == pytest.approx(1 / 20)
    assert progress(29, spe, start=1.0, length=2.0) == 1.0
    assert progress(500, spe, start=1.0, length=2.0) == 1.0
    assert progress(0, spe, start=0.0, length=0.0) == 1.0  # no ramp: the full radius from the first step
    assert progress(9, spe, start=1.0, length=0.0) == 0.0 and progress(10, spe, start=1.0, length=0.0) == 1.0


def test_smoothed_ramp_is_polynomial_then_linear_with_matching_slope():
    """f(0) = 0, f(1) = 1, non-decreasing; t^4 growth below 0.25, linear above, C^1 at 0.25 (Shi et al. 2021)."""
    ts = np.linspace(0, 1, 401)
    values = np.array([smoothed_ramp(float(t)) for t in ts])
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert np.all(np.diff(values) >= 0)
    assert smoothed_ramp(0.1) / smoothed_ramp(0.05) == pytest.approx(16.0)  # t^4 before the switch
    h = 1e-6
    left = (smoothed_ramp(0.25) - smoothed_ramp(0.25 - h)) / h
    right = (smoothed_ramp(0.25 + h) - smoothed_ramp(0.25)) / h
    assert left == pytest.approx(right, rel=1e-3)
    slope = (smoothed_ramp(0.9) - smoothed_ramp(0.5)) / 0.4
    assert slope == pytest.approx(right, rel=1e-6)  # linear after the switch
    assert smoothed_ramp(0.5) < 0.5  # slower than the linear ramp early on
    assert eps_factor("linear", 0.3) == 0.3 and eps_factor("smoothed", 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        eps_factor("cosine", 0.5)


def test_kappa_and_beta_move_linearly_between_their_endpoints():
    assert interpolate(1.0, 0.5, 0.0) == 1.0 and interpolate(1.0, 0.5, 1.0) == 0.5
    assert interpolate(1.0, 0.0, 0.25) == 0.75 and interpolate(0.0, 1.0, 2.0) == 1.0


# --------------------------------------------------------------------------- upper bounds of the worst case

WORST_EPS = 0.03


@pytest.fixture(scope="module")
def tiny_mlp():
    """A naturally trained 2-layer ReLU MLP on digits, 8 test points and their exact margin minima."""
    train_set, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    info = test.info
    torch.manual_seed(0)
    model = train_natural(create_model("mlp", 10, info.input_shape, info.mean, info.std, hidden=(8,)),
                          train_set.x, train_set.y, epochs=20)
    x, y = test.x[:8], test.y[:8]
    return model, x, y, exact_margin_minima(model, x, y, WORST_EPS)


def exact_margin_minima(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``min_{x' in ball} z_y - z_j`` for every ``j != y`` (B, K-1): the MILP with the last layer cut to rows y, j."""
    layers = affine_layers(model)
    w, b = layers[-1]
    out = []
    for i in range(len(y)):
        yi, row = int(y[i]), []
        for j in range(w.shape[0]):
            if j != yi:
                pair = [*layers[:-1], (w[[yi, j]], b[[yi, j]])]
                row.append(exact_min_margin(pair, x[i].flatten().double().numpy(), 0, eps))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", CERTIFIED)
def test_certified_ce_upper_bounds_the_exact_worst_case(tiny_mlp, method):
    """CE(zb) >= log(1 + sum_j exp(-min m_j)) >= max over the ball of CE >= CE at PGD points (theory.md §7)."""
    model, x, y, exact = tiny_mlp
    eps = WORST_EPS
    bounds = TrainingBounds(model, tuple(x.shape[1:])).margins(x, y, eps, crown_ibp=method == "crown-ibp")
    lower = bounds.ibp if method == "ibp" else bounds.crown_ibp
    assert lower is not None
    assert bool((lower.double() <= exact + 1e-4).all())
    ce_bound = F.cross_entropy(bound_logits(lower, y), y, reduction="none").double()
    worst = torch.log1p(torch.exp(-exact).sum(1))  # >= the CE at every point of the ball
    attack = pgd(model, x, y, eps, "inf", steps=40, restarts=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ce_attack = F.cross_entropy(model(attack.x_adv), y, reduction="none").double()
    assert bool((ce_bound >= worst - 1e-4).all())
    assert bool((worst >= ce_attack - 1e-4).all())
    assert float((ce_bound - ce_attack).min()) >= -1e-4


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "cert-kd", "cert-advkd"])
def test_registered_certified_losses_upper_bound_the_pgd_ce(tiny_mlp, method):
    """At the end of the ramp with kappa 0 (and alpha 0 for the distillers) the loss is the mean bound CE:
    at least the mean CE at PGD points; mtl-ibp lies between its two terms."""
    model, x, y, _ = tiny_mlp
    eps = WORST_EPS
    params = ObjectiveParams(eps=eps, kappa_end=0.0, crown_beta_end=0.5, alpha=0.0, attack_steps=5).resolved()
    batch = LossBatch(x=x, y=y, student=model, student_bare=model, teacher=model,
                      generator=torch.Generator().manual_seed(0))
    out = get_loss(method).fn(batch, params)
    attack = pgd(model, x, y, eps, "inf", steps=40, restarts=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ce_attack = F.cross_entropy(model(attack.x_adv), y)
    assert float(out["loss"].detach()) >= float(ce_attack) - 1e-5
    assert float(out["loss"].detach()) == pytest.approx(float(out["ce_bound"]), rel=1e-6)
    mtl = get_loss("mtl-ibp").fn(batch, replace(params, mtl_alpha=0.3))
    lo, hi = sorted([float(mtl["ce_adv"]), float(mtl["ce_bound"])])
    assert lo - 1e-6 <= float(mtl["loss"].detach()) <= hi + 1e-6
    assert float(mtl["ce_bound"]) >= float(ce_attack) - 1e-5


def test_bound_logits_ce_is_the_softplus_of_the_negated_bounds():
    lower = torch.tensor([[0.5, -1.0, 2.0]])
    y = torch.tensor([2])
    zb = bound_logits(lower, y)
    assert zb.tolist() == [[-0.5, 1.0, 0.0, -2.0]]
    expected = math.log(1 + math.exp(-0.5) + math.exp(1.0) + math.exp(-2.0))
    assert float(F.cross_entropy(zb, y)) == pytest.approx(expected, rel=1e-6)


def test_training_bounds_follow_batchnorm_mode():
    """In train mode the bounds use the clean batch's statistics (eps 0: exactly the clean margins), in eval
    mode the model's current running statistics."""
    torch.manual_seed(0)
    model = create_model("cnn7", 10, (1, 8, 8), width=4, linear=16)
    engine = TrainingBounds(model, (1, 8, 8))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            z = model(x)
        margins = (z.gather(1, y[:, None]) - z)[torch.arange(10)[None] != y[:, None]].view(16, 9)
        out = engine.margins(x, y, 0.0)
        assert torch.allclose(out.ibp, margins, atol=1e-4), mode


def test_ibp_initialization_scales_every_layer():
    model = create_model("cnn4", 10, (1, 28, 28))
    assert ibp_initialize(model) == 4
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            expected = math.sqrt(2 * math.pi) / module.weight[0].numel()
            assert float(module.weight.std()) == pytest.approx(expected, rel=0.2)


# --------------------------------------------------------------------------- training

DIGITS = {"arch": "mlp", "arch_kwargs": {"hidden": [64]}, "batch_size": 64, "lr": 0.005, "optimizer": "adam",
          "weight_decay": 0.0, "val_size": 100, "progress": False, "dataset": "digits"}
EPS = 0.05


def ibp_certified_accuracy(path, method: str = "ibp") -> float:
    ckpt = load_checkpoint(path)
    model = ckpt.build_model("cpu")
    test = load_dataset("digits", "test")
    engine = BoundEngine(model, test.info.input_shape)
    return float(engine.margin_bounds(test.x, test.y, EPS, "inf", method).certified.float().mean())


@pytest.fixture(scope="module")
def ibp_and_pgd(tmp_path_factory):
    out = tmp_path_factory.mktemp("certified")
    common = {**DIGITS, "epochs": 8}
    ibp = train(TrainConfig.from_flat({**common, "method": "ibp", "out": out / "ibp.pt", "eps": EPS,
                                       "eps_warmup": 4, "eps_schedule": "smoothed", "kappa_end": 0.0}))
    adv = train(TrainConfig.from_flat({**common, "method": "pgd-at", "out": out / "pgd.pt", "eps": EPS,
                                       "attack_steps": 5}))
    return ibp, adv


def test_ibp_training_certifies_far_more_than_pgd_training(ibp_and_pgd):
    """The bound loss is in the gradient: IBP-certified accuracy at the training eps well above PGD-AT's."""
    ibp, adv = ibp_and_pgd
    cert_ibp, cert_adv = ibp_certified_accuracy(ibp), ibp_certified_accuracy(adv)
    assert cert_ibp >= 0.5 and cert_ibp >= cert_adv + 0.3, (cert_ibp, cert_adv)
    assert ibp_certified_accuracy(ibp, "crown") >= cert_ibp - 0.05  # a stronger verifier sees it too


def test_certified_distillation_trains_from_a_certified_teacher(ibp_and_pgd, tmp_path):
    teacher, _ = ibp_and_pgd
    student = train(TrainConfig.from_flat({**DIGITS, "arch_kwargs": {"hidden": [32]}, "epochs": 8,
                                           "method": "cert-kd", "teacher": teacher, "out": tmp_path / "s.pt",
                                           "eps": EPS, "eps_warmup": 4, "kappa_end": 0.0, "alpha": 0.5}))
    assert ibp_certified_accuracy(student) >= 0.4


def test_resume_mid_ramp_equals_an_uninterrupted_run(tmp_path):
    """Stopped after epoch 2 of a smoothed ramp over epochs 2-4 (kappa and beta moving): same weights."""
    cfg = TrainConfig.from_flat({**DIGITS, "arch_kwargs": {"hidden": [16]}, "epochs": 4, "method": "crown-ibp",
                                 "out": tmp_path / "full.pt", "eps": EPS, "eps_start": 1, "eps_warmup": 2,
                                 "eps_schedule": "smoothed", "kappa_end": 0.0, "bound_reg": 0.5})
    full = load_checkpoint(train(cfg))
    split = replace(cfg, out=tmp_path / "split.pt")
    with pytest.raises(KeyboardInterrupt):
        InterruptedTrainer(split).run()
    resumed = load_checkpoint(train(replace(split, resume=True)))
    for name, tensor in full.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name
    rows = full.metrics
    assert rows["train_eps"] == pytest.approx(EPS) and rows["kappa"] == 0.0
    for key in ("eps_start", "eps_warmup", "eps_schedule", "kappa_start", "kappa_end", "crown_beta_start",
                "crown_beta_end", "bound_reg", "ibp_init"):
        assert key in full.config, key


def test_certified_methods_refuse_bad_settings(tmp_path):
    base = {**DIGITS, "method": "ibp", "out": tmp_path / "x.pt"}
    with pytest.raises(CertkdError, match="--eps"):
        Trainer(TrainConfig.from_flat(base))
    with pytest.raises(CertkdError, match="--kappa-end"):
        Trainer(TrainConfig.from_flat({**base, "eps": 0.1, "kappa_end": 1.5}))
    with pytest.raises(CertkdError, match="--eps-start"):
        Trainer(TrainConfig.from_flat({**base, "eps": 0.1, "epochs": 3, "eps_start": 2, "eps_warmup": 2}))
    with pytest.raises(CertkdError, match="--eps-schedule"):
        Trainer(TrainConfig.from_flat({**base, "eps": 0.1, "eps_schedule": "cosine"}))


def test_cli_trains_a_certified_method_and_explains_its_settings(tmp_path):
    from click.testing import CliRunner

    from certkd.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["train", "--help"]).output
    for option in ("--eps-start", "--eps-schedule", "--ibp-init", "--kappa-end", "--crown-beta-start", "--bound-reg",
                   "crown-ibp", "cert-kd"):
        assert option in help_text, option
    out = tmp_path / "m.pt"
    result = runner.invoke(main, ["train", "--method", "crown-ibp", "--arch", "mlp", "--arch-kwargs", '{"hidden": [8]}',
                                  "--epochs", "1", "--eps", "0.05", "--eps-warmup", "1", "--val-size", "40",
                                  "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = load_checkpoint(out).config
    assert config["method"] == "crown-ibp" and config["eps_warmup"] == 1 and config["crown_beta_start"] == 1.0
    bad = runner.invoke(main, ["train", "--method", "ibp", "--arch", "mlp", "--out", str(tmp_path / "b.pt")])
    assert bad.exit_code == 2 and "--eps" in bad.output


def test_certified_training_under_torchrun_follows_the_single_process_run(tmp_path):
    """Two torchrun processes of ``crown-ibp`` (each bounding half of every global batch, DistributedDataParallel
    averaging the gradients of the clean and the bound path) end near the single-process run of the same global
    batches: they differ only in how the last, uneven batch of an epoch is averaged."""
    args = ["--method", "crown-ibp", "--arch", "mlp", "--arch-kwargs", '{"hidden": [32]}', "--eps", "0.05",
            "--epochs", "2", "--eps-warmup", "1", "--val-size", "100", "--val-attack-steps", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "certkd", "train", *args, "--out", str(tmp_path / "ddp.pt")],
            "one": [sys.executable, "-m", "certkd", "train", *args, "--out", str(tmp_path / "one.pt")]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ddp, one = load_checkpoint(tmp_path / "ddp.pt"), load_checkpoint(tmp_path / "one.pt")
    assert ddp.provenance["world_size"] == 2 and one.provenance["world_size"] == 1
    for name, weight in one.state_dict.items():
        gap = float((ddp.state_dict[name] - weight).abs().max())
        assert gap <= 0.02 * max(float(weight.abs().max()), 1e-6), name
    rows = {name: read_jsonl(tmp_path / f"{name}.metrics.jsonl") for name in runs}
    assert rows["ddp"][-1]["ce_bound"] < rows["ddp"][0]["ce_bound"]  # the bound loss is trained
    assert rows["ddp"][-1]["ce_bound"] == pytest.approx(rows["one"][-1]["ce_bound"], rel=0.01)
