"""KDIGA's points and gradients: the PGD point, the finite-difference IGA gradient, catastrophic-overfitting
detection and the collapse check that stops only dead runs (theory.md §4, §8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certkd.checkpoint import load_checkpoint
from certkd.data import load_dataset
from certkd.errors import CertkdError
from certkd.io import read_jsonl
from certkd.models import create_model
from certkd.train import ObjectiveParams, TrainConfig, Trainer
from certkd.train.losses import LOSSES, LossBatch, register_loss
from certkd.train.losses.common import eval_mode, one_step_point
from certkd.train.losses.distill import iga_fd_surrogate, iga_point, iga_term, input_gradient
from certkd.train.recipes import apply_recipe, recipe_summary
from certkd.train.trainer import catastrophic_overfitting, no_progress

FD_TOLERANCE = 1e-4
"""Relative L2 error allowed between the finite-difference and the double-backprop parameter gradient
(float64, h = 1e-6: no ReLU changes its state within the step, so the difference is only O(h))."""


def _trained_mlp(seed: int = 0) -> torch.nn.Module:
    """A small digits MLP after 60 natural SGD steps (a student with a real loss surface)."""
    torch.manual_seed(seed)
    data = load_dataset("digits", "train")
    model = create_model("mlp", 10, (1, 8, 8), hidden=[32])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(60):
        x, y = data.batch(torch.arange(step * 20, step * 20 + 64) % len(data))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _param_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_finite_difference_iga_gradient_agrees_with_double_backprop():
    for arch, kwargs, shape in [("mlp", {"hidden": [32]}, (1, 8, 8)), ("cnn4", {"width": 4}, (1, 16, 16))]:
        torch.manual_seed(1)
        student = create_model(arch, 10, shape, **kwargs).double()
        teacher = create_model(arch, 10, shape, **kwargs).double().eval().requires_grad_(False)
        x, y = torch.rand(16, *shape, dtype=torch.float64), torch.randint(0, 10, (16,))
        keep = torch.arange(16) % 3 != 0
        _, g_t = input_gradient(teacher, x, y, create_graph=False)
        for norm in ("2", "1"):
            _, g_s = input_gradient(student, x, y, create_graph=True)
            exact_term = iga_term(g_s, g_t, norm, keep, "batch-mean")
            exact = _param_grad(student, exact_term)
            logits, g_s = input_gradient(student, x, y, create_graph=False, retain_graph=True)
            fd_term = iga_fd_surrogate(student, x, y, logits, g_s, g_t, norm, keep, "batch-mean", h=1e-6)
            fd = _param_grad(student, fd_term)
            assert torch.allclose(fd_term.detach(), exact_term.detach())  # the value is the IGA term itself
            assert (fd - exact).norm() <= FD_TOLERANCE * exact.norm(), (arch, norm)


def test_pgd_point_is_at_least_as_adversarial_as_the_one_step_point_and_stays_in_ball_and_box():
    student = _trained_mlp()
    x, y = load_dataset("digits", "test").batch(torch.arange(200))
    eps = 0.1
    losses = {}
    for point in ("adversarial", "pgd", "nfgsm"):
        params = ObjectiveParams(eps=eps, iga_on=point, attack_steps=10).resolved()
        batch = LossBatch(x=x, y=y, student=student, student_bare=student,
                          generator=torch.Generator().manual_seed(0))
        x_adv = iga_point(batch, params)
        assert x_adv.min() >= 0 and x_adv.max() <= 1  # the box
        reach = (x_adv - x).abs().max()
        assert reach <= (3 if point == "nfgsm" else 1) * eps + 1e-6  # N-FGSM leaves the ball by design
        with torch.no_grad():
            losses[point] = float(F.cross_entropy(student(x_adv), y))
    assert losses["pgd"] >= losses["adversarial"]
    with torch.no_grad():
        assert losses["adversarial"] > float(F.cross_entropy(student(x), y))


FGSM = "fgsm-plain-test"


@pytest.fixture
def plain_fgsm():
    """A test-only loss, registered for one test and removed after it (other tests list the registry)."""
    @register_loss(FGSM, needs_teacher=False, uses_attack=True, select="pgd_acc", summary="FGSM, no random start")
    def _fgsm_plain(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
        """``CE(S(x'), y)``, ``x'`` one signed step of ``--iga-step`` from ``x`` itself (no random start)."""
        assert params.eps is not None and params.iga_step is not None
        with eval_mode(batch.student_bare):
            x_adv = one_step_point(batch.student_bare, batch.x, batch.y, params.eps, params.norm, params.iga_step,
                                   batch.generator, noise=0.0)
        ce = F.cross_entropy(batch.student(x_adv), batch.y)
        return {"ce_adv": ce.detach(), "loss": ce}

    yield FGSM
    LOSSES._entries.pop(FGSM, None)


class ScriptedValidation(Trainer):
    """Real training epochs whose validation clean and PGD accuracies are replaced by ``script`` (one pair per
    epoch): the trainer's reaction to a validation history, independent of the float kernels of the CPU."""

    script = [(0.80, 0.30), (0.85, 0.35), (0.90, 0.05), (0.95, 0.02), (0.96, 0.01), (0.97, 0.01)]

    def validate(self) -> dict[str, float | None]:
        measured = super().validate()
        clean, pgd = self.script[len(self.history)]
        return {**measured, "clean_acc": clean, "pgd_acc": pgd}


def test_catastrophic_overfitting_is_detected_and_the_best_pgd_epoch_kept(tmp_path, digits_trio, capsys, plain_fgsm):
    """Training by FGSM without random start (a robust start, the PGD-AT teacher's weights) whose validation shows
    the signature (PGD accuracy 0.35 -> 0.05 while clean accuracy rises, as on real MNIST at eps 0.3 with the
    one-step point, theory.md §8) stops at that epoch; ckpt.pt is the best epoch by PGD accuracy and one line
    names the remedy. The validation numbers are scripted: FGSM on 8x8 digits overfits or not depending on the
    CPU's float kernels (the same run collapsed on one machine and not on another). PGD-AT from the same start
    at 0.2 (healthy, measured validation) runs to the end."""
    common = {"arch": "cnn4", "init": digits_trio.teacher_path, "epochs": 6, "lr": 0.05, "val_size": 200,
              "val_eps": 0.2, "val_attack_steps": 5, "progress": False}
    out = tmp_path / "co.pt"
    ScriptedValidation(TrainConfig(method=FGSM, out=out, params=ObjectiveParams(eps=0.3, iga_step=0.3),
                                   **common)).run()
    rows = read_jsonl(tmp_path / "co.metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "catastrophic_overfitting" in rows[-1]
    assert not any("catastrophic_overfitting" in r for r in rows[:-1])
    kept = load_checkpoint(out).metrics
    assert kept["epoch"] == 2 and kept["pgd_acc"] == 0.35
    lines = [line for line in capsys.readouterr().err.splitlines() if "catastrophic overfitting" in line]
    assert len(lines) == 1 and "best epoch by PGD accuracy" in lines[0] and "attack-steps" in lines[0]
    common["epochs"] = 8
    healthy = tmp_path / "ok.pt"
    Trainer(TrainConfig(method="pgd-at", out=healthy, params=ObjectiveParams(eps=0.2, attack_steps=3),
                        **common)).run()
    rows = read_jsonl(tmp_path / "ok.metrics.jsonl")
    assert len(rows) == 8 and not any("catastrophic_overfitting" in r for r in rows)


def test_overfitting_and_progress_rules_on_constructed_histories():
    rise = [{"epoch": e, "clean_acc": 0.5 + 0.05 * e, "pgd_acc": p, "loss": 2.0 - 0.1 * e}
            for e, p in enumerate([0.05, 0.09, 0.09, 0.01], start=1)]
    assert catastrophic_overfitting(rise) is not None  # as on real MNIST at eps 0.3: PGD 9 % -> 1 % as clean rises
    assert catastrophic_overfitting(rise[:3]) is None
    noisy = rise[:3] + [{**rise[3], "pgd_acc": 0.06}]  # a dip of a third: noise, not a collapse
    assert catastrophic_overfitting(noisy) is None
    worse = rise[:3] + [{**rise[3], "clean_acc": 0.3}]  # both fall: a collapse, not overfitting
    assert catastrophic_overfitting(worse) is None
    vit = [{"loss": 2.517, "clean_acc": 0.075}, {"loss": 2.464, "clean_acc": 0.075},
           {"loss": 2.465, "clean_acc": 0.097}, {"loss": 2.322, "clean_acc": 0.157}]
    assert not no_progress(vit)  # the registry ViT's slow start goes on
    dead = [{"loss": 2.30, "clean_acc": 0.11}, {"loss": 2.31, "clean_acc": 0.10}, {"loss": 2.30, "clean_acc": 0.11},
            {"loss": 2.29, "clean_acc": 0.115}]
    assert no_progress(dead)


def test_recipe_follows_the_architecture_and_info_says_why():
    base = {"recipe": "shao2021", "dataset": "mnist", "epochs": 10}
    free = apply_recipe({**base, "arch": "cnn4"}, {"arch", "dataset", "epochs"})
    normed = apply_recipe({**base, "arch": "cnn7"}, {"arch", "dataset", "epochs"})
    assert (free["lr"], free["eps_warmup"]) == (0.05, 5.0)
    assert (normed["lr"], normed["eps_warmup"]) == (0.2, 0.0)  # a BatchNorm student trains as the authors'
    mine = apply_recipe({**base, "arch": "cnn4", "lr": 0.01}, {"arch", "dataset", "epochs", "lr"})
    assert mine["lr"] == 0.01 and mine["eps_warmup"] == 5.0  # an explicit flag wins
    line = recipe_summary(mine)
    assert "lr=0.01 (authors 0.2: given explicitly)" in line
    assert "eps_warmup=5 (authors 0.0: the one-step point" in line
    assert "differs from the authors'" not in recipe_summary(normed)


def test_iga_on_a_fraction_of_the_batch_estimates_the_term_and_keeps_kd_whole():
    """With --iga-fraction 1/4 the KD and CE terms are those of the whole batch, the IGA term is that of the
    batch's first quarter (batch-mean scale still 1/B), and over the four quarters its mean is the whole term."""
    from certkd.train.losses.distill import kdiga_loss

    torch.manual_seed(0)
    student, teacher = _trained_mlp(0), _trained_mlp(1).eval().requires_grad_(False)
    x, y = load_dataset("digits", "test").batch(torch.arange(64))

    def loss(x: torch.Tensor, y: torch.Tensor, fraction: float, scale: str = "sample") -> dict[str, torch.Tensor]:
        params = ObjectiveParams(eps=0.1, iga_on="clean", iga_fraction=fraction, iga_scale=scale).resolved()
        return kdiga_loss(LossBatch(x=x, y=y, student=student, student_bare=student, teacher=teacher), params)

    for scale in ("sample", "batch-mean"):
        whole = loss(x, y, 1.0, scale)
        quarters = [loss(x.roll(-16 * k, 0), y.roll(-16 * k, 0), 0.25, scale) for k in range(4)]
        for part in quarters:
            assert torch.allclose(part["kl"], whole["kl"], atol=1e-6) and torch.allclose(part["ce"], whole["ce"])
        _, g_t = input_gradient(teacher, x[:16], y[:16], create_graph=False)
        _, g_s = input_gradient(student, x[:16], y[:16], create_graph=False)
        assert torch.allclose(quarters[0]["iga"], iga_term(g_s, g_t, "2", None, scale, 64))
        assert not torch.allclose(quarters[0]["iga"], whole["iga"])  # one quarter is an estimate ...
        assert torch.allclose(torch.stack([q["iga"] for q in quarters]).mean(), whole["iga"])  # ... without bias
    with pytest.raises(CertkdError, match="--iga-fraction"):
        ObjectiveParams(iga_fraction=0.0).resolved()
