"""The verdict of ``certkd compare`` in words: the rule's settings, each part's reason, the headline.

``bounds.paired`` computes the numbers and each part's decision (with the evidence that
decided it); this module states them: :class:`CompareRule` (the settings, from which the
command's options are generated), :func:`part_reason` (one sentence per part) and
:func:`headline`, which combines both parts and is never more favourable than either
(theory.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from bounds.paired import (
    CERTIFIED_PART,
    CI_BELOW,
    COVERAGE_QUANTILE,
    EMPIRICAL_PART,
    FRACTION,
    INCONCLUSIVE,
    LARGER,
    NO,
    PART_QUANTITY,
    SMALLER,
    YES,
    PairedComparison,
    coverage,
    looseness,
)

QUESTION = "the student certifies at least as robustly as the teacher"
HEADLINE_RULE = ("The headline is never more favourable than either part: no if either part says no, yes only if "
                 "the certified part says yes and the empirical part does not say no, else inconclusive "
                 "(theory.md §6).")
PART_RULE = ("Each part says no if at some eps the paired bootstrap CI of (student - teacher) accuracy lies "
             "below -margin or a one-sided Wilcoxon signed-rank test finds the student's radii smaller "
             "(p < 1 - CI level); yes if at least the fraction threshold of points have radius_S >= radius_T - tol, "
             "or the Wilcoxon test finds them larger; else inconclusive.")


class PairedRule(TypedDict):
    """The decision rule's keyword arguments of ``bounds.paired.paired_comparison``."""

    tol: float
    margin: float
    alpha: float
    fraction_threshold: float
    n_boot: int
    seed: int


