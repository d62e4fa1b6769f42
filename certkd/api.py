"""The Python API, RobustBench style: load a model, certify it, compare a student with its teacher.

Each function runs the same code as its command (``certkd certify``, ``certkd compare``)
and returns a typed result with ``.summary()`` (the printed table), ``.to_json()`` and
``.to_frame()`` (pandas).

Example
-------
>>> import certkd
>>> from certkd.models import create_model
>>> data = certkd.load_dataset("digits", "test")
>>> net = create_model("mlp", 10, data.info.input_shape, data.info.mean, data.info.std, hidden=[8])
>>> res = certkd.certify(net, data, methods=["lipschitz"], eps=[0.01], num_examples=4, pgd_steps=0)
>>> res.to_frame()[["method", "kind", "eps", "n"]].values.tolist()
[['lipschitz', 'certified', 0.01, 4]]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from certkd.checkpoint import load_model
from certkd.data import Points, TensorPoints, load_dataset
from certkd.errors import CertkdError
from certkd.runs import Record
from certkd.verdict import CompareRule

if TYPE_CHECKING:
    import pandas as pd

ModelLike = nn.Module | str | Path
DataLike = Points | tuple[torch.Tensor, torch.Tensor] | str


@dataclass
class RunResult:
    """What a run of the Python API found: the summary its command writes (``data``) and the per-example records."""

    data: dict[str, Any]
    records: list[Record]

    def to_json(self) -> str:
        """The summary and the records as one JSON text."""
        return json.dumps({"summary": self.data, "records": self.records})

    def _frame(self, per_example: bool, rows: list[dict[str, Any]]) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.records if per_example else rows)


@dataclass
class CertifyResult(RunResult):
    """What :func:`certify` found: the summary of ``certkd certify`` and the per-example records.

    Attributes
    ----------
    data : dict
        The summary (``clean_accuracy``, ``results`` per method and eps, ``radius``,
        ``soundness``, ``config``), exactly what ``certkd certify --out`` writes.
    records : list of dict
        One record per ``(index, method, eps)``.
    """

    @property
    def clean_accuracy(self) -> float | None:
        """Clean accuracy on the evaluated points (exact)."""
        return cast("float | None", self.data["clean_accuracy"]["accuracy"])

    def accuracy(self, method: str, eps: float) -> float | None:
        """Certified (or, for an estimate method, estimated) accuracy of ``method`` at ``eps``.

        Parameters
        ----------
        method : str
            A method of the run (``pgd`` included).
        eps : float
            One of the run's radii.

        Returns
        -------
        float or None
            None when the cell holds no point.
        """
        for row in self.data["results"]:
            if row["method"] == method and row["eps"] == float(eps):
                return cast("float | None", row["accuracy"])
        raise CertkdError(f"no result for method {method!r} at eps {eps:g}")

    def summary(self) -> str:
        """The plain-text table ``certkd certify`` prints (every figure with its kind)."""
        from certkd.certification import format_summary

        return format_summary(self.data)

    def to_frame(self, per_example: bool = False) -> pd.DataFrame:
        """A pandas DataFrame: one row per (method, eps), or per record with ``per_example``.

        Parameters
        ----------
        per_example : bool
            One row per ``(index, method, eps)`` record instead.

        Returns
        -------
        pandas.DataFrame
            Columns ``method, kind, target, eps, robust, n, accuracy`` (or the record fields).
        """
        return self._frame(per_example, self.data["results"])


@dataclass
class CompareResult(RunResult):
    """What :func:`compare` found: the headline of ``certkd compare``, both parts' tables, the per-example radii."""

    @property
    def verdict(self) -> str:
        """``yes``, ``no`` or ``inconclusive``."""
        return str(self.data["verdict"])

    def summary(self) -> str:
        """The text ``certkd compare`` prints."""
        from certkd.commands.compare import format_compare

        return format_compare(self.data)

    def to_frame(self, per_example: bool = False, part: str = "certified") -> pd.DataFrame:
        """A pandas DataFrame: one part's accuracy table per eps, or the per-example radii with ``per_example``.

        Parameters
        ----------
        per_example : bool
            One row per point (``radius_*``, ``attack_*``, ``correct_*``) instead.
        part : str
            ``certified`` (certified accuracy) or ``empirical`` (attack accuracy, an estimate).

        Returns
        -------
        pandas.DataFrame
            Columns ``eps, accuracy_student, accuracy_teacher, difference, ci_low, ci_high``.
        """
        return self._frame(per_example, self.data[part]["table"])


