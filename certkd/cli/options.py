"""Option parsers and options shared by the commands (click wrappers around the application's parsers)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from certkd import memory, runs
from certkd.certification import records
from certkd.errors import CertkdError
from certkd.train import ObjectiveParams, TrainConfig

if TYPE_CHECKING:
    from certkd.run import Command

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def methods_help(pgd_note: str = "") -> str:
    """The registered certify methods with their kinds, for ``--help`` (derived from the registry).

    Example
    -------
    >>> "crown (certified)" in methods_help() and "clever (estimate)" in methods_help()
    True
    """
    from certkd.certification.methods import METHODS, PGD, certify_methods

    return "; ".join(f"{m.name} ({m.kind}{'' if m.target == 'model' else ' for the ' + m.target}"
                     f"{pgd_note if m.name == PGD else ''})"
                     for m in (METHODS.get(name) for name in dict.fromkeys([*certify_methods(), PGD])))


def _click_error(parse: Callable[[Any], T]) -> Callable[[Any], T]:
    """``parse`` with its ``CertkdError`` turned into a ``click.BadParameter`` (one line, exit code 2)."""
    @functools.wraps(parse)
    def parsed(value: Any) -> T:
        try:
            return parse(value)
        except CertkdError as exc:
            raise click.BadParameter(str(exc)) from None
    return parsed


parse_eps_list = _click_error(records.parse_eps_list)  # ("2/255", "0.1,0.3") -> [2/255, 0.1, 0.3]


def parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    """``("sigma=0.5", "n=1000")`` -> ``{"sigma": 0.5, "n": 1000}`` (numbers only; ``-`` read as ``_``)."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE, e.g. sigma=0.5")
        try:
            value: Any = int(raw) if raw.strip().lstrip("-").isdigit() else float(raw)
        except ValueError:
            raise click.BadParameter(f"{item!r}: the value must be a number") from None
        params[key.strip().replace("-", "_")] = value
    return params


def json_object(text: str, param_hint: str | None = None) -> dict[str, Any]:
    """``'{"width": 8}'`` -> ``{"width": 8}``; anything but a JSON object is a ``click.BadParameter``."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg}): {text!r}", param_hint=param_hint) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object like '{{\"width\": 8}}', got {text!r}", param_hint=param_hint)
    return parsed


def eps_callback(default: str | None) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], Any]:
    """A click callback parsing repeatable ``--eps`` values (``default`` when none are given)."""
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[float] | None:
        if not values and default is None:
            return None
        return parse_eps_list(values or (default or "",))
    return callback


def _apply(command: F, options: Sequence[Callable[[F], F]]) -> F:
    for option in reversed(options):
        command = option(command)
    return command


def notify_stderr(line: str) -> None:
    """A run's one-line notes (e.g. the bound batch chosen for --max-memory) go to stderr."""
    click.echo(line, err=True)


def echo_summary(command: Command, summary: dict[str, Any] | None) -> None:
    """Print the summary of a run of ``command``, or that a shard of a sharded run is done (its summary comes
    from ``certkd merge``)."""
    click.echo(command.format(summary) if summary is not None else
               f"certkd {command.name}: this shard is done; combine the shards' per_example.jsonl files with "
               "certkd merge FILES --out DIR")


def run_settings(out: Callable[[F], F]) -> Callable[[F], F]:
    """The options of a run (certify, bounds, compare): ``--batch-size``, ``--seed``, the fields of
    ``certkd.run.RunSettings`` (generated: a new field is a new option) and ``out``, the command's own
    ``--out``; all but batch size and seed reach the command as one ``settings`` (notes to stderr)."""
    from dataclasses import fields

    from certkd.run import RunSettings

    names = {f.name for f in fields(RunSettings)}

    def deco(command: F) -> F:
        @functools.wraps(command)
        def collected(**options: Any) -> Any:
            given = {name: options.pop(name) for name in names & options.keys()}
            return command(settings=RunSettings(**given, notify=notify_stderr), **options)
        return _apply(cast(F, collected), [
            click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                         help="Points per batch (one record-log append each)."),
            seed_option, dataclass_options(RunSettings), out])
    return deco


def _one_number(value: str) -> float:
    """``"8/255"`` -> ``0.0313...``: one radius-like number (fractions allowed)."""
    values = records.parse_eps_list(value)
    if len(values) != 1:
        raise CertkdError(f"give one number, got {value!r}")
    return values[0]


