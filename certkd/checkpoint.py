"""The certkd checkpoint: one self-contained ``ckpt.pt`` (format version 1).

Saved atomically; loaded with ``torch.load(weights_only=True)`` so a checkpoint
never runs code. Every failure to load is a ``CheckpointError`` with one sentence.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import platform
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bounds.nn import Normalize
from certkd.errors import CertkdError, CheckpointError
from certkd.io import atomic_write
from certkd.registry import BUILTIN, builtin_provider

FORMAT_VERSION = 1
MAGIC = "certkd-checkpoint"
_REQUIRED = ("format", "format_version", "model", "dataset", "input_shape", "num_classes", "normalization",
             "state_dict")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
NORMALIZE_KEYS = ("0.mean", "0.std")
"""The state_dict keys of the Normalize layer every registry model starts with."""


@dataclass
class Checkpoint:
    """The contents of a certkd checkpoint (see ``certkd info``)."""

    model_name: str
    model_kwargs: dict[str, Any]
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: list[float]
    std: list[float]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    model_provider: dict[str, str] = field(default_factory=lambda: builtin_provider().to_dict())

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The registry (or installed plugin) model with these weights, in eval mode.

        Only builders already registered or declared by an installed package's
        ``certkd.models`` entry point are considered (``check_provider``): nothing the
        checkpoint names is imported.
        """
        from certkd.models import create_model

        check_provider(self.model_name, self.model_provider, self._where())
        try:
            model = create_model(self.model_name, num_classes=self.num_classes, input_shape=self.input_shape,
                                 mean=self.mean, std=self.std, **self.model_kwargs)
        except (CertkdError, ValueError) as exc:
            raise CheckpointError(f"{self._where()}: cannot build model {self.model_name!r}: {exc}") from None
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(s.strip() for s in first[1:3]) if len(first) > 1 else first[0]
            raise CheckpointError(f"{self._where()}: weights do not match model {self.model_name!r}: {detail}") \
                from None
        return model.to(device).eval()

    def _where(self) -> str:
        return str(self.path) if self.path else "checkpoint"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MAGIC,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "kwargs": self.model_kwargs, "provider": dict(self.model_provider)},
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "state_dict": self.state_dict,
            "config": self.config,
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    def summary(self) -> dict[str, Any]:
        """Everything but the weights, for ``certkd info`` and reports."""
        d = self.to_dict()
        d.pop("state_dict")
        d["parameters"] = int(sum(t.numel() for k, t in self.state_dict.items()
                                  if k not in NORMALIZE_KEYS and not k.endswith(_BUFFER_SUFFIXES)))
        return d


def check_provider(name: str, provider: dict[str, str], where: str = "checkpoint") -> None:
    """Refuse, in one sentence, a model whose recorded provider package does not supply it here.

    The lookup goes through the model registry only: built-in names and the entry points
    of installed distributions (``importlib.metadata``). The provider string is compared
    with installed distribution names and never imported, so a forged provider cannot
    run code.

    Example
    -------
    >>> check_provider("cnn7", {"package": "certkd", "version": "0.1"})  # built-in: fine
    """
    from certkd.models import MODELS

    package = str(provider.get("package", BUILTIN))
    installed = name in MODELS
    if installed and MODELS.provider(name).package == package:
        return
    if package == BUILTIN:
        if not installed:
            raise CheckpointError(f"{where}: cannot build model: unknown model {name!r}; "
                                  f"available: {', '.join(MODELS.names())}")
        return
    raise CheckpointError(f"{where}: {_provider_problem(name, package, provider.get('version'), installed)}")


