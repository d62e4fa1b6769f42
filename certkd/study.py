"""Ablation study files for ``certkd ablate STUDY.yaml``.

A study is a grid: checkpoints (and, optionally, KDIGA students trained for each
``iga_weight``) x norms x methods x eps. Unknown keys or values are refused with
one sentence naming them.

Every allowed key is derived from the code, never copied: methods from the certify
registry (``certkd.certification.METHODS``), ``params`` from the fields of
``CertifyOptions`` (``smoothing_batch``, ``radius_tol``, ...), ``kdiga.train`` from the
fields of the trainer's ``TrainConfig`` and its method parameters (``beta``,
``weight_decay``, ...). ``examples/study.yaml`` is a complete example.

Example::

    name: digits-bounds
    checkpoints: [teacher.pt, student.pt]      # paths relative to the study file
    methods: [ibp, crown-ibp, crown, lipschitz, clever, smoothing]
    norms: [inf, 2]
    eps: [0.01, 0.02, 4/255]
    num_examples: 64
    seed: 0
    params: {sigma: 0.25, n: 500}              # method parameters (see certkd certify --help)
    kdiga:                                     # optional: train one student per iga weight
      teacher: teacher.pt
      arch: mlp
      arch_kwargs: {hidden: [64]}
      iga_weights: [0, 1, 10]
      train: {epochs: 5, batch_size: 64, lr: 0.001, optimizer: adam}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from certkd.certification import METHODS, NORMS, CertifyOptions, parse_eps_list
from certkd.errors import CertkdError

#: TrainConfig fields a sweep sets itself (not study keys)
_SWEEP_SET = {"method", "arch", "arch_kwargs", "teacher", "out", "seed", "resume", "progress", "params"}


def method_names() -> list[str]:
    """The methods a study may list: every registered certify method (pgd included)."""
    return METHODS.names()


def train_keys() -> set[str]:
    """The keys of ``kdiga.train``: ``TrainConfig`` fields a sweep does not set, and the method parameters."""
    from certkd.train import ObjectiveParams as TrainParams
    from certkd.train import TrainConfig

    return ({f.name for f in fields(TrainConfig)} - _SWEEP_SET) | {f.name for f in fields(TrainParams)}


@dataclass
class KdigaSweep:
    """Train one KDIGA student per ``iga_weights`` entry from ``teacher`` (theory.md §4)."""

    teacher: Path
    arch: str
    arch_kwargs: dict[str, Any]
    iga_weights: list[float]
    train: dict[str, Any]


@dataclass
class Study:
    """A parsed study file (paths resolved against the file's folder)."""

    name: str
    path: Path
    checkpoints: list[Path]
    methods: list[str]
    norms: list[str]
    eps: list[float]
    num_examples: int = 100
    split: str = "test"
    dataset: str | None = None
    data_dir: Path | None = None
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    kdiga: KdigaSweep | None = None
    out: Path | None = None


def _fail(path: Path, msg: str) -> CertkdError:
    return CertkdError(f"{path}: {msg}")


def _check_keys(path: Path, where: str, got: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_study(path: str | Path) -> Study:
    """Parse and validate a study file; raises ``CertkdError`` naming the first bad key or value.

    Parameters
    ----------
    path : str or Path
        A YAML study file.

    Returns
    -------
    Study
        Checkpoint, teacher and data paths resolved against the file's folder.

    Example
    -------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "s.yaml"
    >>> _ = p.write_text("checkpoints: [t.pt]\\neps: [2/255]\\nparams: {radius_tol: 0.01}\\n")
    >>> load_study(p).params
    {'radius_tol': 0.01}
    """
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "a study file must be a mapping of keys to values")
    _check_keys(path, "the study", raw, {f.name for f in fields(Study)} - {"path"})
    base = path.parent
    methods = [str(m) for m in _as_list(raw.get("methods", ["crown"]))]
    for m in methods:
        if m not in METHODS:
            raise _fail(path, f"unknown method {m!r} (allowed: {', '.join(method_names())})")
    norms = [str(n) for n in _as_list(raw.get("norms", ["inf"]))]
    for n in norms:
        if n not in NORMS:
            raise _fail(path, f"unknown norm {n!r} (allowed: inf, 2)")
    try:
        eps = parse_eps_list([str(e) for e in _as_list(raw.get("eps", []))])
    except CertkdError as exc:
        raise _fail(path, str(exc)) from None
    if not eps:
        raise _fail(path, "eps must list at least one value")
    params = dict(raw.get("params") or {})
    _check_keys(path, "params", params, set(CertifyOptions.names()))
    kdiga = None
    if raw.get("kdiga") is not None:
        k = raw["kdiga"]
        if not isinstance(k, dict):
            raise _fail(path, "kdiga must be a mapping")
        _check_keys(path, "kdiga", k, {f.name for f in fields(KdigaSweep)})
        train = dict(k.get("train") or {})
        _check_keys(path, "kdiga.train", train, train_keys())
        for key in ("teacher", "arch", "iga_weights"):
            if key not in k:
                raise _fail(path, f"kdiga needs {key!r}")
        weights = [float(w) for w in _as_list(k["iga_weights"])]
        if any(w < 0 for w in weights):
            raise _fail(path, "kdiga.iga_weights must be >= 0")
        kdiga = KdigaSweep(base / str(k["teacher"]), str(k["arch"]), dict(k.get("arch_kwargs") or {}), weights,
                           train)
    checkpoints = [base / str(c) for c in _as_list(raw.get("checkpoints", []))]
    if not checkpoints and kdiga is None:
        raise _fail(path, "list at least one checkpoint (or a kdiga sweep)")
    num_examples = int(raw.get("num_examples", 100))
    if num_examples < 1:
        raise _fail(path, "num_examples must be >= 1")
    return Study(
        name=str(raw.get("name", path.stem)), path=path, checkpoints=checkpoints, methods=methods, norms=norms,
        eps=eps, num_examples=num_examples, split=str(raw.get("split", "test")), dataset=raw.get("dataset"),
        data_dir=base / str(raw["data_dir"]) if raw.get("data_dir") else None, seed=int(raw.get("seed", 0)),
        batch_size=int(raw.get("batch_size", 32)), device=str(raw.get("device", "cpu")), params=params,
        kdiga=kdiga, out=base / str(raw["out"]) if raw.get("out") else None,
    )
