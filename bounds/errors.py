"""Errors raised by ``bounds``; each carries one user-facing sentence."""


class BoundsError(ValueError):
    """Bad input to a bounds function (wrong eps, unknown method, shape mismatch)."""


class UnsupportedModelError(BoundsError):
    """The model contains an operator the requested method cannot handle soundly."""


class AutoLirpaMissing(BoundsError):
    """auto_LiRPA is not installed (or cannot be made to import)."""


class ContradictionError(UnsupportedModelError):
    """A bound the model itself contradicts (at its clean point, a sampled or an attack point): the method is
    refused for this model (``bounds.evidence``)."""
