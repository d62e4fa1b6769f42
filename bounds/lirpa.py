"""Importing auto_LiRPA on today's stack: runtime compatibility shims (docs/auto_lirpa.md).

PyPI's auto_LiRPA 0.3 does not import on torch 2.13 + numpy 2. ``import_auto_lirpa()``
applies four runtime patches, each only when the installed versions need it (the
installed auto_LiRPA is older than 0.4 *and* the feature it relies on is missing),
then imports auto_LiRPA and undoes the global state its import changes (warnings
filters, the root logger). A newer auto_LiRPA (0.6+) gets no patch at all. No
installed file is ever edited. ``APPLIED_SHIMS`` records what was done.

The shims lean on private torch internals; they are tested with torch 2.13
(``TESTED_TORCH``). Where a needed internal cannot be found, the import fails
with one sentence (``AutoLirpaMissing``).
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from packaging.version import InvalidVersion, Version

from bounds.errors import AutoLirpaMissing

INSTALL_HINT = "pip install --no-deps auto-LiRPA==0.3"
TESTED_TORCH = ("2.13",)  # torch versions the shims below were tested with
LEGACY_BEFORE = Version("0.4")  # auto_LiRPA releases older than this need the shims
LEGACY_OPSET = 12  # the ONNX opset auto_LiRPA 0.3's graph parser asks for

# name -> True (applied) / False (checked, not needed); filled by import_auto_lirpa()
APPLIED_SHIMS: dict[str, bool] = {}

_MODULE: types.ModuleType | None = None


class _NamedMembers(Protocol):
    """A class with torch's private ``_named_members`` (``nn.Module``, auto_LiRPA's ``BoundedModule``)."""

    def _named_members(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]: ...


class _OnnxGlobals(Protocol):
    """The TorchScript ONNX exporter's global state (``GLOBALS``): the part auto_LiRPA 0.3 relies on."""

    export_onnx_opset_version: int


def auto_lirpa_version() -> str | None:
    """The installed auto_LiRPA version (read from package metadata, no import), or None."""
    try:
        return importlib.metadata.version("auto_LiRPA")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_legacy(version: str | None) -> bool:
    """True for auto_LiRPA releases older than 0.4 (the ones written for torch < 2)."""
    if version is None:
        return False
    try:
        return Version(version) < LEGACY_BEFORE
    except InvalidVersion:
        return False


def _module_exists(name: str) -> bool:
    if name in sys.modules:  # also a shim of an earlier, failed import attempt (no __spec__)
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --- conditions: pure functions of the module state they inspect (testable with fakes) ---

def needs_arraysetops(module_exists: Callable[[str], bool] = _module_exists) -> bool:
    """Shim 1 is needed when ``numpy.lib.arraysetops`` is gone (numpy >= 2)."""
    return not module_exists("numpy.lib.arraysetops")


def needs_set_opset_version(symbolic_helper: object | None = None) -> bool:
    """Shim 2 is needed when ``torch.onnx.symbolic_helper._set_opset_version`` is gone."""
    if symbolic_helper is None:
        import torch.onnx.symbolic_helper as symbolic_helper
    return not hasattr(symbolic_helper, "_set_opset_version")


def needs_node_getitem(node_class: type = torch._C.Node) -> bool:
    """Shim 3 is needed when ``torch._C.Node`` is no longer subscriptable."""
    return not hasattr(node_class, "__getitem__")


def needs_named_members(bounded_module_class: type[_NamedMembers],
                        module_class: type[_NamedMembers] = torch.nn.Module) -> bool:
    """Shim 4 is needed when torch passes ``remove_duplicate`` and auto_LiRPA does not accept it."""
    torch_params = inspect.signature(module_class._named_members).parameters
    lirpa_params = inspect.signature(bounded_module_class._named_members).parameters
    return "remove_duplicate" in torch_params and "remove_duplicate" not in lirpa_params


# --- the patches ---