@dataclass
class CompareRule:
    """The decision rule of both parts and of the headline (theory.md §6).

    One place for its settings: the CLI options of ``certkd compare`` are generated from
    these fields (``certkd.cli.options.dataclass_options``), ``certkd.compare`` takes
    ``rule=``, and ``compare.json`` and the demo report state them. The tie tolerance is
    the radius tolerance of ``CertifyOptions`` (``radius_tol``).

    Example
    -------
    >>> rule = CompareRule(ci_level=0.9)
    >>> round(rule.alpha, 6), rule.paired(1e-3, seed=0)["n_boot"]
    (0.1, 2000)
    """

    margin: float = field(default=0.02, metadata={
        "help": "A part says 'no' when a CI of its accuracy difference (student - teacher) lies below -margin."})
    ci_level: float = field(default=0.95, metadata={
        "help": "Confidence level of the bootstrap CIs; the Wilcoxon tests use 1 - level."})
    fraction_threshold: float = field(default=0.9, metadata={
        "option": "--fraction",
        "help": "A part says 'yes' with at least this fraction of points with radius_S >= radius_T - tol."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples."})
    rho_threshold: float = field(default=0.25, metadata={
        "help": "Below this certificate looseness rho = median(r_T)/median(a_T) the certified part is labelled "
                "'covers only eps <= X'."})

    @property
    def alpha(self) -> float:
        """The significance level ``1 - ci_level`` of ``bounds.paired.paired_comparison``."""
        return 1.0 - self.ci_level

    def check(self, tol: float) -> None:
        """One sentence for a bad setting."""
        from bounds.paired import check_rule
        from certkd.errors import CertkdError

        if not 0 < self.rho_threshold <= 1:
            raise CertkdError(f"rho threshold must lie in (0, 1], got {self.rho_threshold}")
        if not 0 < self.ci_level < 1:
            raise CertkdError(f"ci level must lie in (0, 1), got {self.ci_level}")
        check_rule(tol, self.margin, self.alpha, self.fraction_threshold, self.n_boot)

    def combine(self, certified: PairedComparison, empirical: PairedComparison) -> Headline:
        """The headline of both parts under this rule (:func:`headline`)."""
        return headline(certified, empirical, rho_threshold=self.rho_threshold)

    def paired(self, tol: float, seed: int) -> PairedRule:
        """The keyword arguments of ``bounds.paired.paired_comparison``."""
        return {"tol": tol, "margin": self.margin, "alpha": self.alpha,
                "fraction_threshold": self.fraction_threshold, "n_boot": self.n_boot, "seed": seed}


def part_reason(part: PairedComparison) -> str:
    """The sentence that says why a part decided as it did.

    Example
    -------
    >>> import torch
    >>> from bounds.paired import paired_comparison
    >>> r = torch.linspace(0.0, 0.1, 50, dtype=torch.float64)
    >>> part_reason(paired_comparison(r, r, [0.05]))
    '100.0% of points have r_S >= r_T - 0.001 (>= 90%) and no eps shows a significant deficit'
    """
    quantity, r = PART_QUANTITY[part.part], "r" if part.part == CERTIFIED_PART else "a"
    radii, alpha, tol = f"{part.part} radii", part.alpha, part.tol
    if part.evidence == CI_BELOW:
        return (f"at eps {', '.join(f'{e:.4g}' for e in part.deficit_eps)} the {1 - alpha:.0%} CI of the "
                f"{quantity} difference (student - teacher) lies below -{part.margin:g}")
    if part.evidence == SMALLER:
        return f"Wilcoxon signed-rank: the student's {radii} are smaller (p = {part.wilcoxon_p_less:.3g} < {alpha:g})"
    if part.evidence == FRACTION:
        return (f"{part.at_least_fraction:.1%} of points have {r}_S >= {r}_T - {tol:g} "
                f"(>= {part.fraction_threshold:.0%}) and no eps shows a significant deficit")
    if part.evidence == LARGER:
        return (f"Wilcoxon signed-rank: the student's {radii} are larger (p = {part.wilcoxon_p_greater:.3g} < "
                f"{alpha:g}) and no eps shows a significant deficit")
    return (f"only {part.at_least_fraction:.1%} of points have {r}_S >= {r}_T - {tol:g} "
            f"(< {part.fraction_threshold:.0%}) and the radii do not differ significantly")


@dataclass
class Headline:
    """The verdict of theory.md §6 from a certified and an empirical part on the same points."""

    verdict: str
    reason: str
    certified: PairedComparison
    empirical: PairedComparison
    rho: float | None
    rho_threshold: float
    certified_covers: float  # the certified part covers eps in [0, certified_covers]
    empirical_covers: float
    coverage_quantile: float

    @property
    def coverage_label(self) -> str | None:
        """``"covers only eps <= X"`` for the certified part when ``rho < rho_threshold``, else None."""
        if self.rho is None or self.rho < self.rho_threshold:
            return f"covers only eps <= {self.certified_covers:.4g}"
        return None


def headline(certified: PairedComparison, empirical: PairedComparison,
             rho_threshold: float = CompareRule.rho_threshold,
             coverage_quantile: float = COVERAGE_QUANTILE) -> Headline:
    """Combine both parts (theory.md §6); the headline is never more favourable than either part.

    **no** if either part says no; **yes** only if the certified part says yes and the
    empirical part does not say no; **inconclusive** otherwise. ``rho`` and the eps range
    each part covers (``bounds.paired.coverage``) come with it; below ``rho_threshold`` the
    certified part is labelled "covers only eps <= X".

    Examples
    --------
    >>> import torch
    >>> from bounds.paired import paired_comparison
    >>> r = torch.linspace(0.01, 0.05, 40, dtype=torch.float64)
    >>> a = torch.linspace(0.1, 0.3, 40, dtype=torch.float64)
    >>> h = headline(paired_comparison(r, r, [0.02]), paired_comparison(0.5 * a, a, [0.1], part="empirical"))
    >>> h.verdict, h.coverage_label
    ('no', 'covers only eps <= 0.0459')
    """
    from certkd.errors import CertkdError

    if certified.part != CERTIFIED_PART or empirical.part != EMPIRICAL_PART:
        raise CertkdError("headline needs a certified part and an empirical part, in that order")
    if certified.radius_teacher.shape != empirical.radius_teacher.shape:
        raise CertkdError("the certified and the empirical part must be computed on the same points")
    parts = {CERTIFIED_PART: certified, EMPIRICAL_PART: empirical}
    noes = [name for name, p in parts.items() if p.verdict == NO]
    if noes:
        verdict = NO
        reason = "; ".join(f"the {name} part says no ({part_reason(parts[name])})" for name in noes)
    elif certified.verdict == YES:
        verdict = YES
        reason = f"the certified part says yes and the empirical part says {empirical.verdict}"
    else:
        verdict = INCONCLUSIVE
        reason = f"the certified part says {certified.verdict} and the empirical part {empirical.verdict}"
    return Headline(verdict=verdict, reason=reason, certified=certified, empirical=empirical,
                    rho=looseness(certified.radius_teacher, empirical.radius_teacher), rho_threshold=rho_threshold,
                    certified_covers=coverage(certified.radius_teacher, coverage_quantile),
                    empirical_covers=coverage(empirical.radius_teacher, coverage_quantile),
                    coverage_quantile=coverage_quantile)
