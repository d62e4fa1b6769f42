"""bounds: the math library of certkd.

Models and tensors in, numbers out: bound propagation, certified radii, attacks,
gradient norms, Lipschitz bounds, randomized smoothing, local linearity, the
transfer bound and paired statistics. Formulas follow ``theory.md``.

This package never imports ``certkd`` and never touches files.
"""

from bounds.errors import BoundsError, UnsupportedModelError
from bounds.nn import Normalize
from bounds.norms import dual_norm, parse_norm

__all__ = ["BoundsError", "UnsupportedModelError", "Normalize", "dual_norm", "parse_norm"]
