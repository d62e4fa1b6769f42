"""``certkd merge``: parse the options, call ``certkd.run.merge_files``, print."""

from __future__ import annotations

from pathlib import Path

import click

from certkd.cli import main


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="certify: the summary JSON of the whole run; compare and bounds: the output directory.")
@click.option("--per-example", type=click.Path(path_type=Path), default=None,
              help="Also write all records, in order, as one record file.")
def merge(files: tuple[Path, ...], out: Path, per_example: Path | None) -> None:
    """Combine the record files of sharded runs ('certify', 'compare' or 'bounds' --shard) into one result.

    Checks that the files come from the same configuration, that every shard is
    present once and complete, and that their examples are disjoint; the result
    is the one a single run would give.
    """
    from certkd.commands.bounds import BOUNDS
    from certkd.commands.certify import CERTIFY
    from certkd.commands.compare import COMPARE
    from certkd.run import merge_files

    click.echo(merge_files(list(files), out, [CERTIFY, COMPARE, BOUNDS], per_example))
