"""The bound-propagation methods: one table that every list of them derives from (theory.md §2.1).

``bounds.certify`` (names, auto_LiRPA's spelling), ``bounds.graph`` (which methods an operator
rule allows), ``bounds.backends`` (the order of ``certkd doctor``'s table), ``bounds.linearity``
(the methods of the certified gammas) and certkd's certify methods and memory planning (the
costliest method a run asks for is probed) all read :data:`BOUND_METHOD_TABLE`. A new method
is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoundMethod:
    """One bound-propagation method.

    ``lirpa``: auto_LiRPA's name of it; ``cost``: its rank in memory and time (0 cheapest; a
    run's memory probe uses the costliest it asks for); ``optimized``: the relaxation is
    optimized by gradient steps (alpha-CROWN: its operator rules are stricter); ``gamma``: it
    also bounds the linearity gammas (``bounds.linearity``); ``description``: one line for
    ``--help``. Every row is ``certified``: a proof, never an estimate.
    """

    name: str
    lirpa: str
    cost: int
    optimized: bool
    gamma: bool
    description: str
    kind: str = "certified"


# gamma: the methods sound for the linearity composite. IBP is excluded because under L2 auto_LiRPA 0.3
# gives the input the interval [x, x], so IBP drops the term ``delta^T c`` (measured: PGD exceeded its
# bound by 4); alpha-CROWN is not wired there.
BOUND_METHOD_TABLE: tuple[BoundMethod, ...] = (
    BoundMethod("ibp", "IBP", 0, False, False, "interval bound propagation (Gowal et al. 2018): fast, loose"),
    BoundMethod("crown-ibp", "CROWN-IBP", 1, False, True, "CROWN-IBP (Zhang et al. 2020)"),
    BoundMethod("crown", "CROWN", 2, False, True, "CROWN linear relaxation (Zhang et al. 2018): the default"),
    BoundMethod("alpha-crown", "alpha-CROWN", 3, True, False,
                "alpha-CROWN, optimized relaxation (Xu et al. 2021): tightest, ~400x slower on CPU"),
)

BOUND_METHODS = tuple(m.name for m in BOUND_METHOD_TABLE)
"""The method names, cheapest first.

Example
-------
>>> BOUND_METHODS
('ibp', 'crown-ibp', 'crown', 'alpha-crown')
"""

BY_COST = tuple(m.name for m in sorted(BOUND_METHOD_TABLE, key=lambda m: -m.cost))
"""The method names, the most memory-hungry first."""

GAMMA_METHODS = tuple(m.name for m in BOUND_METHOD_TABLE if m.gamma)
"""The methods that bound the linearity gammas (``bounds.linearity``)."""

LIRPA_NAMES = {m.name: m.lirpa for m in BOUND_METHOD_TABLE}
"""auto_LiRPA's ``compute_bounds(method=...)`` name of each method."""


def costliest(methods: list[str] | tuple[str, ...]) -> str | None:
    """The most memory-hungry bound method among ``methods`` (None when there is none).

    Example
    -------
    >>> costliest(["lipschitz", "ibp", "crown"])
    'crown'
    """
    return next((m for m in BY_COST if m in methods), None)
