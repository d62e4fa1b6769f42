"""bounds: the math library of certkd.

Models and tensors in, numbers out: bound propagation, certified radii, attacks,
gradient norms, Lipschitz bounds, randomized smoothing, local linearity, the
transfer bound and paired statistics. Formulas follow ``docs/theory.md``.

This package never imports ``certkd`` and never touches files. Its public names are
importable from here (``from bounds import BoundEngine, transfer_bound``); they load
on first use, so ``import bounds`` stays cheap and never needs auto_LiRPA or scipy.
The CLEVER estimator itself is ``bounds.clever.clever`` (its name is that of its module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bounds.attack import AttackResult, attack_accuracy, margins, min_margin, pgd, pgd_maximize
    from bounds.certify import (
        BOUND_METHODS,
        BoundEngine,
        MarginBounds,
        RadiusResult,
        certified_radius,
        margin_bounds,
    )
    from bounds.clever import CleverResult, WeibullFit, fit_reverse_weibull
    from bounds.errors import AutoLirpaMissing, BoundsError, UnsupportedModelError
    from bounds.gradients import InputGradients, loss_gradient, margin_gradients, other_classes
    from bounds.linearity import (
        Linearity,
        LinearityBounder,
        ScalarBounds,
        gamma_certified,
        gamma_estimate,
        linearity_gap,
        robust_loss_upper,
    )
    from bounds.lipschitz import (
        LipschitzBound,
        LipschitzRadius,
        conv_operator_norm,
        lipschitz_bound,
        lipschitz_radius,
        spectral_norm,
    )
    from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
    from bounds.nn import Normalize
    from bounds.norms import (
        batch_norm,
        check_eps,
        dual_norm,
        norm_name,
        parse_norm,
        project,
        random_in_ball,
        steepest_step,
    )
    from bounds.paired import (
        INCONCLUSIVE,
        NO,
        QUESTION,
        YES,
        PairedComparison,
        bootstrap_difference,
        certified_accuracy,
        check_rule,
        paired_comparison,
    )
    from bounds.smoothing import (
        ABSTAIN,
        SmoothingCertificate,
        SmoothingPrediction,
        clopper_pearson_lower,
        smoothing_certify,
        smoothing_predict,
    )
    from bounds.transfer import (
        BoundCheck,
        TransferBound,
        TransferCertificate,
        bound_check,
        gradient_gap,
        robust_loss_estimate,
        transfer_bound,
        transfer_certificate,
    )
    from bounds.view import check_supported, check_view, verification_view

#: where each public name lives
_WHERE = {
    **dict.fromkeys(["AttackResult", "attack_accuracy", "margins", "min_margin", "pgd", "pgd_maximize"], "attack"),
    **dict.fromkeys(["BOUND_METHODS", "BoundEngine", "MarginBounds", "RadiusResult", "certified_radius", "margin_bounds"], "certify"),
    **dict.fromkeys(["CleverResult", "WeibullFit", "fit_reverse_weibull"], "clever"),
    **dict.fromkeys(["AutoLirpaMissing", "BoundsError", "UnsupportedModelError"], "errors"),
    **dict.fromkeys(["InputGradients", "loss_gradient", "margin_gradients", "other_classes"], "gradients"),
    **dict.fromkeys(["Linearity", "LinearityBounder", "ScalarBounds", "gamma_certified", "gamma_estimate", "linearity_gap", "robust_loss_upper"], "linearity"),
    **dict.fromkeys(["LipschitzBound", "LipschitzRadius", "conv_operator_norm", "lipschitz_bound", "lipschitz_radius", "spectral_norm"], "lipschitz"),
    **dict.fromkeys(["auto_lirpa_version", "import_auto_lirpa"], "lirpa"),
    **dict.fromkeys(["Normalize"], "nn"),
    **dict.fromkeys(["batch_norm", "check_eps", "dual_norm", "norm_name", "parse_norm", "project", "random_in_ball", "steepest_step"], "norms"),
    **dict.fromkeys(["INCONCLUSIVE", "NO", "QUESTION", "YES", "PairedComparison", "bootstrap_difference", "certified_accuracy", "check_rule", "paired_comparison"], "paired"),
    **dict.fromkeys(["ABSTAIN", "SmoothingCertificate", "SmoothingPrediction", "clopper_pearson_lower", "smoothing_certify", "smoothing_predict"], "smoothing"),
    **dict.fromkeys(["BoundCheck", "TransferBound", "TransferCertificate", "bound_check", "gradient_gap", "robust_loss_estimate", "transfer_bound", "transfer_certificate"], "transfer"),
    **dict.fromkeys(["check_supported", "check_view", "verification_view"], "view"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bounds' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bounds.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ABSTAIN",
    "AttackResult",
    "AutoLirpaMissing",
    "BOUND_METHODS",
    "BoundCheck",
    "BoundEngine",
    "BoundsError",
    "CleverResult",
    "INCONCLUSIVE",
    "InputGradients",
    "Linearity",
    "LinearityBounder",
    "LipschitzBound",
    "LipschitzRadius",
    "MarginBounds",
    "NO",
    "Normalize",
    "PairedComparison",
    "QUESTION",
    "RadiusResult",
    "ScalarBounds",
    "SmoothingCertificate",
    "SmoothingPrediction",
    "TransferBound",
    "TransferCertificate",
    "UnsupportedModelError",
    "WeibullFit",
    "YES",
    "attack_accuracy",
    "auto_lirpa_version",
    "batch_norm",
    "bootstrap_difference",
    "bound_check",
    "certified_accuracy",
    "certified_radius",
    "check_eps",
    "check_rule",
    "check_supported",
    "check_view",
    "clopper_pearson_lower",
    "conv_operator_norm",
    "dual_norm",
    "fit_reverse_weibull",
    "gamma_certified",
    "gamma_estimate",
    "gradient_gap",
    "import_auto_lirpa",
    "linearity_gap",
    "lipschitz_bound",
    "lipschitz_radius",
    "loss_gradient",
    "margin_bounds",
    "margin_gradients",
    "margins",
    "min_margin",
    "norm_name",
    "other_classes",
    "paired_comparison",
    "parse_norm",
    "pgd",
    "pgd_maximize",
    "project",
    "random_in_ball",
    "robust_loss_estimate",
    "robust_loss_upper",
    "smoothing_certify",
    "smoothing_predict",
    "spectral_norm",
    "steepest_step",
    "transfer_bound",
    "transfer_certificate",
    "verification_view",
]
