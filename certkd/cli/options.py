"""Option parsers and options shared by the commands (click wrappers around the application's parsers)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from certkd import memory, runs
from certkd.certification import records
from certkd.certification.methods import NORMS
from certkd.errors import CertkdError

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
parse_shard = _click_error(runs.parse_shard)  # "k/n" -> (k, n), "auto" kept
parse_size = _click_error(memory.parse_memory)  # "4G" -> bytes


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


norm_option = click.option("--norm", type=click.Choice(list(NORMS)), default="inf", show_default=True,
                           help="Threat model: L-inf or L2 ball, intersected with [0, 1]^d.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed: fixes every run on CPU.")
device_option = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Discard the results a previous run left in the output and recompute.")
shard_option = click.option("--shard", callback=lambda ctx, param, value: parse_shard(value), default=None,
                            help="Run only part k of n (k/n, 0-based), or 'auto': torchrun (RANK/WORLD_SIZE; rank 0 "
                                 "gathers) or a Slurm job array (SLURM_ARRAY_TASK_ID/COUNT; files get .shardKofN). "
                                 "Combine parts with 'certkd merge'.")


def points_options(command: F) -> F:
    """The options that choose the evaluated points (certify, bounds, compare)."""
    return _apply(command, [
        click.option("-n", "--num-examples", type=click.IntRange(min=1), default=None,
                     help="Use the first N examples of the split (default: all)."),
        click.option("--dataset", default=None, help="Dataset name (default: the (student) checkpoint's dataset)."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Where the dataset's files live."),
        click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True),
    ])


progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Progress on stderr: a bar on a terminal, one line per finished stage in logs.")
max_memory_option = click.option(
    "--max-memory", callback=lambda ctx, param, value: None if value is None else parse_size(value), default=None,
    metavar="SIZE",
    help="Memory one bound pass may add, e.g. 4G or 512M (default: a third of the available RAM, or of the free "
         "GPU memory on CUDA). The bound batch is sized from one measured probe pass; printed and recorded.")


def notify_stderr(line: str) -> None:
    """A run's one-line notes (e.g. the bound batch chosen for --max-memory) go to stderr."""
    click.echo(line, err=True)


def echo_summary(command: Command, summary: dict[str, Any] | None) -> None:
    """Print the summary of a run of ``command``, or that a shard of a sharded run is done (its summary comes
    from ``certkd merge``)."""
    click.echo(command.format(summary) if summary is not None else
               f"certkd {command.name}: this shard is done; combine the shards' per_example.jsonl files with "
               "certkd merge FILES --out DIR")


def run_options(command: F) -> F:
    """Batch size, device, seed, memory per bound pass and progress (certify, bounds, compare)."""
    return _apply(command, [click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
                            device_option, seed_option, max_memory_option, progress_option])


def run_settings(command: F) -> F:
    """Pass the options of ``certkd.run.RunSettings`` to ``command`` as one ``settings`` (notes to stderr)."""
    from dataclasses import fields

    from certkd.run import RunSettings

    names = {f.name for f in fields(RunSettings)}

    @functools.wraps(command)
    def collected(**options: Any) -> Any:
        given = {name: options.pop(name) for name in names & options.keys()}
        return command(settings=RunSettings(**given, notify=notify_stderr), **options)
    return cast(F, collected)


def dataclass_options(cls: type, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """One ``--field-name`` option per dataclass field (default, type and ``metadata["help"]`` from the field).

    The options are derived, never copied: a new field of ``CertifyOptions`` (certify) or of
    ``CompareRule`` (compare) is a new option. ``metadata["option"]`` names the flag when it is
    not the field's name (e.g. ``--fraction`` for ``fraction_threshold``).
    """
    import dataclasses

    def deco(command: F) -> F:
        options = []
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default
            kind = f.metadata.get("type", type(default))
            flag = f.metadata.get("option", f"--{f.name.replace('_', '-')}")
            options.append(click.option(flag, f.name, type=kind, default=default,
                                        show_default=default is not None, help=f.metadata.get("help", "")))
        return _apply(command, options)
    return deco


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

def folder_run_options(command: F) -> F:
    """The options of a run whose output folder holds its record log (bounds, compare): those of
    :func:`run_options`, ``--out DIR``, ``--resume``, ``--overwrite`` and ``--shard``, all but batch size and
    seed passed as one ``settings`` (:func:`run_settings`)."""
    return _apply(run_settings(command), [
        run_options,
        click.option("--out", type=OUTPUT_DIR, default=None,
                     help="Directory for per_example.jsonl (appended as computed), the summary and figures."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out."),
        overwrite_option, shard_option])