def _patch_arraysetops() -> None:
    # Fixes: ModuleNotFoundError: No module named 'numpy.lib.arraysetops'
    # (auto_LiRPA/operators/base.py does `from numpy.lib.arraysetops import isin`).
    import numpy

    shim = types.ModuleType("numpy.lib.arraysetops")
    vars(shim)["isin"] = numpy.isin
    sys.modules["numpy.lib.arraysetops"] = shim


def _onnx_globals() -> _OnnxGlobals:
    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        if _module_exists(name):
            globals_: _OnnxGlobals = importlib.import_module(name).GLOBALS
            return globals_
    raise AutoLirpaMissing(
        f"auto_LiRPA 0.3 cannot be used with torch {torch.__version__} (its ONNX opset state was not "
        f"found; the shims are tested with torch {', '.join(TESTED_TORCH)}): install a newer auto_LiRPA "
        f"or a tested torch.")


def _patch_set_opset_version() -> None:
    # Fixes: ImportError: cannot import name '_set_opset_version' from 'torch.onnx.symbolic_helper'
    # (auto_LiRPA/parse_graph.py). The opset now lives in the TorchScript exporter's GLOBALS; the
    # patch really sets it (0.3 asks for 12): leaving opset 20 breaks every mean with KeyError: 'axes'.
    import torch.onnx.symbolic_helper as symbolic_helper

    onnx_globals = _onnx_globals()

    def _set_opset_version(opset_version: int) -> None:
        onnx_globals.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]  # the shim adds it


def _patch_node_getitem() -> None:
    # Fixes: TypeError: 'torch._C.Node' object is not subscriptable (parse_graph.py reads
    # attributes as node[k]); an attribute is read through its kind, e.g. node.i(k) for an int.
    def _getitem(node: torch._C.Node, key: str) -> object:
        return getattr(node, node.kindOf(key))(key)

    torch._C.Node.__getitem__ = _getitem  # type: ignore[method-assign]  # the shim


def _patch_named_members(bounded_module_class: type[_NamedMembers]) -> None:
    # Fixes: TypeError: BoundedModule._named_members() got an unexpected keyword argument
    # 'remove_duplicate' (torch >= 2.0 parameters()/buffers() pass it; CROWN calls it on ResNets).
    original = bounded_module_class._named_members

    def _named_members(self: _NamedMembers,
                       get_members_fn: Callable[[torch.nn.Module], Iterator[tuple[str, Any]]],
                       prefix: str = "", recurse: bool = True,
                       remove_duplicate: bool = True) -> Iterator[tuple[str, Any]]:
        return original(self, get_members_fn, prefix, recurse)

    bounded_module_class._named_members = _named_members  # type: ignore[method-assign]  # the shim


class _RecentRecords(logging.Handler):
    """auto_LiRPA's last log records, kept instead of printed (they name the operators it does not support)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=64)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOG_RECORDS = _RecentRecords()


def silence_logging() -> None:
    """Route every ``auto_LiRPA.*`` logger (``auto_LiRPA.utils`` sets its own level) into ``LOG_RECORDS`` only.

    Records reach the ``auto_LiRPA`` logger, are kept there and go no further: nothing on
    stderr, not even through ``logging.lastResort``. Idempotent; run at import and by
    ``bounds.graph.lirpa_call``.
    """
    logger = logging.getLogger("auto_LiRPA")
    logger.propagate = False
    if LOG_RECORDS not in logger.handlers:
        logger.addHandler(LOG_RECORDS)


def reset_optimization(bounded: Any) -> None:
    """Leave no alpha-CROWN state behind in a ``BoundedModule`` after a failed call.

    alpha-CROWN puts every optimizable activation in stage ``"init"``/``"opt"`` and back to
    ``None`` only when the optimization ends; an exception in between leaves the stage set,
    and every later CROWN or CROWN-IBP pass then uses the stale alpha slopes (shape
    assertions). Setting the stage back restores the plain relaxations.
    """
    for node in getattr(bounded, "_modules", {}).values():
        if getattr(node, "opt_stage", None) is not None:
            node.opt_stage = None


def _restore_root_logger(root_handlers: list[logging.Handler], root_level: int) -> None:
    """Undo auto_LiRPA's ``logging.basicConfig`` (a stdout handler on the root logger)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in root_handlers:
            root.removeHandler(handler)
    root.setLevel(root_level)


