"""Paired teacher-versus-student statistics and the verdict (bounds.paired)."""

import pytest
import torch

from bounds.errors import BoundsError
from bounds.paired import (
    CERTIFIED_PART,
    EMPIRICAL_PART,
    INCONCLUSIVE,
    NO,
    PART_QUANTITY,
    YES,
    PairedComparison,
    bootstrap_difference,
    certified_accuracy,
    coverage,
    curve_grid,
    looseness,
    paired_comparison,
)
from certkd.errors import CertkdError
from certkd.verdict import headline, part_reason

EPS = [0.0, 0.02, 0.05, 0.08]


def radii(n: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1


def test_identical_radii_give_yes_with_zero_differences():
    r = radii()
    res = paired_comparison(r, r.clone(), EPS)
    assert res.verdict == YES
    assert res.at_least_fraction == 1.0
    assert torch.equal(res.accuracy_student, res.accuracy_teacher)
    assert torch.all(res.ci_low == 0) and torch.all(res.ci_high == 0)
    assert res.wilcoxon_p_less == 1.0 and res.wilcoxon_p_two_sided == 1.0


def test_all_zero_radii_are_handled():
    z = torch.zeros(30)
    res = paired_comparison(z, z, [0.0, 0.1])
    assert res.verdict == YES and res.wilcoxon_p_less == 1.0
    assert res.accuracy_student.tolist() == [1.0, 0.0]


def test_strictly_smaller_student_radii_give_no():
    r = radii()
    res = paired_comparison(0.5 * r, r, EPS)
    assert res.verdict == NO
    assert res.wilcoxon_p_less < 1e-6
    assert torch.all(res.difference[1:] < 0)
    assert bool((res.ci_high < -res.margin).any())


def test_small_uniform_deficit_is_caught_by_wilcoxon_alone():
    r = radii() + 0.01
    # every radius 0.004 smaller (> tol): certified accuracy at eps 0 is unchanged, the signed-rank test sees it
    res = paired_comparison(r - 0.004, r, [0.0], tol=1e-3)
    assert res.difference.tolist() == [0.0]
    assert res.verdict == NO
    assert "Wilcoxon" in part_reason(res)


def test_larger_student_radii_give_yes():
    r = radii()
    res = paired_comparison(r + 0.01, r, EPS)
    assert res.verdict == YES
    assert res.wilcoxon_p_less > 0.5
    assert torch.all(res.difference >= 0)


def test_significantly_larger_radii_give_yes_despite_some_smaller_ones():
    r = radii()
    smaller = torch.arange(len(r)) % 5 == 0  # 20 % of the points lose a little
    res = paired_comparison(torch.where(smaller, r - 0.003, r + 0.02), r, EPS)
    assert res.at_least_fraction < res.fraction_threshold
    assert res.wilcoxon_p_greater < 1e-6
    assert res.verdict == YES and "larger" in part_reason(res)


def test_symmetric_noise_is_inconclusive():
    r = radii()
    signs = torch.tensor([1.0, -1.0]).repeat(len(r) // 2).double()
    res = paired_comparison(r + 0.005 * signs, r, EPS, tol=1e-3)
    assert res.verdict == INCONCLUSIVE
    assert 0.45 <= res.at_least_fraction <= 0.55


def test_differences_within_tolerance_count_as_ties():
    r = radii()
    res = paired_comparison(r - 5e-4, r, [0.0], tol=1e-3)
    assert res.verdict == YES and res.wilcoxon_p_less == 1.0


def test_certified_accuracy_counts_only_correct_points_with_radius_at_least_eps():
    r = torch.tensor([0.0, 0.05, 0.1, 0.2])
    correct = torch.tensor([True, True, False, True])
    acc = certified_accuracy(r, [0.0, 0.05, 0.15], correct)
    assert acc.tolist() == [0.75, 0.5, 0.25]


def test_bootstrap_is_seeded_and_covers_the_observed_difference():
    gen = torch.Generator().manual_seed(1)
    cs = torch.rand(200, 3, generator=gen) > 0.4
    ct = torch.rand(200, 3, generator=gen) > 0.5
    a = bootstrap_difference(cs, ct, 500, 0.05, seed=7)
    b = bootstrap_difference(cs, ct, 500, 0.05, seed=7)
    c = bootstrap_difference(cs, ct, 500, 0.05, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    observed = cs.double().mean(0) - ct.double().mean(0)
    assert torch.all(a[0] <= observed) and torch.all(observed <= a[1])


def test_bad_input_raises_one_sentence_errors():
    with pytest.raises(BoundsError):
        paired_comparison(torch.zeros(3), torch.zeros(4), EPS)
    with pytest.raises(BoundsError):
        paired_comparison(torch.zeros(3), torch.zeros(3), EPS, alpha=1.5)
    with pytest.raises(BoundsError):
        paired_comparison(torch.tensor([float("nan")]), torch.zeros(1), EPS)


# --------------------------------------------------------------------------- two parts and the headline (§6)

def _part(student: torch.Tensor, teacher: torch.Tensor, part: str) -> PairedComparison:
    return paired_comparison(student, teacher, EPS, part=part)


@pytest.mark.parametrize(("certified", "empirical", "expected"), [
    ("yes", "yes", YES), ("yes", "inconclusive", YES), ("yes", "no", NO), ("no", "yes", NO),
    ("inconclusive", "yes", INCONCLUSIVE), ("inconclusive", "inconclusive", INCONCLUSIVE),
    ("no", "no", NO), ("inconclusive", "no", NO),
])
def test_headline_is_never_more_favourable_than_either_part(certified, empirical, expected):
    r = radii()
    signs = torch.tensor([1.0, -1.0]).repeat(len(r) // 2).double()
    make = {"yes": lambda: r + 0.01, "no": lambda: 0.5 * r, "inconclusive": lambda: r + 0.005 * signs}
    cert = _part(make[certified](), r, CERTIFIED_PART)
    emp = _part(make[empirical](), r, EMPIRICAL_PART)
    assert (cert.verdict, emp.verdict) == (certified, empirical)
    h = headline(cert, emp)
    assert h.verdict == expected
    order = {NO: 0, INCONCLUSIVE: 1, YES: 2}
    assert order[h.verdict] <= order[cert.verdict]
    if emp.verdict == NO:
        assert h.verdict == NO and "empirical part says no" in h.reason


def test_rho_and_coverage_label():
    r_t = radii()
    a_t = 10 * r_t  # the bounds see a tenth of the teacher's robustness
    h = headline(_part(r_t, r_t, CERTIFIED_PART), _part(a_t, a_t, EMPIRICAL_PART))
    assert h.rho == pytest.approx(0.1)
    assert h.certified_covers == pytest.approx(coverage(r_t)) and h.empirical_covers == pytest.approx(10 * coverage(r_t))
    assert h.coverage_label == f"covers only eps <= {h.certified_covers:.4g}"
    tight = headline(_part(r_t, r_t, CERTIFIED_PART), _part(r_t * 1.1, r_t * 1.1, EMPIRICAL_PART))
    assert tight.rho == pytest.approx(1 / 1.1) and tight.coverage_label is None
    assert looseness(r_t, torch.zeros_like(r_t)) is None


def test_attack_accuracy_counts_strictly_larger_radii():
    a = torch.tensor([0.0, 0.05, 0.1], dtype=torch.float64)
    res = paired_comparison(a, a, [0.0, 0.05], part=EMPIRICAL_PART)
    assert res.accuracy_teacher.tolist() == [2 / 3, 1 / 3]
    assert "attack" in PART_QUANTITY[res.part]
    with pytest.raises(BoundsError):
        paired_comparison(a, a, [0.0], part="bogus")
    with pytest.raises(CertkdError):
        headline(_part(a, a, EMPIRICAL_PART), _part(a, a, CERTIFIED_PART))


def test_curve_grid_spans_the_teachers_empirical_robustness():
    r = radii() * 0.1
    a = radii() + 0.2
    grid = curve_grid(r, a, points=11)
    assert grid[0] == 0.0 and len(grid) == 11
    assert grid[-1] == pytest.approx(coverage(a)) and grid[-1] > float(r.max())


@pytest.mark.usefixtures("lirpa")
def test_tight_certificates_of_a_linear_model_and_its_scaled_copy_give_rho_near_one_and_agreeing_parts():
    """A linear model's CROWN radius is exact; APGD's radius is within the tolerance above it."""
    from torch import nn

    from bounds.attack import attack_radius, make_attack
    from bounds.certify import BoundEngine

    gen = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.randn(3, 6, generator=gen))
        teacher[1].bias.zero_()
    student = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    student.load_state_dict({k: 2.0 * v for k, v in teacher.state_dict().items()})  # same decisions, 2x logits
    x = 0.4 + 0.2 * torch.rand(60, 6, generator=gen)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    tol = 1e-3
    r = {name: BoundEngine(m, (6,)).certified_radius(x, y, "inf", "crown", tol=tol, generator=gen).radius.double()
         for name, m in (("s", student), ("t", teacher))}
    a = {name: attack_radius(m, x, y, make_attack(m, steps=10, generator=gen), tol=tol).radius
         for name, m in (("s", student), ("t", teacher))}
    assert bool((r["t"] <= a["t"] + 1e-6).all())
    grid = curve_grid(r["t"], a["t"])
    h = headline(paired_comparison(r["s"], r["t"], grid, tol=tol),
                 paired_comparison(a["s"], a["t"], grid, tol=tol, part=EMPIRICAL_PART))
    assert h.rho == pytest.approx(1.0, abs=0.05)
    assert h.coverage_label is None
    assert h.certified.verdict == h.empirical.verdict == h.verdict == YES
    assert h.certified_covers == pytest.approx(h.empirical_covers, abs=2 * tol)


def test_a_radius_equal_to_eps_counts_as_certified_in_certify_and_in_compare():
    """One tie rule: a certified radius is an eps that was certified, so ``r >= eps`` counts (theory.md §2.1)."""
    from torch import nn

    from certkd.certification.methods import CertifyOptions, evaluate_batch, get_method, prepare_methods

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    ctx = prepare_methods(net, (1, 2, 2), ["lipschitz"], "2", CertifyOptions(pgd_steps=0))
    gen = torch.Generator().manual_seed(0)
    _, out = evaluate_batch(ctx, get_method("lipschitz"), x[:1], y[:1], [0.0], True, gen)
    r = float(out.radius[0])
    assert r > 0
    _, at_r = evaluate_batch(ctx, get_method("lipschitz"), x[:1], y[:1], [r], False, gen)
    assert at_r.robust.tolist() == [[True]]
    assert certified_accuracy(out.radius, [r]).tolist() == [1.0]
