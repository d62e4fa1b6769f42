"""``certkd merge``: the record files of the shards of one run -> the result of that run.

The command is read from the files' run headers: certify (a summary JSON), compare
(the verdict's directory) or bounds (the summary's directory). Shards are checked by ``certkd.runs.merge_logs``.
"""

from __future__ import annotations

from pathlib import Path

from certkd.errors import CertkdError
from certkd.runs import read_log


def merge_files(files: list[Path], out: Path, per_example: Path | None = None) -> str:
    """Merge the shards' record files into ``out``; returns the text the command prints.

    Parameters
    ----------
    files : list of Path
        The record files (one per shard, any order).
    out : Path
        certify: the summary JSON; compare: the output directory.
    per_example : Path, optional
        Also write the merged records as one record file.

    Returns
    -------
    str
        The printed summary.
    """
    parts = []
    for path in files:
        if not path.is_file():
            raise CertkdError(f"{path}: no such record file")
        head, records = read_log(path)
        parts.append((str(path), head, records))
    command = parts[0][1]["command"] if parts[0][1] else None
    if command == "certify":
        from certkd.certification import format_summary
        from certkd.certification.run import merge_certify

        return format_summary(merge_certify(parts, out, per_example, [str(p) for p in files]))
    if command == "compare":
        from certkd.commands.compare import format_compare, merge_compare

        return format_compare(merge_compare(parts, out, per_example))
    if command == "bounds":
        from certkd.commands.bounds import format_bounds, merge_bounds

        return format_bounds(merge_bounds(parts, out, per_example))
    raise CertkdError(f"{files[0]}: certkd merge combines shards of certify, compare or bounds, not {command!r}")