def _model(model: ModelLike, device: str | torch.device) -> nn.Module:
    return load_model(model, device) if isinstance(model, (str, Path)) else model.to(device).eval()


def _points(data: DataLike) -> Points:
    if isinstance(data, str):
        return load_dataset(data)
    if isinstance(data, tuple):
        return TensorPoints(*data)
    return data


def _radii(eps: object) -> list[float]:
    """The radii as floats, or one sentence (a string, None, any non-numeric value)."""
    values: Iterable[Any] = eps if isinstance(eps, Iterable) and not isinstance(eps, (str, bytes)) else [eps]
    try:
        if any(isinstance(e, (str, bytes, bool)) for e in values):
            raise TypeError
        return [float(e) for e in values]
    except (TypeError, ValueError):
        raise CertkdError(f"eps must be numbers (a list of radii such as [0.01, 0.03]), got {eps!r}") from None


def _input_shape(data: Points) -> tuple[int, ...]:
    if len(data) == 0:
        raise CertkdError("the data holds no examples")
    x, _ = data.batch([0])
    return tuple(int(s) for s in x.shape[1:])


def _count(data: Points, num_examples: int | None) -> int:
    return len(data) if num_examples is None else min(num_examples, len(data))


def certify(model: ModelLike, data: DataLike, methods: Sequence[str] = ("crown",), eps: Sequence[float] = (2 / 255,),
            norm: str = "inf", radius: bool = False, num_examples: int | None = None, batch_size: int = 32,
            seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
            **options: Any) -> CertifyResult:
    """Certify ``model`` on the first points of ``data``: ``certkd certify`` from Python.

    Parameters
    ----------
    model : nn.Module, str or Path
        A classifier taking inputs in ``[0, 1]`` (any architecture), or a checkpoint path.
    data : Dataset, (x, y) or str
        A ``certkd.data`` dataset (or anything with ``len`` and ``batch(indices)``),
        tensors ``(x, y)``, or a dataset name.
    methods : sequence of str
        Certify methods (``certkd.certification.certify_methods()``); PGD runs alongside
        unless ``pgd_steps=0``.
    eps : sequence of float
        Radii.
    norm : str
        ``inf`` or ``2``.
    radius : bool
        Also per-example radii.
    num_examples : int, optional
        Use the first ``num_examples`` points (default: all).
    batch_size, seed, device, progress
        As for the command.
    **options
        Fields of ``CertifyOptions`` (``pgd_steps``, ``sigma``, ``radius_tol``, ...).

    Returns
    -------
    CertifyResult
        The same summary and records as ``certkd certify`` on those points with the same options.

    Example
    -------
    >>> from certkd.models import create_model
    >>> net = create_model("mlp", 10, (1, 8, 8), (0.5,), (0.5,), hidden=[8])
    >>> x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    >>> certify(net, (x, y), ["lipschitz"], [0.0], norm="2", pgd_steps=0).data["num_examples"]
    6
    """
    from certkd.certification import CertifyJob, CertifyOptions, prepare_methods
    from certkd.commands.certify import CERTIFY, certify_run
    from certkd.run import Run, RunSettings

    job = CertifyJob(methods=list(methods), eps=_radii(eps), norm=norm, radius=radius,
                     batch_size=batch_size, seed=seed, params=CertifyOptions.from_dict(options))
    job.check()
    net, points = _model(model, device), _points(data)
    ctx = prepare_methods(net, _input_shape(points), job.all_methods(), job.norm, job.params, device)
    run = Run.start(CERTIFY, RunSettings(progress=progress))
    certify_run(run, ctx, points, job, {"num_examples": _count(points, num_examples)})
    summary, records = run.summarize()
    if ctx.notes:
        summary["notes"] = list(ctx.notes)
    return CertifyResult(summary, records)


