"""Memory-safe batch sizes for bound propagation: a measured per-point cost from one probe pass.

CROWN's memory grows linearly with the batch (about 0.35 GB per point for a LeNet5 on
MNIST on CPU), so a fixed batch size either wastes a large machine or kills a small one.
``plan_batch`` runs one bound pass on a small probe batch, measures the peak memory it
added (CPU: the process's peak resident set, reset before the probe; CUDA: the
allocator's peak), takes ``cost = HEADROOM * peak / probe_size`` per point (the fixed part
of the peak is charged to every point, and a margin covers fragmentation) and chooses
``batch = floor(budget / cost)``, clamped to ``[1, cap]``.

The default budget is a third of the memory available now (``MemAvailable``, or the
cgroup limit when lower; free GPU memory on CUDA). The measurements come from ``/proc``
and ``/sys/fs/cgroup`` (Linux) or CUDA; resetting the peak writes ``/proc/self/clear_refs``,
which is why this lives in certkd and not in ``bounds`` (which touches no file).

Example
-------
>>> plan = plan_batch(lambda n: None, probe_size=2, cap=64, budget_bytes=1 << 30)
>>> 1 <= plan.batch_size <= 64
True
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bounds.errors import UnsupportedModelError
from certkd.errors import CertkdError

if TYPE_CHECKING:
    from bounds.certify import BoundEngine
    from bounds.linearity import LinearityBounder

DEFAULT_FRACTION = 3
"""The default budget is ``available // DEFAULT_FRACTION``."""
MIN_COST_BYTES = 1 << 20
"""A per-point cost below 1 MiB is measurement noise: at least this much is charged per point."""
HEADROOM = 1.25
"""The measured cost per point is multiplied by this: a 2-point probe of CROWN on advertorch's LeNet5
measured 332-358 MB per point where passes of 8-18 points took 400-420 MB per point (allocator
fragmentation across passes, buffers that grow with the batch)."""
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")
_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
_CGROUP_USAGE = (Path("/sys/fs/cgroup/memory.current"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))


@dataclass(frozen=True)
class MemoryPlan:
    """The batch size of each bound pass and how it was chosen (printed and recorded by runs)."""

    batch_size: int
    per_point_bytes: int
    probe_size: int
    budget_bytes: int
    device: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``bound batch 12 (measured 0.35 GB per point, budget 7.6 GB)``."""
        return (f"bound batch {self.batch_size} (measured {format_bytes(self.per_point_bytes)} per point on "
                f"{self.device}, budget {format_bytes(self.budget_bytes)})")


def parse_memory(text: str | int | float) -> int:
    """``"4G"``, ``"512MB"``, ``"2.5GiB"``, ``"1e9"`` or a number of bytes -> bytes (``CertkdError`` if not).

    >>> parse_memory("2G"), parse_memory("512M"), parse_memory(1000)
    (2147483648, 536870912, 1000)
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
        if not match:
            raise CertkdError(f"memory must be a size such as 4G, 512M or a number of bytes, got {text!r}")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 1:
        raise CertkdError(f"memory must be a positive size, got {text!r}")
    return int(value)


def format_bytes(n: int | float) -> str:
    """``1.5 GB``-style text (powers of 1024)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _status_kb(field: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int:
    """The resident set of this process in bytes (0 where ``/proc`` is missing)."""
    return _status_kb("VmRSS") or 0


def peak_rss() -> int:
    """The peak resident set of this process (``VmHWM``; since the last ``reset_peak_rss``)."""
    peak = _status_kb("VmHWM")
    if peak is None:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return peak


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux ``clear_refs`` 5); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def available_cpu_memory() -> int:
    """Memory this process may still use: ``MemAvailable``, capped by the cgroup limit's remaining room."""
    available = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        available = None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_path, usage_path in zip(_CGROUP_FILES, _CGROUP_USAGE, strict=True):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            available = min(available, max(limit - usage, 0))
    return int(available)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free memory of ``device``: CUDA's free memory, else ``available_cpu_memory()``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return available_cpu_memory()


