"""One run of a command, the same for every command and the Python API (:class:`Run`).

A command declares what it computes per point (its work items and ``compute``) and what the
run layer needs to know of it (:class:`Command`: its records, how shards merge, its summary
and outputs); the :class:`Run` does the rest, the same way everywhere:

- **settings**: :class:`RunSettings`, what every command run shares (points, device, outputs,
  resume, shard, memory, progress);
- **configuration**: one builder (:meth:`Run.configure`: where the points come from, then the
  command's job), hashed (:attr:`Run.config_sha256`) and written as the record log's header;
- **record log, resume and overwrite**: :meth:`Run.open_log` (``certkd.runs.RecordLog``: a run
  continues only with an unchanged configuration);
- **shards**: ``k/n``, torchrun or Slurm arrays (:meth:`Run.start` resolves them; Slurm tasks and
  torchrun ranks write ``NAME.shardKofN.EXT`` files), gathered on torchrun's rank 0 by
  :meth:`Run.finish` or later by ``certkd merge`` (:func:`merge_files`);
- **memory plan**: :meth:`Run.plan_memory` sizes every bound pass from one measured probe;
- **summary and outputs**: :meth:`Run.finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certkd.data import SPLITS, Points
from certkd.errors import CertkdError
from certkd.runs import (
    SLURM,
    TORCHRUN,
    Key,
    Part,
    Record,
    RecordLog,
    Shard,
    config_sha256,
    gather_shards,
    merge_logs,
    read_log,
    resolve_shard,
    shard_path,
    write_log,
)

#: the record log of the commands whose output is a folder (bounds, compare)
PER_EXAMPLE = "per_example.jsonl"
Summary = dict[str, Any]


@dataclass
class RunSettings:
    """What every command run shares (``certkd certify``, ``bounds``, ``compare`` and their functions).

    Each field's ``metadata["help"]`` says what it does (the commands' options are generated from the
    fields). ``out`` is certify's summary JSON (written atomically), or the folder of bounds' and
    compare's ``per_example.jsonl`` (appended as computed), summary and figures; ``notify`` receives
    the run's one-line notes (the memory plan).
    """

    dataset: str | None = field(default=None, metadata={
        "help": "Dataset name (default: the (student) checkpoint's dataset)."})
    split: str = field(default="test", metadata={"choices": SPLITS, "help": "The split of the evaluated points."})
    data_dir: Path | None = field(default=None, metadata={"type": Path, "help": "Where the dataset's files live."})
    num_examples: int | None = field(default=None, metadata={
        "option": ("-n", "--num-examples"), "type": int, "min": 1,
        "help": "Use the first N examples of the split (default: all)."})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu, cuda, cuda:1."})
    out: Path | None = field(default=None, metadata={"cli": False})
    shard: Shard | str | None = field(default=None, metadata={
        "parse": "shard", "help": "Run only part k of n (k/n, 0-based), or 'auto': torchrun (RANK/WORLD_SIZE; rank 0 "
        "gathers and writes everything) or a Slurm job array (SLURM_ARRAY_TASK_ID/COUNT; each task writes "
        "NAME.shardKofN.EXT files). Combine the parts with 'certkd merge'."})
    resume: bool = field(default=False, metadata={
        "help": "Continue the interrupted run in its record log (same configuration only)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Discard the results a previous run left in the output and recompute."})
    progress: bool = field(default=True, metadata={
        "option": "--progress/--no-progress",
        "help": "Progress on stderr: a bar on a terminal, one line per finished stage in logs."})
    max_memory: int | None = field(default=None, metadata={
        "parse": "size", "help": "Memory one bound pass may add, e.g. 4G or 512M (default: a third of the available "
        "RAM, or of the free GPU memory on CUDA). The bound batch is sized from one measured probe pass "
        "(Run.plan_memory); printed and recorded."})
    notify: Callable[[str], None] | None = field(default=None, metadata={"cli": False})


@dataclass(frozen=True)
class Command:
    """What the run layer knows of a command: its records, how its shards merge, its summary and outputs.

    Attributes
    ----------
    name : str
        ``certify``, ``bounds`` or ``compare``: the ``command`` of its record logs' headers.
    key : callable
        Record -> done-key.
    expected : callable
        A shard's configuration -> the keys it must hold (``certkd.runs.merge_logs``).
    order : callable
        (configuration, records) -> the records in the order of one unsharded run.
    summarize : callable
        (configuration, records) -> the summary.
    write : callable
        (out, summary, records): writes the outputs into ``RunSettings.out``.
    format : callable
        Summary -> the text the command prints.
    in_folder : bool
        Its output is a folder that holds its record log (``per_example.jsonl``; bounds, compare);
        else the record log is a file of its own (certify's ``--per-example``).
    shard_summary : bool
        A shard's run summarizes its own points (certify); else only the whole run is summarized.
    merged_provenance : bool
        A merged summary records where it came from (certify); else it has no ``provenance``.
    """

    name: str
    key: Callable[[Record], Key]
    expected: Callable[[dict[str, Any]], set[Key]]
    order: Callable[[dict[str, Any], list[Record]], list[Record]]
    summarize: Callable[[dict[str, Any], list[Record]], Summary]
    write: Callable[[Path, Summary, list[Record]], None]
    format: Callable[[Summary], str]
    in_folder: bool = False
    shard_summary: bool = False
    merged_provenance: bool = False


@dataclass
class Run:
    """What every command run shares; build it with :meth:`start`.

    Example
    -------
    >>> from certkd.runs import execute
    >>> demo = Command("demo", lambda r: (r["index"],), lambda c: set(), lambda c, rs: rs,
    ...                lambda c, rs: {"total": sum(r["value"] for r in rs)}, lambda o, s, rs: None, str)
    >>> run = Run.start(demo, RunSettings(progress=False))
    >>> run.configure({"model_sha256": "ab"}, {"batch_size": 4})["batch_size"]
    4
    >>> with run.open_log() as log:
    ...     new = execute([0, 1], lambda i: [{"index": i, "value": 2 * i}], log)
    >>> run.finish({})
    {'total': 2, 'provenance': {}}
    """

    command: Command
    settings: RunSettings
    shard: Shard | None = None
    launcher: str | None = None
    out: Path | None = None
    log_path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    plans: list[dict[str, Any]] = field(default_factory=list)
    log: RecordLog | None = None

    @classmethod
    def start(cls, command: Command, settings: RunSettings | None = None, log_path: Path | None = None) -> Run:
        """A run of ``command``: its shard resolved (``k/n``, ``auto``: torchrun or Slurm) and its outputs checked.

        ``log_path`` is the record log of a command whose output is no folder (certify's
        ``--per-example``; None: in memory); bounds and compare keep theirs in ``settings.out``.
        """
        settings = settings or RunSettings()
        shard, launcher = resolve_shard(settings.shard)
        given, what = (settings.out, "--out DIR") if command.in_folder else (log_path, "--per-example FILE")
        if command.in_folder and given is not None and given.exists() and not given.is_dir():
            raise CertkdError(f"{given} is a file; --out takes a directory")
        if settings.resume and given is None:
            raise CertkdError(f"--resume needs {what} (the record log of the interrupted run)")
        if shard is not None and given is None and command.in_folder:
            raise CertkdError(f"--shard needs {what} (certkd merge combines the shards' records)")
        run = cls(command, settings, shard, launcher)
        run.out = run.output(settings.out)
        run.log_path = run.out / PER_EXAMPLE if command.in_folder and run.out else run.output(log_path)
        return run

    def output(self, path: Path | None) -> Path | None:
        """Where this run writes ``path``: a Slurm array task writes ``NAME.shardKofN.EXT``."""
        return shard_path(path, self.shard) if self.launcher == SLURM else path

    def configure(self, sources: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """The run's configuration: where its inputs come from (checkpoint hashes, dataset, split,
        number of points), then the command's job; its shard is the run's."""
        self.config = {**sources, **job}
        if "shard" in self.config or self.shard is not None:
            self.config["shard"] = list(self.shard) if self.shard else None
        return self.config

    @property
    def config_sha256(self) -> str:
        """The hash of the configuration: two runs with the same hash compute the same records."""
        return config_sha256(self.config)

    @property
    def records(self) -> list[Record]:
        """Every record of the run's log (none before it is opened)."""
        return self.log.records if self.log is not None else []

    def open_log(self) -> RecordLog:
        """The record log (``log_path``; None: in memory), resumed or overwritten as asked; a torchrun
        rank writes its own ``NAME.shardKofN.EXT``."""
        path = shard_path(self.log_path, self.shard) if self.launcher == TORCHRUN else self.log_path
        self.log = RecordLog.open(path, self.command.name, self.config, self.command.key,
                                  resume=self.settings.resume, overwrite=self.settings.overwrite)
        return self.log

    def plan_memory(self, tools: Sequence[Any], data: Points, count: int, method: str, eps: float | None,
                    norm: str, cap: int, target: str | None = None) -> list[dict[str, Any]]:
        """Size every bound pass of ``tools`` to ``settings.max_memory`` from one measured probe pass each
        (certkd.memory); the plans go into the summary and, one line each, to ``settings.notify``.

        Parameters
        ----------
        tools : BoundEngines (``bounds.certify``) or, with ``target``, LinearityBounders (certified gamma)
        data, count : the run's points; the probe reads the first ``certkd.memory.PROBE_POINTS``
        method, eps, norm : what the run bounds (``eps`` None: a radius search, probed at
            ``bounds.norms.default_eps_max``, the ball covering the whole box: every ReLU unstable)
        cap : the run's batch size (a pass never takes more points)

        Returns
        -------
        list of dict
            ``MemoryPlan.to_dict()`` per tool (``bound batch 9 (measured 350 MB per point ...)``).
        """
        from bounds.norms import default_eps_max
        from certkd.memory import PROBE_POINTS, plan_bounder, plan_engine

        if count == 0 or not tools:
            return []
        x, y = data.batch(list(range(min(PROBE_POINTS, count))))
        e = default_eps_max(norm, tuple(x.shape[1:])) if eps is None else float(eps)
        plans = []
        for tool in tools:
            x_t, y_t = x.to(tool.device), y.to(tool.device)
            plan = (plan_engine(tool, x_t, y_t, e, norm, method, cap, self.settings.max_memory) if target is None
                    else plan_bounder(tool, x_t, y_t, e, target, cap, self.settings.max_memory))
            if self.settings.notify is not None:
                self.settings.notify(plan.describe())
            plans.append(plan.to_dict())
        self.plans.extend(plans)
        return plans

    def summarize(self) -> tuple[Summary, list[Record]]:
        """The summary of the run's records, and the records in the command's order (the Python API's result)."""
        records = self.command.order(self.config, self.records)
        return self.command.summarize(self.config, records), records

    def finish(self, provenance: dict[str, Any]) -> Summary | None:
        """The summary of the whole run with its ``provenance``, written to ``out``; None for a part of it.

        torchrun: rank 0 gathers every rank's records and merges them (:func:`merge_runs`; other
        ranks: None); a ``k/n`` or Slurm shard: None (``certkd merge`` combines the files), except
        certify's (the summary of this shard's points).
        """
        if self.launcher == TORCHRUN:
            parts = gather_shards(self.command.name, self.config, self.records, self.shard)
            return None if parts is None else merge_runs(self.command, parts, self.out, self.log_path, provenance)
        if self.shard is not None and not self.command.shard_summary:
            return None
        summary = self.command.summarize(self.config, self.records)
        summary["provenance"] = provenance
        if self.out is not None:
            self.command.write(self.out, summary, self.records)
        return summary