def compare(student: ModelLike, teacher: ModelLike, data: DataLike, method: str = "crown", norm: str = "inf",
            eps: Sequence[float] | None = None, num_examples: int | None = None, batch_size: int = 32, seed: int = 0,
            rule: CompareRule | dict[str, Any] | None = None, attack: str = "apgd",
            device: str | torch.device = "cpu", progress: bool = False, **options: Any) -> CompareResult:
    """Does ``student`` certify at least as robustly as ``teacher``? ``certkd compare`` from Python.

    Parameters
    ----------
    student, teacher : nn.Module, str or Path
        The two classifiers (or checkpoint paths), taking the same inputs.
    data : Dataset, (x, y) or str
        The points, as for :func:`certify`.
    method : str
        The radius method (the same for both models).
    norm, eps, num_examples, batch_size, seed
        As for the command (``eps`` None: 11 points up to the 90th percentile of the teacher's attack radii).
    rule : CompareRule or dict, optional
        The decision rule (``certkd.verdict.CompareRule``: margin, CI level, fraction
        threshold, bootstrap resamples, rho threshold), or a dict of its fields; default
        the command's defaults.
    attack : str
        The attack of the empirical part (``apgd`` or ``pgd``).
    device, progress
        Where the models run; a progress bar.
    **options
        Fields of ``CertifyOptions`` (``radius_tol``, ``sigma``, smoothing's ``alpha``, ...).

    Returns
    -------
    CompareResult
        The headline (theory.md §6), both parts with tables and statistics, and the per-example radii.

    Example
    -------
    >>> from certkd.models import create_model
    >>> net = create_model("mlp", 10, (1, 8, 8), (0.5,), (0.5,), hidden=[8])
    >>> x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    >>> res = compare(net, net, (x, y), "lipschitz", norm="2", rule={"n_boot": 50})
    >>> bool(res.to_frame()["difference"].eq(0).all()), res.verdict
    (True, 'yes')
    """
    from bounds.inputs import check_batch_size
    from certkd.certification import prepare_methods
    from certkd.commands.compare import COMPARE, CompareJob, compare_run
    from certkd.run import Run, RunSettings

    if not isinstance(rule, CompareRule):
        unknown = sorted(set(rule or {}) - {f.name for f in fields(CompareRule)})
        if unknown:
            raise CertkdError(f"unknown compare rule setting(s) {', '.join(unknown)}")
        rule = CompareRule(**(rule or {}))
    check_batch_size(batch_size)
    job = CompareJob(method=method, norm=norm, params=dict(options), batch_size=batch_size, seed=seed,
                     eps=None if eps is None else _radii(eps), attack=attack, rule=rule)
    job.check()
    points = _points(data)
    models = [_model(m, device) for m in (student, teacher)]
    shape = _input_shape(points)
    contexts = [prepare_methods(m, shape, [method], job.norm, job.options(), device) for m in models]
    run = Run.start(COMPARE, RunSettings(progress=progress))
    compare_run(run, contexts[0], contexts[1], points, job, {"num_examples": _count(points, num_examples)})
    return CompareResult(*run.summarize())


def benchmark(model: ModelLike, dataset: str = "digits", split: str = "test", methods: Sequence[str] = ("crown",),
              eps: Sequence[float] = (2 / 255,), norm: str = "inf", num_examples: int | None = 100,
              data_dir: str | Path | None = None, **kwargs: Any) -> CertifyResult:
    """RobustBench-style benchmark: certify ``model`` on the first ``num_examples`` points of a named dataset.

    Parameters
    ----------
    model : nn.Module, str or Path
        The classifier or a checkpoint path.
    dataset, split, data_dir
        Which data (``certkd datasets``).
    methods, eps, norm, num_examples
        As for :func:`certify` (default: CROWN at 2/255 on 100 points).
    **kwargs
        Further arguments of :func:`certify` (``radius``, ``batch_size``, ``seed``, options).

    Returns
    -------
    CertifyResult
        Clean, PGD and certified accuracy per eps.

    Example
    -------
    >>> from certkd.models import create_model
    >>> net = create_model("mlp", 10, (1, 8, 8), (0.3,), (0.4,), hidden=[8])
    >>> benchmark(net, "digits", methods=["lipschitz"], eps=[0.01], num_examples=3).data["num_examples"]
    3
    """
    data = load_dataset(dataset, split, data_dir)
    return certify(model, data, methods, eps, norm=norm, num_examples=num_examples, **kwargs)


__all__ = ["CertifyResult", "CompareResult", "CompareRule", "benchmark", "certify", "compare", "load_dataset",
           "load_model"]
