"""The run layer under every command: configuration header, record log, resume, shards, merge, seeds.

A *run* is a configuration (a JSON-able dict, hashed into the first line of its record
log) and the records it produces, one JSON line each, appended as they are computed.
Every record has a *done-key* (``(index, method, eps)`` for certify, ``(index, eps)`` for
bounds, ``(index,)`` for compare), so a resumed run computes exactly what is missing.

- :class:`RecordLog` opens a log: new, resumed (same configuration only), or
  overwritten; a different configuration is refused with one sentence, never mixed in.
- :func:`batches` cuts the evaluated indices into batches; a shard ``k/n`` owns the
  batches ``b`` with ``b mod n == k``, so shards together are exactly one run.
- :func:`resolve_shard` turns ``--shard auto`` into the shard of this process
  (torchrun: ``RANK``/``WORLD_SIZE``; Slurm job arrays: ``SLURM_ARRAY_TASK_ID``/
  ``SLURM_ARRAY_TASK_COUNT``); :func:`gather_shards` collects torchrun results.
- :func:`merge_logs` combines the logs of the shards of one run.
- :func:`seed_stream` is the one way commands draw randomness: a generator fixed by
  the seed and the keys of the work item, independent of shards, resumes and order.
- :func:`execute` is the one loop: pending work items in, records out to the log.

Example
-------
>>> log = RecordLog.memory(key=lambda r: (r["index"],))
>>> execute([[0, 1], [2]], lambda idx: [{"index": i} for i in idx], log)
[{'index': 0}, {'index': 1}, {'index': 2}]
>>> log.missing([(1,), (3,)])
True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from certkd.errors import CertkdError
from certkd.io import JsonlAppender, atomic_write, read_jsonl

HEADER_KEY = "certkd_run"
FORMAT = 1

Record = dict[str, Any]
Key = tuple[Any, ...]
Shard = tuple[int, int]
W = TypeVar("W")


# --------------------------------------------------------------------------- configuration and seeds

def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (sorted keys, no spaces): equal configurations, equal hashes.

    Parameters
    ----------
    config : mapping
        A run's configuration (JSON-able).

    Returns
    -------
    str
        64 hex digits.

    Example
    -------
    >>> config_sha256({"a": 1, "b": 2}) == config_sha256({"b": 2, "a": 1})
    True
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seed_stream(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A random generator fixed by ``seed`` and the keys of one work item (e.g. batch and method).

    Parameters
    ----------
    seed : int
        The run's seed.
    *keys : object
        What identifies the work item; their ``str`` forms are hashed with the seed.
    device : str or torch.device
        Where the generator lives.

    Returns
    -------
    torch.Generator
        Seeded with the first 63 bits of ``sha256("seed:key1:key2...")``: the same item
        draws the same numbers in a single run, a resumed run and any shard.

    Example
    -------
    >>> a, b = seed_stream(0, 3, "crown"), seed_stream(0, 3, "crown")
    >>> bool(torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b)))
    True
    """
    digest = hashlib.sha256(":".join(str(k) for k in (seed, *keys)).encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Names of the entries that differ; nested mappings by dotted names (``params.sigma``).

    Parameters
    ----------
    a, b : mapping
        Two configurations.
    ignore : sequence of str
        Top-level keys not compared (``shard`` when merging).

    Returns
    -------
    list of str
        Sorted names.

    Example
    -------
    >>> config_differences({"seed": 0, "params": {"n": 1}}, {"seed": 1, "params": {"n": 2}})
    ['params.n', 'seed']
    """
    out = []
    for k in sorted((set(a) | set(b)) - set(ignore)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += [f"{k}.{d}" for d in config_differences(va, vb)]
        elif va != vb:
            out.append(k)
    return out


# --------------------------------------------------------------------------- the record log

def header(command: str, config: Mapping[str, Any]) -> Record:
    """The first line of a record log: which command, its configuration and the configuration's hash.

    Parameters
    ----------
    command : str
        ``certify``, ``bounds``, ``compare``.
    config : mapping
        What decides the run's records.

    Returns
    -------
    dict
        ``{"certkd_run": 1, "command", "config", "config_sha256"}``.

    Example
    -------
    >>> sorted(header("certify", {"seed": 0}))
    ['certkd_run', 'command', 'config', 'config_sha256']
    """
    return {HEADER_KEY: FORMAT, "command": command, "config": dict(config), "config_sha256": config_sha256(config)}


def read_log(path: str | Path) -> tuple[Record | None, list[Record]]:
    """``(header, records)`` of a record log (a torn last line, from an interrupted append, is ignored).

    Parameters
    ----------
    path : str or Path
        The JSONL file.

    Returns
    -------
    (dict or None, list of dict)
        ``(None, [])`` when the file is missing or empty. ``CertkdError`` when it is not
        a certkd record log.

    Example
    -------
    >>> read_log("no/such/file.jsonl")
    (None, [])
    """
    rows = read_jsonl(path)
    if not rows:
        return None, []
    head = rows[0]
    if not (isinstance(head, dict) and head.get(HEADER_KEY) == FORMAT and isinstance(head.get("config"), dict)
            and isinstance(head.get("command"), str)):
        raise CertkdError(f"{path}: not a certkd record log (its first line is no run header)")
    return head, rows[1:]


def write_log(path: str | Path, command: str, config: Mapping[str, Any], records: Iterable[Record]) -> None:
    """Write a whole record log atomically (a merged run): header, then the records.

    Parameters
    ----------
    path : str or Path
        The file (replaced at once; a crash leaves the old one).
    command, config
        The run.
    records : iterable of dict
        Its records.

    Example
    -------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> write_log(p, "certify", {"seed": 0}, [{"index": 0}])
    >>> read_log(p)[1]
    [{'index': 0}]
    """
    def write(fh: Any) -> None:
        for row in [header(command, config), *records]:
            fh.write(json.dumps(row) + "\n")

    atomic_write(path, write)


class RecordLog:
    """The records of one run: those read back from its log file plus those appended now.

    Open with :meth:`open` (a file) or :meth:`memory` (no file). ``key`` maps a record to
    its done-key; :meth:`add` appends only records whose key is not done yet.
    """

    def __init__(self, path: Path | None, key: Callable[[Record], Key], records: list[Record],
                 appender: JsonlAppender | None) -> None:
        self.path = path
        self.key = key
        self.records = list(records)
        self.done = {key(r) for r in records}
        self._appender = appender

    @classmethod
    def memory(cls, key: Callable[[Record], Key]) -> RecordLog:
        """A log that keeps its records in memory only."""
        return cls(None, key, [], None)

    @classmethod
    def open(cls, path: str | Path | None, command: str, config: Mapping[str, Any], key: Callable[[Record], Key],
             resume: bool = False, overwrite: bool = False) -> RecordLog:
        """Open the log of the run ``(command, config)`` at ``path``.

        Parameters
        ----------
        path : path or None
            The JSONL file; None keeps records in memory.
        command, config
            The run; its header is the file's first line.
        key : callable
            Record -> done-key.
        resume : bool
            Continue a file that holds records of the same run (a file of a different run is refused).
        overwrite : bool
            Discard whatever a file of ours holds and start again.

        Returns
        -------
        RecordLog
            With the records read back (none when new or overwritten).

        Example
        -------
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> with RecordLog.open(p, "demo", {"seed": 0}, key=lambda r: (r["index"],)) as log:
        ...     _ = log.add([{"index": 0}])
        >>> len(RecordLog.open(p, "demo", {"seed": 0}, key=lambda r: (r["index"],), resume=True).records)
        1
        >>> RecordLog.open(p, "demo", {"seed": 1}, key=lambda r: (r["index"],), resume=True)
        Traceback (most recent call last):
        certkd.errors.CertkdError: ... was written by a different run (it differs in seed); pass --overwrite ...
        """
        if path is None:
            return cls.memory(key)
        path = Path(path)
        if path.is_dir():
            raise CertkdError(f"{path} is a directory; give a file name")
        head, records = read_log(path)
        if head is not None and not overwrite:
            if not resume:
                raise CertkdError(f"{path} already holds results: pass --resume to continue that run, "
                                  "--overwrite to recompute it, or use another file")
            diff = ([] if head["command"] == command else ["command"]) + config_differences(head["config"], config)
            if diff or head.get("config_sha256") != config_sha256(config):
                raise CertkdError(f"{path} was written by a different run (it differs in "
                                  f"{', '.join(diff) or 'its configuration'}); pass --overwrite to recompute it, "
                                  "or use another file")
        else:
            write_log(path, command, config, [])
            records = []
        return cls(path, key, records, JsonlAppender(path))

    def missing(self, keys: Iterable[Key]) -> bool:
        """Whether any of ``keys`` has no record yet."""
        return any(k not in self.done for k in keys)

    def add(self, rows: Iterable[Record]) -> list[Record]:
        """Append (and fsync) the rows whose key is not done; returns them."""
        new = []
        for row in rows:
            k = self.key(row)
            if k not in self.done:
                self.done.add(k)
                new.append(row)
        self.records.extend(new)
        if self._appender is not None and new:
            self._appender.write(new)
        return new

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def execute(work: Sequence[W], compute: Callable[[W], list[Record]], log: RecordLog, progress: bool = False,
            desc: str = "run", label: Callable[[W], str] | None = None) -> list[Record]:
    """The one run loop: ``compute`` each work item and append its records as soon as they exist.

    Parameters
    ----------
    work : sequence
        The pending work items (the caller drops those whose keys are all done).
    compute : callable
        Work item -> records.
    log : RecordLog
        Receives the records; records already done are not appended again.
    progress : bool
        Progress on stderr (``certkd.progress.Progress``: a bar on a terminal, else one line when done).
    desc, label
        The stage's name and a per-item label (shown beside a bar).

    Returns
    -------
    list of dict
        The records appended now.

    Example
    -------
    >>> log = RecordLog.memory(key=lambda r: (r["index"],))
    >>> _ = execute([[0, 1]], lambda idx: [{"index": i} for i in idx], log)
    >>> execute([[0, 1]], lambda idx: [{"index": i} for i in idx], log)  # done keys are not appended again
    []
    """
    from certkd.progress import Progress

    new: list[Record] = []
    with Progress(len(work), desc, "batch", enabled=progress) as bar:
        for item in work:
            new += log.add(compute(item))
            bar.update(1, label(item) if label is not None else None)
    return new


# --------------------------------------------------------------------------- shards

def batches(indices: Sequence[int], batch_size: int, shard: Shard | None = None) -> list[tuple[int, list[int]]]:
    """``(batch_number, indices)`` of the batches a shard owns: batch ``b`` belongs to shard ``b mod n``.

    Batches are cut from the whole index list first, so a shard's batches are exactly those of a
    single run and per-batch random streams coincide (shards + merge = one run).

    Parameters
    ----------
    indices : sequence of int
        The evaluated points, in order.
    batch_size : int
        Points per batch.
    shard : (k, n), optional
        Keep only shard ``k`` of ``n``.

    Returns
    -------
    list of (int, list of int)
        Batch number and its indices.

    Example
    -------
    >>> batches(range(5), 2, (1, 2))
    [(1, [2, 3])]
    """
    cut = [(b, [int(i) for i in indices[s:s + batch_size]]) for b, s in enumerate(range(0, len(indices), batch_size))]
    if shard is None:
        return cut
    k, n = shard
    return [(b, idx) for b, idx in cut if b % n == k]


def shard_indices(config: Mapping[str, Any]) -> list[int]:
    """The points a run of ``config`` evaluates: its shard's batches of the first ``num_examples`` points.

    Example
    -------
    >>> shard_indices({"num_examples": 5, "batch_size": 2, "shard": [1, 2]})
    [2, 3]
    """
    shard = (int(config["shard"][0]), int(config["shard"][1])) if config.get("shard") else None
    return [i for _, idx in batches(range(int(config["num_examples"])), int(config["batch_size"]), shard) for i in idx]


def parse_shard(value: str | None) -> Shard | str | None:
    """``"k/n"`` (0 <= k < n) -> ``(k, n)``; ``"auto"`` stays ``"auto"``; None stays None.

    Parameters
    ----------
    value : str or None
        What ``--shard`` got.

    Returns
    -------
    (int, int), "auto" or None
        ``CertkdError`` for anything else.

    Example
    -------
    >>> parse_shard("1/4"), parse_shard("auto")
    ((1, 4), 'auto')
    """
    if value is None or value == "auto":
        return value
    try:
        k, n = (int(s) for s in value.split("/"))
    except ValueError:
        raise CertkdError(f"shard {value!r} must look like k/n (e.g. 0/4) or auto") from None
    if n < 1 or not 0 <= k < n:
        raise CertkdError(f"shard {value!r} needs 0 <= k < n")
    return k, n


TORCHRUN = "torchrun"
SLURM = "slurm"


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[Shard, str]:
    """``(shard, launcher)`` of this process: torchrun (``RANK``, ``WORLD_SIZE``) or a Slurm job array.

    Slurm: ``SLURM_ARRAY_TASK_ID`` counted from ``SLURM_ARRAY_TASK_MIN`` in steps of
    ``SLURM_ARRAY_TASK_STEP``, out of ``SLURM_ARRAY_TASK_COUNT``.

    Parameters
    ----------
    env : mapping, optional
        The environment (default ``os.environ``).

    Returns
    -------
    ((int, int), str)
        The shard and ``"torchrun"`` or ``"slurm"``; ``CertkdError`` when neither launcher is there.

    Example
    -------
    >>> shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"})
    ((2, 4), 'slurm')
    """
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            shard, launcher = (int(env["RANK"]), int(env["WORLD_SIZE"])), TORCHRUN
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
            k = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))) // step
            shard, launcher = (k, int(env["SLURM_ARRAY_TASK_COUNT"])), SLURM
        else:
            raise CertkdError("--shard auto found neither torchrun (RANK, WORLD_SIZE) nor a Slurm job array "
                              "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); give --shard k/n")
    except ValueError:
        raise CertkdError("--shard auto: the launcher's rank variables are not integers") from None
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise CertkdError(f"--shard auto: {launcher} gives shard {k} of {n}, outside 0..{n - 1}")
    return shard, launcher


def resolve_shard(spec: Shard | str | None) -> tuple[Shard | None, str | None]:
    """``(shard, launcher)``: ``auto`` from the environment, an explicit ``(k, n)`` as given.

    Parameters
    ----------
    spec : (k, n), "auto" or None
        What the user asked for.

    Returns
    -------
    ((int, int) or None, str or None)
        The launcher is None unless ``auto``.

    Example
    -------
    >>> resolve_shard((1, 3)), resolve_shard(None)
    (((1, 3), None), (None, None))
    """
    if spec == "auto":
        return shard_from_env()
    if isinstance(spec, str):
        raise CertkdError(f"shard {spec!r} must be k/n or auto")
    return spec, None


def shard_path(path: Path | None, shard: Shard | None) -> Path | None:
    """The file of one shard of an automatically sharded run.

    Parameters
    ----------
    path : Path or None
        The run's file (or directory).
    shard : (k, n) or None
        The shard.

    Returns
    -------
    Path or None
        ``path`` itself without a shard.

    Example
    -------
    >>> shard_path(Path("out/r.jsonl"), (0, 4)).as_posix()
    'out/r.shard0of4.jsonl'
    """
    if path is None or shard is None:
        return path
    return path.with_name(f"{path.stem}.shard{shard[0]}of{shard[1]}{path.suffix}")


def gather_shards(command: str, config: Mapping[str, Any], records: list[Record],
                  shard: Shard | None) -> list[tuple[str, Record, list[Record]]] | None:
    """torchrun: every rank's ``(name, header, records)`` on rank 0, in rank order, ready for :func:`merge_logs`.

    Gathered over a gloo process group, created here from torchrun's environment when none exists
    and destroyed afterwards.

    Parameters
    ----------
    command, config, records
        This rank's run (its ``config`` holds its shard).
    shard : (rank, world size) or None
        This rank's shard.

    Returns
    -------
    list or None
        The parts on rank 0; None on the other ranks.
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((f"rank {shard[0] if shard else 0}", header(command, config), records), out, dst=0)
        return out
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- merge

Part = tuple[str, Record | None, list[Record]]


def merge_logs(parts: Sequence[Part], expected: Callable[[dict[str, Any]], set[Key]],
               key: Callable[[Record], Key], resume_hint: str) -> tuple[str, dict[str, Any], list[Record]]:
    """Combine the logs ``(name, header, records)`` of the shards of one run.

    Checks: one command and one configuration (up to ``shard``), every shard ``k/n``
    exactly once, disjoint indices, each shard complete.

    Parameters
    ----------
    parts : sequence of (str, dict or None, list of dict)
        Each shard's name, header and records.
    expected : callable
        A shard's configuration -> the keys it must hold.
    key : callable
        Record -> done-key.
    resume_hint : str
        The command that finishes an incomplete shard (for the message).

    Returns
    -------
    (str, dict, list of dict)
        The command, the configuration of the whole run (``shard`` None) and all records.

    Example
    -------
    >>> part = lambda k: (f"s{k}", {"command": "x", "config": {"shard": [k, 2]}}, [{"index": k}])
    >>> merge_logs([part(1), part(0)], lambda c: {(c["shard"][0],)}, lambda r: (r["index"],), "")[1]
    {'shard': None}
    """
    if not parts:
        raise CertkdError("nothing to merge: give the record files of the shards")
    for name, head, _ in parts:
        if head is None:
            raise CertkdError(f"{name}: empty record file (no run header)")
    heads = [h for _, h, _ in parts if h is not None]
    first_name, first = parts[0][0], heads[0]
    for (name, _, _), head in zip(parts[1:], heads[1:], strict=True):
        diff = ([] if head["command"] == first["command"] else ["command"]) + config_differences(
            first["config"], head["config"], ["shard"])
        if diff:
            raise CertkdError(f"{name} and {first_name} come from different runs (they differ in {', '.join(diff)})")
    shards = [tuple(h["config"]["shard"]) if h["config"].get("shard") else None for h in heads]
    if None in shards:
        if len(parts) > 1:
            raise CertkdError("an unsharded run cannot be merged with other files")
    else:
        _check_shard_set([name for name, _, _ in parts], shards)  # type: ignore[arg-type]
    owner: dict[int, str] = {}
    merged: list[Record] = []
    for (name, _, records), head in zip(parts, heads, strict=True):
        for i in {int(r["index"]) for r in records}:
            if owner.setdefault(i, name) != name:
                raise CertkdError(f"{name} and {owner[i]} both hold example {i}: the shards overlap")
        missing = expected(head["config"]) - {key(r) for r in records}
        if missing:
            raise CertkdError(f"{name} is incomplete ({len(missing)} records missing): finish it with {resume_hint}")
        merged.extend(records)
    return first["command"], dict(first["config"], shard=None), merged


def _check_shard_set(names: list[str], shards: list[Shard]) -> None:
    total = shards[0][1]
    if len({n for _, n in shards}) != 1:
        raise CertkdError("the files come from splits into different numbers of shards")
    seen: dict[int, str] = {}
    for name, (k, _) in zip(names, shards, strict=True):
        if k in seen:
            raise CertkdError(f"{name} and {seen[k]} are both shard {k}/{total}")
        seen[k] = name
    missing = [f"{k}/{total}" for k in range(total) if k not in seen]
    if missing:
        raise CertkdError(f"missing shard(s) {', '.join(missing)}")
