"""A payload that runs code when unpickled: files carrying it must be refused unread."""

from __future__ import annotations

from pathlib import Path


def write_marker(path: str) -> None:
    """What a malicious file would run while being unpickled."""
    Path(path).write_text("code from the file ran")


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (write_marker, (self.marker,))
