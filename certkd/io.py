"""Atomic file writes, append-only JSON-lines logs (resumable runs) and output-path checks.

Every result file is created with the permissions of an ordinary file (``0666`` less
the umask: ``0644`` under the usual ``022``), whether written atomically or appended.
``check_output_file`` / ``check_output_dir`` reject an output path that cannot be
written (missing parent, a file where a folder is wanted, no permission) in one
sentence, before any computation starts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from certkd.errors import CertkdError


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through ``write(fileobj)`` into a temporary file beside ``path``, then rename it.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_mode() -> int:
    """Permissions of a new result file: ``0o666`` less the process umask (``0o644`` for umask ``022``).

    Examples
    --------
    >>> old = os.umask(0o022); mode = file_mode(); _ = os.umask(old)
    >>> oct(mode)
    '0o644'
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``; ``CertkdError`` (one sentence) when that fails."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".certkd-probe.", dir=folder)
    except OSError as exc:
        raise CertkdError(f"cannot write {what}: {folder} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def _check_parent(path: Path, option: str) -> None:
    """The folder ``path`` goes into exists, is a folder and is writable (no folder is created)."""
    parent = path.parent
    if not parent.exists():
        raise CertkdError(f"{option} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise CertkdError(f"{option} {path}: {parent} is not a folder")
    _probe_writable(parent, f"{option} {path}")


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """Check that a result file can be written at ``path`` (its folder exists and is writable).

    Raises ``CertkdError`` with one sentence: the parent folder is missing (no folder is
    created silently), is not a folder, is not writable, or ``path`` is a directory.

    Examples
    --------
    >>> check_output_file("/nonexistent/dir/summary.json")
    Traceback (most recent call last):
    ...
    certkd.errors.CertkdError: --out /nonexistent/dir/summary.json: the folder /nonexistent/dir does not exist
    """
    path = Path(path)
    if path.is_dir():
        raise CertkdError(f"{option} {path} is a directory; give a file name")
    _check_parent(path, option)
    return path


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` is (or can be created as) a writable output folder; its parent must exist.

    Only the last component may be missing (it is created when results are written);
    ``CertkdError`` with one sentence otherwise.

    Examples
    --------
    >>> check_output_dir("/nonexistent/dir")
    Traceback (most recent call last):
    ...
    certkd.errors.CertkdError: --out /nonexistent/dir: the folder /nonexistent does not exist
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CertkdError(f"{option} {path} is a file; give a folder")
        _probe_writable(path, f"{option} {path}")
        return path
    _check_parent(path, option)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a torn last line (an interrupted append) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class JsonlAppender:
    """Append JSON objects one line at a time, flushed and fsynced, so a run can resume.

    On open, a torn trailing line left by a crash is cut off.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._fh = open(self.path, "a")

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._fh.write(json.dumps(row, default=_json_default) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_float(value: float) -> float | None:
    """JSON has no infinity: a non-finite number is written as null.

    Example
    -------
    >>> json_float(float("inf")), json_float(2.0)
    (None, 2.0)
    """
    return float(value) if math.isfinite(value) else None


def float_text(value: float | None) -> str:
    """A summary's figure as text, 4 significant digits; None (not finite, see :func:`json_float`) is ``inf``.

    Example
    -------
    >>> float_text(None), float_text(0.123456)
    ('inf', '0.1235')
    """
    return "inf" if value is None else f"{value:.4g}"
