"""Each objective of theory.md §4 against its formula, written out by hand on tiny cases."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import bounds.attack
from bounds.norms import random_in_ball
from certkd.errors import CertkdError
from certkd.registry import Registry
from certkd.train.losses import LOSSES, LossBatch, ObjectiveParams, gaussian_noise, get_loss, list_methods
from certkd.train.losses.distill import iga_term, input_gradient

# Three classes, two features: logits = W x (+ b); x one-hot reads a column of W.
W_STUDENT = [[1.0, 0.5], [0.0, -1.0], [-1.0, 2.0]]
W_TEACHER = [[2.0, 0.0], [0.5, 0.5], [-0.5, 1.0]]


def linear(weight: list[list[float]], dtype=torch.float64) -> nn.Linear:
    layer = nn.Linear(2, 3, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=dtype))
    return layer


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def logits_of(weight: list[list[float]], x: list[float]) -> list[float]:
    return [sum(w * xi for w, xi in zip(row, x, strict=True)) for row in weight]


def ce(z: list[float], y: int) -> float:
    return -math.log(softmax(z)[y])


def kl(target: list[float], z: list[float], tau: float = 1.0) -> float:
    """KL(softmax(t/tau) || softmax(z/tau)), summed over the classes."""
    p, q = softmax([v / tau for v in target]), softmax([v / tau for v in z])
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


X = [[1.0, 0.0], [0.3, 0.6]]
Y = [0, 2]


def make_batch(student: nn.Module, teacher: nn.Module | None = None, x=X, y=Y) -> LossBatch:
    return LossBatch(x=torch.tensor(x, dtype=torch.float64), y=torch.tensor(y), student=student,
                     student_bare=student, teacher=teacher, generator=torch.Generator().manual_seed(0))


PGD_SIGNATURE = inspect.signature(bounds.attack.pgd_maximize)


class FixedAttack:
    """Stands in for ``bounds.attack.pgd_maximize``: records its arguments, returns ``x + delta``."""

    def __init__(self, delta: list[list[float]]):
        self.delta = torch.tensor(delta, dtype=torch.float64)
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        bound = PGD_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(dict(bound.arguments))
        x = bound.arguments["x"]
        x_adv = x + self.delta
        return x_adv, bound.arguments["objective"](x_adv)


DELTA = [[0.1, -0.1], [-0.1, 0.1]]
X_ADV = [[xi + di for xi, di in zip(xr, dr, strict=True)] for xr, dr in zip(X, DELTA, strict=True)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_natural_is_cross_entropy():
    out = get_loss("natural").fn(make_batch(linear(W_STUDENT)), ObjectiveParams().resolved())
    expected = mean([ce(logits_of(W_STUDENT, x), y) for x, y in zip(X, Y, strict=True)])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert float(out["ce"]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 4.0)])
def test_kd_formula_with_batchmean_kl(alpha, tau):
    params = ObjectiveParams(alpha=alpha, tau=tau).resolved()
    out = get_loss("kd").fn(make_batch(linear(W_STUDENT), linear(W_TEACHER)), params)
    kls = [kl(logits_of(W_TEACHER, x), logits_of(W_STUDENT, x), tau) for x in X]
    ces = [ce(logits_of(W_STUDENT, x), y) for x, y in zip(X, Y, strict=True)]
    assert float(out["kl"]) == pytest.approx(mean(kls), rel=1e-12)  # summed over classes, mean over the batch
    assert out["loss"].item() == pytest.approx(alpha * tau ** 2 * mean(kls) + (1 - alpha) * mean(ces), rel=1e-12)


def grad_ce_linear(weight: list[list[float]], x: list[float], y: int) -> list[float]:
    """grad_x CE(Wx, y) = W^T (softmax(Wx) - e_y), for one example."""
    p = softmax(logits_of(weight, x))
    r = [pk - (1.0 if k == y else 0.0) for k, pk in enumerate(p)]
    return [sum(weight[k][j] * r[k] for k in range(3)) for j in range(2)]


@pytest.mark.parametrize("norm", ["2", "1", "inf"])
def test_kdiga_formula_per_sample_gradients(norm):
    params = ObjectiveParams(alpha=0.5, tau=2.0, iga_weight=3.0, iga_norm=norm).resolved()
    out = get_loss("kdiga").fn(make_batch(linear(W_STUDENT), linear(W_TEACHER)), params)
    p = {"2": 2.0, "1": 1.0, "inf": math.inf}[norm]
    gaps = []
    for x, y in zip(X, Y, strict=True):
        diff = [s - t for s, t in zip(grad_ce_linear(W_STUDENT, x, y), grad_ce_linear(W_TEACHER, x, y), strict=True)]
        gaps.append(max(abs(d) for d in diff) if math.isinf(p) else sum(abs(d) ** p for d in diff) ** (1 / p))
    kls = [kl(logits_of(W_TEACHER, x), logits_of(W_STUDENT, x), 2.0) for x in X]
    ces = [ce(logits_of(W_STUDENT, x), y) for x, y in zip(X, Y, strict=True)]
    assert float(out["iga"]) == pytest.approx(mean(gaps), rel=1e-10)  # not shrunk by 1/B
    expected = 0.5 * 4.0 * mean(kls) + 0.5 * mean(ces) + 3.0 * mean(gaps)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)


def small_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_iga_is_zero_when_the_student_is_the_teacher():
    model = small_mlp(0)
    params = ObjectiveParams(iga_weight=5.0).resolved()
    assert float(get_loss("kdiga").fn(make_batch(model, model), params)["iga"]) == 0.0
    twin = copy.deepcopy(model).requires_grad_(False)
    out = get_loss("kdiga").fn(make_batch(model, twin), params)
    assert float(out["iga"]) == 0.0
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-15)


def test_iga_gradient_reaches_the_student_by_double_backprop():
    student, teacher = small_mlp(0), small_mlp(1).requires_grad_(False)
    batch = make_batch(student, teacher)

    def iga_value() -> torch.Tensor:
        _, g_s = input_gradient(student, batch.x, batch.y, create_graph=True)
        _, g_t = input_gradient(teacher, batch.x, batch.y, create_graph=False)
        return iga_term(g_s, g_t, "2")

    value = iga_value()
    weight = student[0].weight
    (grad,) = torch.autograd.grad(value, weight)
    assert float(grad.abs().sum()) > 1e-3
    # the analytic gradient (through the input gradient) matches central finite differences
    h = 1e-6
    for idx in [(0, 0), (3, 1), (7, 0)]:
        with torch.no_grad():
            weight[idx] += h
        up = iga_value().item()
        with torch.no_grad():
            weight[idx] -= 2 * h
        down = iga_value().item()
        with torch.no_grad():
            weight[idx] += h
        assert float(grad[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    # the teacher's gradient is a constant: nothing flows into the teacher
    out = get_loss("kdiga").fn(batch, ObjectiveParams().resolved())
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student[0].weight.grad is not None


def test_kdiga_noisy_aligns_at_uniform_noise_in_the_ball():
    student, teacher = linear(W_STUDENT), linear(W_TEACHER)
    params = ObjectiveParams(iga_on="noisy", eps=0.05, norm="inf", iga_weight=1.0).resolved()
    out = get_loss("kdiga").fn(make_batch(student, teacher), params)
    noise = random_in_ball((2, 2), math.inf, 0.05, torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    x_noisy = (torch.tensor(X, dtype=torch.float64) + noise).clamp(0, 1).tolist()
    gaps = [math.dist(grad_ce_linear(W_STUDENT, x, y), grad_ce_linear(W_TEACHER, x, y)) for x, y in zip(x_noisy, Y, strict=True)]
    assert float(out["iga"]) == pytest.approx(mean(gaps), rel=1e-10)
    clean = get_loss("kdiga").fn(make_batch(student, teacher), ObjectiveParams(iga_weight=1.0).resolved())
    assert float(out["iga"]) != pytest.approx(float(clean["iga"]), rel=1e-6)
    assert float(out["kl"]) == pytest.approx(float(clean["kl"]), rel=1e-12)  # KD stays on clean x


ATTACK = dict(eps=0.07, norm="2", attack_steps=3, attack_step_size=0.011)


def run_with_fixed_attack(monkeypatch, method: str, **params) -> tuple[dict, FixedAttack]:
    spy = FixedAttack(DELTA)
    monkeypatch.setattr(bounds.attack, "pgd_maximize", spy)
    out = get_loss(method).fn(make_batch(linear(W_STUDENT), linear(W_TEACHER)),
                              ObjectiveParams(**ATTACK, **params).resolved())
    return out, spy


def test_pgd_at_formula(monkeypatch):
    out, _ = run_with_fixed_attack(monkeypatch, "pgd-at")
    assert out["loss"].item() == pytest.approx(mean([ce(logits_of(W_STUDENT, x), y) for x, y in zip(X_ADV, Y, strict=True)]),
                                               rel=1e-12)


def test_trades_formula(monkeypatch):
    out, _ = run_with_fixed_attack(monkeypatch, "trades", beta=6.0)
    ces = [ce(logits_of(W_STUDENT, x), y) for x, y in zip(X, Y, strict=True)]
    kls = [kl(logits_of(W_STUDENT, x), logits_of(W_STUDENT, xa)) for x, xa in zip(X, X_ADV, strict=True)]
    assert out["loss"].item() == pytest.approx(mean(ces) + 6.0 * mean(kls), rel=1e-12)


def test_ard_formula(monkeypatch):
    out, _ = run_with_fixed_attack(monkeypatch, "ard", alpha=0.7, tau=3.0)
    kls = [kl(logits_of(W_TEACHER, x), logits_of(W_STUDENT, xa), 3.0) for x, xa in zip(X, X_ADV, strict=True)]
    ces = [ce(logits_of(W_STUDENT, x), y) for x, y in zip(X, Y, strict=True)]
    assert out["loss"].item() == pytest.approx(0.7 * 9.0 * mean(kls) + 0.3 * mean(ces), rel=1e-12)


def test_rslad_formula(monkeypatch):
    out, _ = run_with_fixed_attack(monkeypatch, "rslad")
    kl_adv = mean([kl(logits_of(W_TEACHER, x), logits_of(W_STUDENT, xa)) for x, xa in zip(X, X_ADV, strict=True)])
    kl_clean = mean([kl(logits_of(W_TEACHER, x), logits_of(W_STUDENT, x)) for x in X])
    assert out["loss"].item() == pytest.approx(5 / 6 * kl_adv + 1 / 6 * kl_clean, rel=1e-12)


@pytest.mark.parametrize("method", ["pgd-at", "trades", "ard", "rslad"])
def test_attacks_use_the_given_settings_and_objective(monkeypatch, method):
    _, spy = run_with_fixed_attack(monkeypatch, method)
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert (call["eps"], call["norm"], call["steps"], call["step_size"]) == (0.07, "2", 3, 0.011)
    x = torch.tensor(X_ADV, dtype=torch.float64)
    s, y = linear(W_STUDENT)(x), torch.tensor(Y)
    clean_s, clean_t = linear(W_STUDENT)(torch.tensor(X, dtype=torch.float64)), linear(W_TEACHER)(
        torch.tensor(X, dtype=torch.float64))
    expected = {  # what each method's attack maximizes, per example
        "pgd-at": nn.functional.cross_entropy(s, y, reduction="none"),
        "ard": nn.functional.cross_entropy(s, y, reduction="none"),
        "trades": (clean_s.softmax(1) * (clean_s.log_softmax(1) - s.log_softmax(1))).sum(1),
        "rslad": (clean_t.softmax(1) * (clean_t.log_softmax(1) - s.log_softmax(1))).sum(1),
    }[method]
    torch.testing.assert_close(call["objective"](x).detach(), expected.detach())


@pytest.mark.parametrize("method", ["pgd-at", "trades", "ard", "rslad"])
def test_real_attack_stays_in_the_ball_and_raises_its_objective(method):
    torch.manual_seed(0)
    student, teacher = small_mlp(0), small_mlp(1).requires_grad_(False)
    x = torch.rand(16, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    calls = []
    real = bounds.attack.pgd_maximize

    def recording(*args, **kwargs):
        x_adv, value = real(*args, **kwargs)
        calls.append((args[0], kwargs["x"] if "x" in kwargs else args[1], x_adv, value))
        return x_adv, value

    mp = pytest.MonkeyPatch()
    mp.setattr(bounds.attack, "pgd_maximize", recording)
    try:
        batch = LossBatch(x=x, y=y, student=student, student_bare=student, teacher=teacher,
                          generator=torch.Generator().manual_seed(1))
        get_loss(method).fn(batch, ObjectiveParams(eps=0.1, norm="inf", attack_steps=5).resolved())
    finally:
        mp.undo()
    (objective, x_in, x_adv, value), = calls
    assert float((x_adv - x_in).abs().max()) <= 0.1 + 1e-12
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with torch.no_grad():
        assert bool((objective(x_adv) >= objective(x_in) - 1e-12).all())
        assert float(objective(x_adv).sum()) > float(objective(x_in).sum())


def test_gaussian_noise_statistics():
    x = torch.full((4000, 1, 2, 2), 0.5)
    noisy = gaussian_noise(x, 0.25, torch.Generator().manual_seed(0))
    delta = noisy - x
    assert abs(float(delta.mean())) < 0.01
    assert float(delta.std()) == pytest.approx(0.25, rel=0.02)
    assert float(noisy.max()) > 1.0  # not clipped: what the smoothed classifier sees
    assert gaussian_noise(x, 0.0) is x


def test_method_params_resolution_and_errors():
    assert ObjectiveParams(eps=0.2, attack_steps=4).resolved().attack_step_size == pytest.approx(0.125)
    assert ObjectiveParams(eps=0.2, attack_step_size=0.01).resolved().attack_step_size == 0.01
    for bad in (dict(alpha=1.5), dict(tau=0.0), dict(iga_norm="3"), dict(iga_on="adv"), dict(norm="1"),
                dict(attack_steps=0), dict(eps=-0.1), dict(iga_weight=-1.0), dict(iga_scale="batch"),
                dict(eps=0.1, iga_step=-1.0)):
        with pytest.raises(CertkdError):
            ObjectiveParams(**bad).resolved()


def test_registry_lists_every_method_of_theory_sections_4_and_7():
    assert set(list_methods()) == {"natural", "pgd-at", "trades", "kd", "kdiga", "ard", "rslad", "ibp", "crown-ibp",
                                   "mtl-ibp", "cert-kd", "cert-kdiga", "cert-advkd"}
    with pytest.raises(CertkdError, match="unknown training method"):
        get_loss("madry")
    assert isinstance(LOSSES, Registry) and LOSSES.get("kdiga") is get_loss("kdiga")
    assert {m for m in list_methods() if get_loss(m).needs_teacher} == {"kd", "kdiga", "ard", "rslad", "cert-kd",
                                                                      "cert-kdiga", "cert-advkd"}


def one_step_by_hand(weight, x, y, u, eps, step):
    """The fast-AT point, L-inf, written out: x0 = clip(x + u), one signed step, projection to ball and box."""
    clip = [min(1.0, max(0.0, v)) for v in (xi + ui for xi, ui in zip(x, u, strict=True))]
    g = grad_ce_linear(weight, clip, y)
    moved = [c + step * math.copysign(1.0, gi) if gi != 0 else c for c, gi in zip(clip, g, strict=True)]
    return [min(1.0, max(0.0, xi + min(eps, max(-eps, m - xi)))) for xi, m in zip(x, moved, strict=True)]


X3 = [[1.0, 0.0], [0.3, 0.6], [0.0, 0.9]]
Y3 = [0, 2, 2]


@pytest.mark.parametrize("scale", ["sample", "batch-mean"])
@pytest.mark.parametrize("mask", [True, False])
def test_kdiga_adversarial_formula(scale, mask):
    """Every term at the student's one-step point x'; KL and IGA averaged over the examples the teacher
    gets right at x' (the teacher misclassifies the second one); batch-mean rows are 1/B of the per-sample ones."""
    eps, tau, weight = 0.1, 2.0, 3.0
    params = ObjectiveParams(iga_on="adversarial", eps=eps, tau=tau, alpha=0.4, iga_weight=weight,
                             iga_scale=scale, teacher_mask=None if mask else False).resolved()
    assert params.iga_step == pytest.approx(1.25 * eps) and params.teacher_mask is mask
    out = get_loss("kdiga").fn(make_batch(linear(W_STUDENT), linear(W_TEACHER), X3, Y3), params)
    u = random_in_ball((3, 2), math.inf, eps, torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    points = [one_step_by_hand(W_STUDENT, x, y, ui, eps, 1.25 * eps) for x, y, ui in zip(X3, Y3, u, strict=True)]
    right = [max(range(3), key=lambda k, p=p: logits_of(W_TEACHER, p)[k]) == y for p, y in zip(points, Y3, strict=True)]
    assert right == [True, False, True]
    keep = right if mask else [True] * 3
    kls = [kl(logits_of(W_TEACHER, p), logits_of(W_STUDENT, p), tau) for p in points]
    ces = [ce(logits_of(W_STUDENT, p), y) for p, y in zip(points, Y3, strict=True)]
    gaps = [math.dist(grad_ce_linear(W_STUDENT, p, y), grad_ce_linear(W_TEACHER, p, y)) / (3 if scale == "batch-mean"
                                                                                            else 1)
            for p, y in zip(points, Y3, strict=True)]
    kept_mean = lambda v: sum(vi for vi, k in zip(v, keep, strict=True) if k) / sum(keep)  # noqa: E731
    assert float(out["kl"]) == pytest.approx(kept_mean(kls), rel=1e-10)
    assert float(out["iga"]) == pytest.approx(kept_mean(gaps), rel=1e-10)
    assert float(out["ce"]) == pytest.approx(mean(ces), rel=1e-10)  # CE on the whole batch
    expected = 0.4 * tau ** 2 * kept_mean(kls) + 0.6 * mean(ces) + weight * kept_mean(gaps)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)
    assert float(out["kd_term"]) + float(out["iga_weighted"]) == pytest.approx(expected, rel=1e-10)
    if mask:
        assert float(out["teacher_right"]) == pytest.approx(2 / 3)


def test_one_step_point_l2_stays_in_ball_and_box():
    torch.manual_seed(0)
    model = small_mlp(0)
    x = torch.rand(32, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    from certkd.train.losses.common import one_step_point

    x_adv = one_step_point(model, x, y, 0.2, "2", 0.25, torch.Generator().manual_seed(0))
    assert float((x_adv - x).norm(dim=1).max()) <= 0.2 + 1e-12
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0 and not x_adv.requires_grad
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(x_adv), y)) > float(nn.functional.cross_entropy(model(x), y))
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients kept
