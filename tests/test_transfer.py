"""The transfer bound and transfer certificates (bounds.transfer, theory.md §3)."""

import copy

import pytest
import torch
from torch import nn

from bounds.attack import pgd
from bounds.linearity import CE, MARGIN, LinearityBounder, gamma_estimate
from bounds.transfer import gradient_gap, transfer_bound, transfer_certificate
from certkd.models import create_model

SHAPE = (1, 4, 4)
K = 4
TOL = 2e-5  # float32 rounding of the PGD-side numbers


def teacher_net(seed: int, family: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    if family == "cnn4":
        return create_model("cnn4", num_classes=K, input_shape=(1, 8, 8), mean=[0.4], std=[0.3], width=3,
                            linear=12).eval()
    return create_model("mlp", num_classes=K, input_shape=SHAPE, mean=[0.5], std=[0.25], hidden=[16, 16]).eval()


def noisy_copy(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """The model with Gaussian noise of ``scale`` times each weight tensor's std added."""
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith("1."):  # the body, not the Normalize buffers
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return student.eval()


def confident_points(model: nn.Module, n: int, seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """The n random inputs (of 4n drawn) with the largest clean margins, labelled by the model."""
    x = torch.rand(4 * n, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n]
    return x[keep], logits[keep].argmax(1)


CASES = [  # (family, teacher seed, student noise scale, norm, eps): random ReLU nets and inputs
    ("mlp", 0, 0.02, "inf", 0.01),
    ("mlp", 1, 0.05, "inf", 0.03),
    ("mlp", 2, 0.02, "2", 0.05),
    ("mlp", 3, 0.3, "2", 0.2),
    ("cnn4", 4, 0.05, "inf", 0.02),
]


@pytest.mark.parametrize("family,seed,noise,norm,eps", CASES)
@pytest.mark.usefixtures("lirpa")
def test_certified_transfer_bound_and_certificate_are_never_contradicted(family, seed, noise, norm, eps):
    teacher = teacher_net(seed, family)
    student = noisy_copy(teacher, noise, seed + 100)
    x, y = confident_points(teacher, 8, seed, (1, 8, 8) if family == "cnn4" else SHAPE)
    gen = torch.Generator().manual_seed(seed)
    tb = transfer_bound(student, teacher, x, y, eps, norm, certified=True, steps=20, restarts=1, generator=gen)
    # the certified bound is above the student's robust loss, hence above any PGD-measured one
    assert torch.all(tb.bound_certified >= tb.robust_student - TOL)
    assert tb.check(certified=True).holds.all()
    assert torch.all(tb.robust_teacher_upper >= tb.robust_teacher - TOL)
    assert torch.all(tb.gamma_student_certified >= tb.gamma_student - TOL)
    assert torch.all(tb.gamma_teacher_certified >= tb.gamma_teacher - TOL)

    cert = transfer_certificate(student, teacher, x, y, eps, norm)
    attack = pgd(student, x, y, eps, norm, steps=30, restarts=2, generator=gen)
    # a certified lower bound of the student's margins never exceeds what PGD reaches
    assert torch.all(cert.student_lower.amin(1) <= attack.margin + TOL)
    assert torch.all(attack.margin[cert.through_transfer] > 0)
    assert torch.all(cert.student_lower <= cert.teacher_lower)
    counts = cert.counts()
    assert sum(counts.values()) == len(y)
    assert counts["both"] + counts["transfer_only"] == int(cert.through_transfer.sum())


@pytest.mark.usefixtures("lirpa")
def test_some_points_are_certified_through_transfer():
    # near-identical student, small ball: the transfer route must work (not a vacuous soundness test)
    teacher = teacher_net(0)
    student = noisy_copy(teacher, 0.01, 7)
    x, y = confident_points(teacher, 8, 0)
    cert = transfer_certificate(student, teacher, x, y, 0.005, "inf")
    assert int(cert.through_transfer.sum()) >= 4


@pytest.mark.usefixtures("lirpa")
def test_student_identical_to_teacher_has_zero_gaps():
    teacher = teacher_net(4)
    student = copy.deepcopy(teacher)
    x, y = confident_points(teacher, 6, 4)
    tb = transfer_bound(student, teacher, x, y, 0.02, "inf", certified=True, steps=10, restarts=1,
                        generator=torch.Generator().manual_seed(0))
    assert torch.all(tb.output_gap == 0) and torch.all(tb.gradient_gap == 0)
    assert torch.equal(tb.gamma_student_certified, tb.gamma_teacher_certified)
    assert torch.allclose(tb.bound_certified, tb.robust_teacher_upper + 2 * tb.gamma_teacher_certified)
    cert = transfer_certificate(student, teacher, x, y, 0.02, "inf")
    assert torch.all(cert.margin_gap == 0) and torch.all(cert.gradient_term == 0)
    assert torch.allclose(cert.student_lower, cert.teacher_lower - 2 * cert.gamma_teacher)


def test_gradient_gap_uses_the_dual_norm():
    teacher = teacher_net(5)
    student = noisy_copy(teacher, 0.2, 5)
    x, y = confident_points(teacher, 4, 5)
    from bounds.linearity import scalar_gradients

    gs, gt = scalar_gradients(student, x, y, CE), scalar_gradients(teacher, x, y, CE)
    diff = (gs.grad - gt.grad).flatten(2)
    assert torch.allclose(gradient_gap(gs, gt, "inf")[:, 0], diff.abs().sum(-1)[:, 0])  # q = 1
    assert torch.allclose(gradient_gap(gs, gt, "2")[:, 0], diff.norm(dim=-1)[:, 0])  # q = 2


@pytest.mark.usefixtures("lirpa")
def test_margin_gammas_of_the_certificate_dominate_their_estimates():
    teacher = teacher_net(6)
    student = noisy_copy(teacher, 0.1, 6)
    x, y = confident_points(teacher, 4, 6)
    cert = transfer_certificate(student, teacher, x, y, 0.03, "inf",
                                bounders=(LinearityBounder(student, SHAPE), LinearityBounder(teacher, SHAPE)))
    est = gamma_estimate(student, x, y, 0.03, "inf", MARGIN, steps=15, restarts=1,
                         generator=torch.Generator().manual_seed(0))
    assert torch.all(est.gamma <= cert.gamma_student + TOL)