def _provider_problem(name: str, package: str, version: str | None, installed: bool) -> str:
    """Why ``package`` cannot supply model ``name`` here, as one clause (metadata only, nothing imported)."""
    from certkd.models import MODELS
    from certkd.models._registry import LOCAL_PROVIDER

    if package.startswith(LOCAL_PROVIDER):
        return (f"model {name!r} was registered at run time by module {package.removeprefix(LOCAL_PROVIDER)} "
                f"when it was saved; no installed package provides it (publish the builder under a "
                f"certkd.models entry point)")
    made = f"package {package}" + (f" {version}" if version else "")
    if installed:
        return (f"model {name!r} was saved from {made}, but here {name!r} comes from "
                f"{MODELS.provider(name).package}: pip install {package}")
    try:
        metadata.distribution(package)
    except (metadata.PackageNotFoundError, ValueError):
        return f"model {name!r} comes from {made}, which is not installed: pip install {package}"
    return (f"model {name!r} comes from {made}, which is installed but declares no certkd.models entry point "
            f"named {name!r}: upgrade or reinstall {package}")


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of names, dtypes, shapes and bytes of every tensor (detects corrupted weights on load)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(seed: int | None = None, teacher: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    import certkd

    prov: dict[str, Any] = {"certkd_version": certkd.__version__, "torch_version": str(torch.__version__),
                            "python_version": platform.python_version(), "seed": seed}
    if teacher is not None:
        prov["teacher_path"] = str(teacher)
        prov["teacher_sha256"] = file_sha256(teacher)
    prov.update(extra)
    return prov


def make_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict[str, Any], dataset_info: Any,
                    config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                    provenance_info: dict[str, Any] | None = None) -> Checkpoint:
    """Wrap a registry model built for ``dataset_info``'s input shape and classes.

    The recorded normalization is the model's own first ``Normalize`` layer when it differs
    from ``dataset_info``'s (so the checkpoint always describes the weights it holds).
    """
    mean, std = dataset_info.mean, dataset_info.std
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if isinstance(first, Normalize) and not (
            first.mean.numel() == len(mean) and torch.allclose(first.mean.cpu(), torch.tensor(mean).float())
            and first.std.numel() == len(std) and torch.allclose(first.std.cpu(), torch.tensor(std).float())):
        mean, std = first.mean.tolist(), first.std.tolist()
    from certkd.models import MODELS

    return Checkpoint(
        model_name=model_name,
        model_provider=MODELS.provider(model_name).to_dict(),
        model_kwargs=dict(model_kwargs),
        dataset=dataset_info.name,
        input_shape=tuple(dataset_info.input_shape),
        num_classes=int(dataset_info.num_classes),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        config=dict(config or {}),
        metrics=dict(metrics or {}),
        provenance=dict(provenance_info or provenance()),
    )


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Atomic save: a temporary file beside ``path``, then a rename.

    The file also records ``weights_sha256`` (see ``state_dict_sha256``), checked on load.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name for the checkpoint")
    content = ckpt.to_dict()
    content["weights_sha256"] = state_dict_sha256(ckpt.state_dict)
    buf = io.BytesIO()
    torch.save(content, buf)
    try:
        atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None
    ckpt.path = path
    return path


def torch_load_weights_only(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; every failure is one ``CheckpointError`` sentence.

    ``weights_only=True`` refuses any pickled callable or class outside tensors and plain
    containers, so loading never runs code from the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such {what} file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a regular file, expected a {what} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                              f"data (torch.load weights_only=True): {_unpickling_reason(exc)}") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to load this {what}") from None
    except Exception as exc:  # parsing arbitrary bytes fails in many ways (KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{path}: not a readable {what} (truncated, corrupt or not a torch file)"
                              f"{_load_failure_detail(exc)}") from None


