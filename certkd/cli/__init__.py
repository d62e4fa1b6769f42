"""The ``certkd`` command line (click). Errors: one line on stderr and an exit code (``certkd.errors``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal, NoReturn, overload

import click

from certkd import __version__
from certkd.errors import EXIT_USAGE, USER_ERRORS, exit_code

#: commands that continue where they stopped when run again into the same folder
RESUME_BY_RERUN = ("demo", "ablate")


class CertkdGroup(click.Group):
    """A click group that turns every user error into one line on stderr and its exit code (bad input: 2)."""

    @overload
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: Literal[True] = True, **extra: Any) -> NoReturn: ...

    @overload
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> int: ...

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> int:
        try:
            rv = super().main(args=args, prog_name=prog_name or "certkd", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort as exc:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
            interrupted = isinstance(exc.__cause__, KeyboardInterrupt)
            click.echo(self._interrupted(args) if interrupted else "certkd: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"certkd: error: {exc.format_message()}", err=True)
            sys.exit(EXIT_USAGE)
        except USER_ERRORS as exc:
            click.echo(f"certkd: error: {_one_line(exc)}", err=True)
            sys.exit(exit_code(exc))
        except KeyboardInterrupt:
            click.echo(self._interrupted(args), err=True)
            sys.exit(130)
        if isinstance(rv, int) and not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def _interrupted(self, args: Sequence[str] | None) -> str:
        """The one line printed on Ctrl-C: how to continue the interrupted command."""
        argv = sys.argv[1:] if args is None else list(args)
        name = next((a for a in argv if not a.startswith("-")), None)
        command = self.commands.get(name) if name else None
        if command is None:
            return "certkd: interrupted"
        if any(p.name == "resume" for p in command.params):
            return (f"certkd: interrupted; the results computed so far are kept: rerun the same 'certkd {name}' "
                    "command with --resume to continue")
        if name in RESUME_BY_RERUN:
            return (f"certkd: interrupted; finished steps are kept: rerun the same 'certkd {name}' command to "
                    "continue")
        return f"certkd: interrupted ({name})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@click.group(cls=CertkdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, prog_name="certkd")
def main() -> None:
    """certkd: certified robustness of knowledge distillation.

    Train teachers and students (natural, PGD-AT, TRADES, KD, KDIGA, ARD, RSLAD),
    certify checkpoints (IBP, CROWN-IBP, CROWN, alpha-CROWN, global Lipschitz,
    randomized smoothing; CLEVER as an estimate), compute the local-linearity
    transfer bound, and ask whether a student certifies at least as robustly as
    its teacher. Every number is labelled `certified` or `estimate`.

    \b
    Exit codes: 0 done; 1 a failed run (e.g. training diverged) or an internal error;
    2 bad input (one line on stderr, caught before long work starts); 3 a method
    refused for a model after work started (nothing published for it); 130 interrupted.
    """


# Command modules register themselves on ``main``; each adds its name here.
from certkd.cli import ablate, bounds, certify, compare, demo, doctor, info, merge, train, verify  # noqa: E402,F401
