"""Progress on stderr for long commands: a tqdm bar on a terminal, one line per finished stage elsewhere.

A bar redraws itself with ``\\r`` hundreds of times; in a log file (stderr not a terminal)
that is noise, so there each stage ends with one line instead::

    certify: 12/12 batches in 41.3s

``--no-progress`` silences both.

Example
-------
>>> with Progress(3, "certify", "batch", enabled=False) as bar:
...     for _ in range(3):
...         bar.update()
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any


def stderr_is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one stage of ``total`` steps.

    Parameters
    ----------
    total : steps in the stage
    desc : the stage's name (``"certify"``, ``"train epoch 3/10"``)
    unit : what a step is (``"batch"``)
    enabled : False for ``--no-progress``: nothing is written
    stream : where to write (default stderr); a bar only when it is a terminal
    """

    def __init__(self, total: int, desc: str, unit: str = "step", enabled: bool = True,
                 stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self._start = time.perf_counter()
        self._bar: Any = None
        if enabled and stderr_is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, status: str | None = None) -> None:
        """Count ``n`` finished steps; ``status`` is shown beside a bar (ignored in line mode)."""
        self.done += n
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status)
            self._bar.update(n)

    def note(self, message: str) -> None:
        """A line of its own (e.g. the chosen bound batch size), without breaking a bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """End the stage: close the bar, or write its one summary line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            plural = "" if self.total == 1 else "es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s"
            elapsed = time.perf_counter() - self._start
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}{plural} in {elapsed:.1f}s",
                  file=self.stream, flush=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and self._bar is None:
            self.enabled = False  # a failed stage prints its error, not a summary line
        self.close()


__all__ = ["Progress", "stderr_is_terminal"]
