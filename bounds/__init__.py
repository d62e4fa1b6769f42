"""bounds: the math library of certkd.

Models and tensors in, numbers out: bound propagation, certified radii, attacks,
gradient norms, Lipschitz bounds, randomized smoothing, local linearity, the
transfer bound and paired statistics. Formulas follow ``docs/theory.md``.

This package never imports ``certkd`` and never touches files. Its main entry points
are importable from here (``from bounds import BoundEngine, transfer_bound``); they load
on first use, so ``import bounds`` stays cheap and never needs auto_LiRPA or scipy.
Everything else is imported from its module (``bounds.norms``, ``bounds.clever``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

#: the public names, by the module that defines them: the one list ``__all__`` derives from
_PUBLIC = {
    "attack": ("apgd_ensemble", "attack_radius", "pgd"),
    "bound_methods": ("BOUND_METHODS",),
    "certify": ("BoundEngine", "certified_radius", "margin_bounds"),
    "errors": ("BoundsError", "UnsupportedModelError"),
    "linearity": ("gamma_certified", "gamma_estimate"),
    "lipschitz": ("lipschitz_bound", "lipschitz_radius"),
    "paired": ("certified_accuracy", "paired_comparison"),
    "smoothing": ("smoothing_certify",),
    "transfer": ("transfer_bound", "transfer_certificate"),
    "view": ("verification_view",),
}

_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bounds' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bounds.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