def merge_runs(command: Command, parts: Sequence[Part], out: Path | None, per_example: Path | None = None,
               provenance: dict[str, Any] | None = None) -> Summary:
    """Merge the shards of one run into the summary of the whole run, written to ``out``.

    Parameters
    ----------
    command : Command
        The command of the run.
    parts : sequence of (str, dict or None, list of dict)
        Each shard's name, header and records (``certkd.runs.merge_logs`` checks them).
    out : Path or None
        certify: the summary JSON; bounds, compare: the folder of the outputs.
    per_example : Path, optional
        Where to write the merged records (bounds, compare: ``out/per_example.jsonl`` by default).
    provenance : dict, optional
        The summary's ``provenance`` when the command records one for merged runs.

    Returns
    -------
    dict
        The summary, equal to that of one unsharded run.
    """
    _, config, records = merge_logs(parts, command.expected, command.key, f"certkd {command.name} ... --resume")
    records = command.order(config, records)
    log = per_example or (out / PER_EXAMPLE if command.in_folder and out is not None else None)
    if log is not None:
        write_log(log, command.name, config, records)
    summary = command.summarize(config, records)
    if command.merged_provenance:
        summary["provenance"] = provenance
    if out is not None:
        command.write(out, summary, records)
    return summary


def merge_files(files: list[Path], out: Path, commands: Sequence[Command], per_example: Path | None = None) -> str:
    """``certkd merge``: the shards' record files (any order) of a run of one of ``commands`` into ``out``.

    The command is read from the files' run headers; returns the text the command prints.
    """
    parts = []
    for path in files:
        if not path.is_file():
            raise CertkdError(f"{path}: no such record file")
        parts.append((str(path), *read_log(path)))
    name = parts[0][1]["command"] if parts[0][1] else None
    command = next((c for c in commands if c.name == name), None)
    if command is None:
        raise CertkdError(f"{files[0]}: certkd merge combines shards of "
                          f"{', '.join(c.name for c in commands[:-1])} or {commands[-1].name}, not {name!r}")
    return command.format(merge_runs(command, parts, out, per_example, {"merged_from": [str(p) for p in files]}))
