"""One run of a command, the same for every command and the Python API (:class:`Run`).

A command declares what it computes per point (its work items and ``compute``) and how it
summarizes; the :class:`Run` does the rest, the same way everywhere:

- **configuration**: one builder (:meth:`Run.configure`: where the points come from, then the
  command's job), hashed (:attr:`Run.config_sha256`) and written as the record log's header;
- **record log, resume and overwrite**: :meth:`Run.open_log` (``certkd.runs.RecordLog``: a run
  continues only with an unchanged configuration);
- **shards**: ``k/n``, torchrun or Slurm arrays (:meth:`Run.start` resolves them; Slurm tasks and
  torchrun ranks write ``NAME.shardKofN.EXT`` files), gathered on torchrun's rank 0 by
  :meth:`Run.finish` or later by ``certkd merge``;
- **memory plan**: :meth:`Run.plan_memory` sizes every bound pass from one measured probe;
- **progress** and **summary**: :meth:`Run.execute` and :meth:`Run.finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from certkd.errors import CertkdError
from certkd.runs import (
    SLURM,
    TORCHRUN,
    Key,
    Part,
    Points,
    Record,
    RecordLog,
    Shard,
    config_sha256,
    execute,
    gather_shards,
    resolve_shard,
    shard_path,
)

W = TypeVar("W")
R = TypeVar("R")


@dataclass
class Run:
    """What every command run shares; build it with :meth:`start`.

    Example
    -------
    >>> run = Run.start("demo-command", key=lambda r: (r["index"],))
    >>> run.configure({"model_sha256": "ab"}, {"batch_size": 4})["batch_size"]
    4
    >>> with run.open_log(None):
    ...     new = run.execute([0, 1], lambda i: [{"index": i, "value": 2 * i}], "demo")
    >>> run.finish(lambda config, records: sum(r["value"] for r in records))
    2
    """

    command: str
    key: Callable[[Record], Key]
    shard: Shard | None = None
    launcher: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = False
    max_memory: int | None = None
    notify: Callable[[str], None] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    plans: list[dict[str, Any]] = field(default_factory=list)
    log: RecordLog | None = None

    @classmethod
    def start(cls, command: str, key: Callable[[Record], Key], shard: Shard | str | None = None, *,
              out: Path | None = None, out_kind: str | None = None, resume: bool = False, overwrite: bool = False,
              progress: bool = False, max_memory: int | None = None,
              notify: Callable[[str], None] | None = None) -> Run:
        """A run of ``command``: its shard resolved (``k/n``, ``auto``: torchrun or Slurm) and its output checked.

        ``out_kind`` ``"dir"``: ``out`` is the run's folder (the record log lives there), so
        ``--resume`` and ``--shard`` need it; ``"file"``: ``out`` is the record log itself.
        """
        resolved, launcher = resolve_shard(shard)
        if out_kind is not None:
            what = "--out DIR" if out_kind == "dir" else "--per-example FILE"
            if out_kind == "dir" and out is not None and out.exists() and not out.is_dir():
                raise CertkdError(f"{out} is a file; --out takes a directory")
            if resume and out is None:
                raise CertkdError(f"--resume needs {what} (the record log of the interrupted run)")
            if resolved is not None and out is None and out_kind == "dir":
                raise CertkdError(f"--shard needs {what} (certkd merge combines the shards' records)")
        return cls(command, key, resolved, launcher, resume, overwrite, progress, max_memory, notify)

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

    def open_log(self, path: Path | None) -> RecordLog:
        """The record log (``None``: in memory), resumed or overwritten as asked; a torchrun rank
        writes its own ``NAME.shardKofN.EXT``."""
        if self.launcher == TORCHRUN:
            path = shard_path(path, self.shard)
        self.log = RecordLog.open(path, self.command, self.config, self.key, resume=self.resume,
                                  overwrite=self.overwrite)
        return self.log

    def plan_memory(self, tools: Sequence[Any], data: Points, count: int, method: str, eps: float | None,
                    norm: str, cap: int, target: str | None = None) -> list[dict[str, Any]]:
        """Size the bound passes of ``tools`` (``plan_bound_memory``); the plans go into the summary."""
        plans = plan_bound_memory(tools, data, count, method, eps, norm, cap, self.max_memory, self.notify, target)
        self.plans.extend(plans)
        return plans

    def execute(self, work: Sequence[W], compute: Callable[[W], list[Record]], stage: str,
                label: Callable[[W], str] | None = None) -> list[Record]:
        """Run the missing work items into the log, with progress (``certkd.runs.execute``)."""
        assert self.log is not None, "open the record log first"
        return execute(work, compute, self.log, self.progress, stage, label=label)

    def finish(self, summarize: Callable[[dict[str, Any], list[Record]], R],
               merge: Callable[[Sequence[Part]], R] | None = None, shard_summary: bool = False) -> R | None:
        """The summary of the whole run, or None for a part of it.

        torchrun: rank 0 gathers every rank's records and ``merge``s them (other ranks: None);
        a ``k/n`` or Slurm shard: None (``certkd merge`` combines the files), unless
        ``shard_summary`` (then the summary of this shard's points); otherwise ``summarize``.
        """
        assert self.log is not None, "open the record log first"
        records = self.log.records
        if self.launcher == TORCHRUN and merge is not None:
            parts = gather_shards(self.command, self.config, records, self.shard)
            return None if parts is None else merge(parts)
        if self.shard is not None and not shard_summary:
            return None
        return summarize(self.config, records)


def plan_bound_memory(tools: Sequence[Any], data: Points, count: int, method: str, eps: float | None, norm: str,
                      cap: int, max_memory: int | None = None, notify: Callable[[str], None] | None = None,
                      target: str | None = None) -> list[dict[str, Any]]:
    """Size every bound pass of ``tools`` to ``max_memory`` from one measured probe pass each (certkd.memory).

    Parameters
    ----------
    tools : BoundEngines (``bounds.certify``) or, with ``target``, LinearityBounders (certified gamma)
    data, count : the run's points; the probe reads the first ``certkd.memory.PROBE_POINTS``
    method, eps, norm : what the run bounds (``eps`` None: a radius search, probed at
        ``bounds.norms.default_eps_max``, the ball covering the whole box: every ReLU unstable)
    cap : the run's batch size (a pass never takes more points)
    max_memory : bytes one pass may add (None: a third of the available memory)
    notify : receives one line per plan (``bound batch 9 (measured 350 MB per point ...)``)

    Returns
    -------
    list of dict
        ``MemoryPlan.to_dict()`` per tool, for the run's summary.
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
        plan = (plan_engine(tool, x_t, y_t, e, norm, method, cap, max_memory) if target is None
                else plan_bounder(tool, x_t, y_t, e, target, cap, max_memory))
        if notify is not None:
            notify(plan.describe())
        plans.append(plan.to_dict())
    return plans