#: the parsers a dataclass field may name in ``metadata["parse"]``
FIELD_PARSERS: dict[str, Callable[[str], Any]] = {"number": _one_number, "json": lambda text: json_object(text),
                                                  "shard": runs.parse_shard, "size": memory.parse_memory}


def _field_option(f: dataclasses.Field[Any]) -> Callable[[F], F]:
    """The click option of one dataclass field (see :func:`dataclass_options`)."""
    meta = f.metadata
    default = None if f.default is dataclasses.MISSING else f.default
    option = meta.get("option", f"--{f.name.replace('_', '-')}")
    flags = (option,) if isinstance(option, str) else tuple(option)
    kwargs: dict[str, Any] = {"help": meta.get("help", ""), "show_default": default is not None and default is not False}
    if meta.get("required"):
        kwargs["required"] = True  # with no default at all: click takes an explicit None for a value
    else:
        kwargs["default"] = default
    if "choices" in meta:
        choices = meta["choices"]
        kwargs["type"] = click.Choice(list(choices() if callable(choices) else choices))
    elif "parse" in meta:
        parse = _click_error(FIELD_PARSERS[meta["parse"]])
        kwargs.update(callback=lambda ctx, param, value: None if value is None else parse(value),
                      metavar=meta["parse"].upper())
    elif meta.get("type") is Path:
        kwargs["type"] = OUTPUT_FILE if meta.get("output") else click.Path(path_type=Path)
    elif any("/" in flag for flag in flags):  # a --x/--no-x switch
        kwargs["show_default"] = default is not None
    elif isinstance(default, bool):
        kwargs.update(is_flag=True, show_default=False)
    else:
        kind = meta.get("type", str if default is None else type(default))
        kwargs["type"] = click.IntRange(min=meta["min"]) if "min" in meta else kind
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    return click.option(*flags, f.name, **kwargs)


def field_option(cls: type, name: str) -> Callable[[F], F]:
    """The option of the field ``name`` of dataclass ``cls`` alone (a command that takes a few of a class's)."""
    return _field_option(next(f for f in dataclasses.fields(cls) if f.name == name))


def dataclass_options(cls: type) -> Callable[[F], F]:
    """One option per dataclass field, derived from the field, never copied: a new field is a new option.

    The flag is ``--field-name``; default and type come from the field; ``metadata`` adds ``help`` and, where
    the field needs them, ``option`` (the flag or flags, e.g. ``--fraction`` for ``fraction_threshold``, or a
    ``--x/--no-x`` switch), ``type`` (``Path``; with ``output``, a checked output file), ``choices`` (a
    sequence, or a callable reading a registry), ``parse`` (a name of :data:`FIELD_PARSERS`), ``min``,
    ``metavar``, ``required`` and ``cli`` (False: no option).
    Fields of ``CertifyOptions`` (certify), ``CompareRule`` (compare), ``RunSettings`` (certify, compare,
    bounds), ``TrainConfig`` and ``ObjectiveParams`` (train) are options this way.
    """
    def deco(command: F) -> F:
        return _apply(command, [_field_option(f) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)])
    return deco


norm_option = field_option(ObjectiveParams, "norm")
seed_option = field_option(TrainConfig, "seed")


class _OutputPath(click.Path):
    """A ``--out`` path checked when the command line is parsed, so before any computation.

    ``kind`` is ``"file"`` (its folder must exist and be writable) or ``"dir"`` (the folder
    itself may be missing, its parent must exist; ``certkd.io.check_output_dir``).
    """

    def __init__(self, kind: str):
        super().__init__(path_type=Path)
        self.kind = kind
        self.name = f"output {kind}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from certkd.io import check_output_dir, check_output_file

        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        option = param.opts[0] if param is not None and param.opts else "--out"
        check = check_output_file if self.kind == "file" else check_output_dir
        try:
            return check(path, option)
        except CertkdError as exc:
            self.fail(str(exc).removeprefix(f"{option} "), param, ctx)


OUTPUT_FILE = _OutputPath("file")
OUTPUT_DIR = _OutputPath("dir")

#: ``--out`` of the commands whose output folder holds their record log (bounds, compare)
folder_out = click.option("--out", type=OUTPUT_DIR, default=None,
                          help="Directory for per_example.jsonl (appended as computed), the summary and figures.")
