"""Application errors: each is one sentence the CLI prints on stderr before exiting with code 2."""

from bounds.errors import BoundsError


class CertkdError(Exception):
    """A user-facing error with a one-line message."""


class CheckpointError(CertkdError):
    """A checkpoint file is missing, corrupt, not a certkd checkpoint, or does not fit its model."""


class DataError(CertkdError):
    """A dataset is missing or malformed."""


USER_ERRORS = (CertkdError, BoundsError)