def default_budget(device: str | torch.device = "cpu") -> int:
    """A third of the memory available now on ``device`` (the ``--max-memory`` default)."""
    return max(available_memory(device) // DEFAULT_FRACTION, 1)


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so a later peak is measured from
    what is really in use; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


class _RssSampler:
    """Polls the resident set every millisecond: the peak where ``VmHWM`` cannot be reset."""

    def __init__(self) -> None:
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


@contextmanager
def measure_peak(device: str | torch.device = "cpu") -> Iterator[dict[str, int]]:
    """Measure the peak memory a block adds over what was in use when it started.

    Yields a dict whose ``"bytes"`` is filled in when the block ends. CPU: peak resident set
    minus the resident set at the start; CUDA: the allocator's peak minus its start.
    """
    dev = torch.device(device)
    result = {"bytes": 0}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        yield result
        torch.cuda.synchronize(dev)
        result["bytes"] = max(int(torch.cuda.max_memory_allocated(dev)) - start, 0)
        return
    release_free_memory()
    start = current_rss()
    if reset_peak_rss():
        yield result
        result["bytes"] = max(peak_rss() - start, 0)
        return
    with _RssSampler() as sampler:
        yield result
    result["bytes"] = max(sampler.peak - start, 0)


def plan_batch(probe: Callable[[int], object], probe_size: int, cap: int, budget_bytes: int | None = None,
               device: str | torch.device = "cpu") -> MemoryPlan:
    """Run ``probe(probe_size)`` once, measure its peak, and size the bound passes to ``budget_bytes``.

    Parameters
    ----------
    probe : runs one bound pass on ``probe_size`` points (its result is discarded)
    probe_size : points in the probe pass (at least 1)
    cap : the largest batch wanted (e.g. the run's ``--batch-size``)
    budget_bytes : memory one bound pass may add; ``None``: ``default_budget(device)``
    device : where the pass runs

    Returns
    -------
    MemoryPlan
        ``batch_size = clamp(floor(budget / cost), 1, cap)`` with
        ``cost = max(HEADROOM * peak / probe_size, MIN_COST_BYTES)`` (the peak of a pass is
        about affine in the batch, ``a + b n``, and ``peak / n >= b`` for ``a >= 0``; the
        headroom covers what a small probe does not show).
    """
    if probe_size < 1 or cap < 1:
        raise CertkdError(f"probe size and batch cap must be at least 1, got {probe_size} and {cap}")
    budget = default_budget(device) if budget_bytes is None else int(budget_bytes)
    if budget < 1:
        raise CertkdError(f"the memory budget must be positive, got {budget} bytes")
    with measure_peak(device) as used:
        probe(probe_size)
    cost = max(int(math.ceil(HEADROOM * used["bytes"] / probe_size)), MIN_COST_BYTES)
    batch = int(min(max(budget // cost, 1), cap))
    return MemoryPlan(batch_size=batch, per_point_bytes=cost, probe_size=probe_size, budget_bytes=budget,
                      device=str(torch.device(device)))


PROBE_POINTS = 2
"""Points in the probe pass (the first points of the run; their bounds are discarded)."""

PROBE_RETRIES = 4
"""Smaller radii (each a quarter of the last) a probe tries where the relaxation fails at the asked one:
the radius search treats such an eps as not certified and searches below it, so the passes it runs are
probed there."""


def plan_engine(engine: BoundEngine, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str | float,
                method: str, cap: int, budget_bytes: int | None = None) -> MemoryPlan:
    """Probe ``engine.margin_bounds`` on the first ``PROBE_POINTS`` of ``(x, y)`` and set ``engine.batch_size``.

    Every later ``margin_bounds`` / ``certified_radius`` call of the engine then bounds at
    most ``plan.batch_size`` points per auto_LiRPA pass (each point's bounds depend on that
    point only, so the values do not change).

    Example
    -------
    >>> plan = plan_engine(engine, x, y, 2 / 255, "inf", "crown", cap=32)  # doctest: +SKIP
    >>> engine.batch_size == plan.batch_size  # doctest: +SKIP
    True
    """
    def probe(n: int) -> object:
        probe_eps = eps
        for _ in range(PROBE_RETRIES):
            try:
                return engine.margin_bounds(x[:n], y[:n], probe_eps, norm, method)
            except UnsupportedModelError as exc:
                if not isinstance(exc.__cause__, AssertionError):  # a refusal, not a failed relaxation
                    raise
                probe_eps /= 4  # e.g. 0.7.x's reciprocal under LayerNorm at a box-covering radius
        return engine.margin_bounds(x[:n], y[:n], probe_eps, norm, method)

    plan = plan_batch(probe, min(PROBE_POINTS, len(x)), cap, budget_bytes, engine.device)
    engine.batch_size = plan.batch_size
    return plan


def plan_bounder(bounder: LinearityBounder, x: torch.Tensor, y: torch.Tensor, eps: float, target: str, cap: int,
                 budget_bytes: int | None = None) -> MemoryPlan:
    """The same for the certified-gamma passes of a ``bounds.linearity.LinearityBounder`` (sets its ``batch_size``)."""
    def probe(n: int) -> object:
        return bounder.bounds(x[:n], y[:n], eps, target)

    plan = plan_batch(probe, min(PROBE_POINTS, len(x)), cap, budget_bytes, bounder.device)
    bounder.batch_size = plan.batch_size
    return plan


__all__ = ["MemoryPlan", "PROBE_POINTS", "plan_bounder", "plan_engine", "available_memory", "current_rss", "default_budget", "format_bytes", "measure_peak",
           "parse_memory", "peak_rss", "plan_batch", "reset_peak_rss"]
