"""Shared plumbing of the file-backed datasets: where data lives, opt-in downloads, lazy torchvision."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import cast

from certkd.errors import DataError

DATA_DIR_ENV = "CERTKD_DATA_DIR"
DOWNLOAD_ENV = "CERTKD_DOWNLOAD"
DEFAULT_DATA_DIR = Path("data")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$CERTKD_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def download_requested() -> bool:
    """True when the user opted in to downloads with ``CERTKD_DOWNLOAD=1`` (never by default)."""
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def import_torchvision(purpose: str) -> ModuleType:
    """Import torchvision lazily; without it, one DataError sentence naming the install command."""
    try:
        import torchvision
    except ImportError:
        raise DataError(f"{purpose} needs torchvision, which is not installed: "
                        f"pip install 'certkd[vision]' (or pip install torchvision)") from None
    return cast(ModuleType, torchvision)  # torchvision has no type information


def torchvision_download(dataset_class: str, root: Path, **kwargs: object) -> None:
    """Download through ``torchvision.datasets.<dataset_class>(root, download=True)``; failures are DataError."""
    torchvision = import_torchvision(f"downloading {dataset_class} ({DOWNLOAD_ENV}=1)")
    try:
        getattr(torchvision.datasets, dataset_class)(root=str(root), download=True, **kwargs)
    except Exception as exc:  # network, disk and checksum failures all end the same way for the user
        raise DataError(f"downloading {dataset_class} into {root} failed: {' '.join(str(exc).split())}") from None
