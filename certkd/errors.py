"""Application errors and the CLI's exit codes: each error is one sentence the CLI prints on stderr.

Exit codes (``certkd --help`` lists them): 0 done; :data:`EXIT_INTERNAL` for a failed run or a
bug (a diverged training run is not bad input); :data:`EXIT_USAGE` for bad input, caught before
long work starts; :data:`EXIT_REFUSED` when a method is refused for a model after work started
(fail closed: nothing is published for it); 130 on Ctrl-C.
"""

from bounds.errors import BoundsError, ContradictionError

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class CertkdError(Exception):
    """A user-facing error with a one-line message (bad input: exit code 2)."""


class CheckpointError(CertkdError):
    """A checkpoint file is missing, corrupt, not a certkd checkpoint, or does not fit its model."""


class DataError(CertkdError):
    """A dataset is missing or malformed."""


class RunFailed(CertkdError):
    """The computation itself failed (e.g. training diverged): one line, exit code 1."""


class Refused(CertkdError):
    """A method is refused for a model after work started (fail closed): one line, exit code 3."""


USER_ERRORS = (CertkdError, BoundsError)
"""Every error that carries one user-facing sentence: certkd's own and those raised by ``bounds``."""

REFUSALS: tuple[type[Exception], ...] = (Refused, ContradictionError)
"""The refusal error classes (exit code 3): certkd's own and the evidence gate's (``bounds.evidence``)."""


def exit_code(exc: BaseException) -> int:
    """The exit code of a one-line error: refusal 3, failed run 1, other user errors 2.

    Example
    -------
    >>> exit_code(Refused("crown contradicts the attack")), exit_code(RunFailed("nan")), exit_code(DataError("x"))
    (3, 1, 2)
    """
    if isinstance(exc, REFUSALS):
        return EXIT_REFUSED
    if isinstance(exc, RunFailed):
        return EXIT_INTERNAL
    return EXIT_USAGE