def import_auto_lirpa() -> types.ModuleType:
    """Import auto_LiRPA with the shims it needs on this stack (see the module docstring).

    Raises ``AutoLirpaMissing`` (one sentence) when it is not installed or cannot be made to import.
    """
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    version = auto_lirpa_version()
    if version is None:
        raise AutoLirpaMissing(f"auto_LiRPA is not installed: run `{INSTALL_HINT}`.")
    legacy = is_legacy(version)
    before: dict[str, tuple[Callable[[], bool], Callable[[], None]]] = {
        "numpy_arraysetops": (needs_arraysetops, _patch_arraysetops),
        "onnx_set_opset_version": (needs_set_opset_version, _patch_set_opset_version),
        "node_getitem": (needs_node_getitem, _patch_node_getitem),
    }
    for name, (needed, patch) in before.items():
        APPLIED_SHIMS[name] = legacy and needed()
        if APPLIED_SHIMS[name]:
            patch()
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    try:
        # restores the filters auto_LiRPA sets to 'once'; record=True keeps its import-time warnings
        # (torch.jit.script deprecated) off stderr even after it resets the filters
        with warnings.catch_warnings(record=True):
            module = importlib.import_module("auto_LiRPA")
    except Exception as exc:  # any import failure becomes one sentence for the user
        raise AutoLirpaMissing(
            f"auto_LiRPA {version} does not import with torch {torch.__version__} "
            f"({type(exc).__name__}: {exc}); run `{INSTALL_HINT}`.") from exc
    finally:
        _restore_root_logger(root_handlers, root_level)
    silence_logging()
    APPLIED_SHIMS["named_members_remove_duplicate"] = legacy and needs_named_members(module.BoundedModule)
    if APPLIED_SHIMS["named_members_remove_duplicate"]:
        _patch_named_members(module.BoundedModule)
    if legacy and torch_minor_version() not in TESTED_TORCH:
        _self_test(module, version)
    _MODULE = module
    return module


def torch_minor_version() -> str:
    """``"2.13"`` for torch 2.13.0+cpu."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _self_test(module: types.ModuleType, version: str) -> None:
    """On a torch the shims were not tested with, bound a tiny network once and compare with its output."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 2))
    x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    try:
        bounded = module.BoundedModule(net, torch.zeros(1, 1, 5, 5))
        list(bounded.parameters())
        with torch.no_grad():
            ptb = module.PerturbationLpNorm(norm=math.inf, eps=0.0)
            lower, upper = bounded.compute_bounds(x=(module.BoundedTensor(x, ptb),), method="CROWN")
            ok = torch.allclose(lower, net(x), atol=1e-5) and torch.allclose(upper, net(x), atol=1e-5)
    except Exception as exc:  # any failure is the same sentence for the user
        raise AutoLirpaMissing(
            f"auto_LiRPA {version} fails on torch {torch.__version__} ({type(exc).__name__}); the shims are "
            f"tested with torch {', '.join(TESTED_TORCH)}: install one of those or a newer auto_LiRPA.") from exc
    if not ok:
        raise AutoLirpaMissing(
            f"auto_LiRPA {version} computes wrong bounds on torch {torch.__version__}; the shims are tested "
            f"with torch {', '.join(TESTED_TORCH)}: install one of those or a newer auto_LiRPA.")


def onnx_opset_version() -> int:
    """The ONNX opset the TorchScript exporter (and so auto_LiRPA's parser) currently uses."""
    return int(_onnx_globals().export_onnx_opset_version)
