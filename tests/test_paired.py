"""Paired teacher-versus-student statistics and the verdict (bounds.paired)."""

import pytest
import torch

from bounds.errors import BoundsError
from bounds.paired import INCONCLUSIVE, NO, YES, bootstrap_difference, certified_accuracy, paired_comparison

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
    assert "Wilcoxon" in res.reason


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
    assert res.verdict == YES and "larger" in res.reason


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
