"""One registry mechanism for models, datasets, training objectives and certify methods.

A :class:`Registry` maps names to entries (builders, loaders, specs). Built-in entries
register themselves at import time; installed packages add entries through an
entry-point group (timm style), e.g. in their ``pyproject.toml``::

    [project.entry-points."certkd.models"]
    lenet5 = "my_package.models:lenet5"

Only entry points of packages that are already installed are ever imported, and only
when a name is looked up or listed: nothing named by a checkpoint or a config file is
imported, so a checkpoint never runs code.

Example
-------
>>> reg = Registry("widget")
>>> @reg.register()
... def square(x: int) -> int:
...     return x * x
>>> reg.get("square")(3), reg.names()
(9, ['square'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

from certkd.errors import CertkdError

T = TypeVar("T")

BUILTIN = "certkd"
"""The provider name of entries that ship with certkd."""


@dataclass(frozen=True)
class Provider:
    """Who supplies a registry entry: ``certkd`` itself or an installed distribution."""

    package: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version}


def builtin_provider() -> Provider:
    from certkd import __version__

    return Provider(BUILTIN, __version__)


class Registry(Generic[T]):
    """Named entries of one kind, with their providers, plus lazily loaded entry-point plugins.

    Parameters
    ----------
    kind : str
        What an entry is, for messages (``"model"``, ``"dataset"``, ...).
    group : str or None
        The entry-point group whose installed entry points are plugins (``"certkd.models"``).
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._providers: dict[str, Provider] = {}
        self._plugins: dict[str, metadata.EntryPoint] | None = None

    # ------------------------------------------------------------------ registration
    def add(self, name: str, entry: T, provider: Provider | None = None) -> T:
        """Register ``entry`` under ``name`` (a later registration of the same name replaces it)."""
        self._entries[name] = entry
        self._providers[name] = provider or builtin_provider()
        return entry

    def remove(self, name: str) -> None:
        """Forget the entry registered as ``name`` at run time (an installed plugin stays listed)."""
        self._entries.pop(name, None)
        self._providers.pop(name, None)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; the name defaults to the function's ``__name__``."""
        def deco(entry: T) -> T:
            return self.add(name or entry.__name__, entry)  # type: ignore[attr-defined]
        return deco

    # ------------------------------------------------------------------ plugins
    def _plugin_points(self) -> dict[str, metadata.EntryPoint]:
        if self._plugins is None:
            self._plugins = {}
            if self.group is not None:
                for point in metadata.entry_points(group=self.group):
                    self._plugins.setdefault(point.name, point)
        return self._plugins

    def refresh_plugins(self) -> None:
        """Forget the cached entry-point scan (after installing a package in the same process)."""
        self._plugins = None

    def _load_plugin(self, name: str) -> None:
        point = self._plugin_points()[name]
        dist = point.dist
        provider = Provider(dist.name, dist.version) if dist is not None else Provider(point.module, "unknown")
        try:
            entry = point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's one-line error
            raise CertkdError(f"the {self.kind} plugin {name!r} from package {provider.package} "
                              f"failed to load: {type(exc).__name__}: {exc}") from None
        self.add(name, entry, provider)

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        """Every registered name, built-in and plugin, sorted."""
        return sorted(set(self._entries) | set(self._plugin_points()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._plugin_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises ``CertkdError`` listing the known ones."""
        if name not in self._entries and name in self._plugin_points():
            self._load_plugin(name)
        if name not in self._entries:
            raise CertkdError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def provider(self, name: str) -> Provider:
        """Who supplies ``name`` (loads a plugin entry if needed)."""
        self.get(name)
        return self._providers[name]

    def provider_of_package(self, package: str) -> bool:
        """Whether an installed entry point of this group comes from distribution ``package``."""
        return any(p.dist is not None and p.dist.name == package for p in self._plugin_points().values())


def describe(fn: Callable[..., object]) -> str:
    """The first line of ``fn``'s docstring (what ``certkd models``/``datasets``/... print)."""
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