def _load_failure_detail(exc: Exception) -> str:
    """``": <first sentence>"`` of torch's own message (RuntimeError/OSError), else nothing."""
    if not isinstance(exc, (RuntimeError, OSError)) or not str(exc).strip():
        return ""
    return ": " + str(exc).strip().splitlines()[0].split(". ")[0][:160]


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only error (e.g. 'unsupported GLOBAL posix.system ...')."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:200]
    return lines[0][:200] if lines else type(exc).__name__


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate; raises ``CheckpointError`` with one sentence on any problem."""
    path = Path(path)
    return _validate(torch_load_weights_only(path), path)


def _validate(raw: Any, path: Path) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != MAGIC:
        raise CheckpointError(f"{path}: not a certkd checkpoint (wrap external weights with 'certkd convert')")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: certkd checkpoint is missing {', '.join(missing)}")
    if not isinstance(raw["format_version"], int) or raw["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {raw['format_version']!r} is not one this certkd "
                              f"supports (<= {FORMAT_VERSION}); upgrade certkd")
    state = raw["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of names to tensors")
    checksum = raw.get("weights_sha256")
    if checksum is not None and checksum != state_dict_sha256(state):
        raise CheckpointError(f"{path}: weights are corrupt (their sha256 does not match the one saved with them)")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: weight {name!r} contains NaN or Inf values")
    try:
        model, norm = raw["model"], raw["normalization"]
        ckpt = Checkpoint(
            model_name=str(model["name"]),
            model_provider=_provider_field(model.get("provider")),
            model_kwargs=dict(model.get("kwargs") or {}),
            dataset=str(raw["dataset"]),
            input_shape=tuple(int(s) for s in raw["input_shape"]),
            num_classes=int(raw["num_classes"]),
            mean=[float(v) for v in norm["mean"]],
            std=[float(v) for v in norm["std"]],
            state_dict=state,
            config=dict(raw.get("config") or {}),
            metrics=dict(raw.get("metrics") or {}),
            provenance=dict(raw.get("provenance") or {}),
            path=path,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: certkd checkpoint has a malformed field ({type(exc).__name__}: "
                              f"{exc})") from None
    if len(ckpt.input_shape) != 3 or min(ckpt.input_shape) < 1 or ckpt.num_classes < 2:
        raise CheckpointError(f"{path}: certkd checkpoint has a malformed input shape {ckpt.input_shape} or "
                              f"number of classes {ckpt.num_classes}")
    for key, recorded in zip(NORMALIZE_KEYS, (ckpt.mean, ckpt.std), strict=True):
        stored = state.get(key)
        if stored is not None and (stored.numel() != len(recorded) or not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(stored.tolist(), recorded,
                                                                               strict=True))):
            raise CheckpointError(f"{path}: the recorded normalization {key.split('.')[1]} {recorded} differs "
                                  f"from the model's Normalize layer {stored.tolist()}")
    return ckpt


def _provider_field(raw: Any) -> dict[str, str]:
    """The recorded provider ``{package, version}``; checkpoints without one predate plugins (certkd's own)."""
    if raw is None:
        return builtin_provider().to_dict()
    if not isinstance(raw, dict) or not isinstance(raw.get("package"), str):
        raise TypeError("model provider must be a mapping with a 'package' name")
    return {"package": raw["package"], "version": str(raw.get("version", ""))}


def save_model(module: nn.Module, path: str | Path, dataset: str, arch: str,
               arch_kwargs: dict[str, Any] | None = None, normalization: str = "dataset") -> Path:
    """Save an in-memory module of registry/plugin architecture ``arch`` (``certkd.convert.save_model``).

    Example
    -------
    >>> save_model(my_lenet, "lenet.pt", dataset="mnist", arch="lenet5")  # doctest: +SKIP
    """
    from certkd.convert import save_model as save

    return save(module, path, dataset, arch, arch_kwargs, normalization)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """RobustBench-style: the model of a certkd checkpoint, in eval mode (loaded with ``weights_only=True``).

    Parameters
    ----------
    path : str or Path
        A file written by ``certkd train`` (or ``certkd convert``).
    device : str or torch.device
        Where to put it.

    Returns
    -------
    nn.Module
        Normalization included: it takes inputs in ``[0, 1]``.

    Example
    -------
    >>> load_model("missing.pt")
    Traceback (most recent call last):
    certkd.errors.CheckpointError: ...
    """
    return load_checkpoint(path).build_model(device)


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Teacher and student must agree on input shape and number of classes."""
    if tuple(a.input_shape) != tuple(b.input_shape) or a.num_classes != b.num_classes:
        raise CheckpointError(
            f"checkpoints do not fit each other: {a._where()} takes {tuple(a.input_shape)} with "
            f"{a.num_classes} classes, {b._where()} takes {tuple(b.input_shape)} with {b.num_classes} classes")

__all__ = ["Checkpoint", "FORMAT_VERSION", "NORMALIZE_KEYS", "make_checkpoint", "save_checkpoint", "load_checkpoint",
           "load_model", "save_model", "check_provider", "check_compatible", "file_sha256", "provenance", "state_dict_sha256",
           "torch_load_weights_only"]
