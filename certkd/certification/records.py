"""What decides a certify run's records (:class:`CertifyJob`), the records themselves, and their files.

One record per ``(index, method, eps)``: the example's label and clean prediction,
the method's verdict (``robust``; ``certified`` only for a certified kind), margin
bounds and, with ``radius``, the per-example radius. A record log
(``certkd.runs.RecordLog``) holds them after a header with the run's configuration;
shards of one run merge into the records of one run (:func:`expected_keys`, :func:`canonical_order`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from bounds.norms import check_eps
from certkd.certification.methods import (
    CERTIFIED,
    PGD,
    CertifyOptions,
    Method,
    MethodOutput,
    check_norm,
    get_method,
)
from certkd.errors import CertkdError
from certkd.runs import Record, Shard, batches, read_log

COMMAND = "certify"
RecordKey = tuple[int, str, float]


def parse_eps_list(values: Sequence[str | float] | str) -> list[float]:
    """``("2/255", "0.1,0.3")`` -> ``[2/255, 0.1, 0.3]``; every value finite and >= 0, else ``CertkdError``.

    Parameters
    ----------
    values : str, or sequence of str or float
        Comma lists, fractions allowed.

    Returns
    -------
    list of float
        In the given order.

    Example
    -------
    >>> parse_eps_list(["1/4", "0.1,0.3"])
    [0.25, 0.1, 0.3]
    """
    if isinstance(values, str):
        values = [values]
    out: list[float] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                eps = float(Fraction(part)) if "/" in part else float(part)
            except (ValueError, ZeroDivisionError):
                raise CertkdError(f"eps {part!r} is not a number (examples: 0.1, 2/255)") from None
            if not math.isfinite(eps) or eps < 0:
                raise CertkdError(f"eps must be a finite number >= 0, got {part!r}")
            out.append(eps)
    return out


@dataclass
class CertifyJob:
    """Everything that decides the records of a certify run (and must match to resume or merge).

    Example
    -------
    >>> job = CertifyJob(methods=["crown"], eps=[0.1])
    >>> job.all_methods(), CertifyJob.from_config(job.to_config()) == job
    (['pgd', 'crown'], True)
    """

    methods: list[str]
    eps: list[float]
    norm: str = "inf"
    radius: bool = False
    batch_size: int = 32
    seed: int = 0
    params: CertifyOptions = field(default_factory=CertifyOptions)
    shard: Shard | None = None

    def check(self) -> None:
        """One sentence (``CertkdError``/``BoundsError``) for any bad value."""
        if not self.methods:
            raise CertkdError("no method given")
        for name in self.methods:
            get_method(name)
        self.norm = check_norm(self.norm)
        if not self.eps:
            raise CertkdError("give at least one eps")
        for e in self.eps:
            check_eps(e)
        if self.batch_size < 1:
            raise CertkdError(f"batch size must be at least 1, got {self.batch_size}")
        self.params.check()

    def all_methods(self) -> list[str]:
        """The requested methods, with PGD first when it is switched on."""
        return ([PGD] if self.params.pgd_steps > 0 else []) + [m for m in self.methods if m != PGD]

    def to_config(self) -> dict[str, Any]:
        """The JSON form (the run header's configuration)."""
        d = asdict(self)
        d["shard"] = list(self.shard) if self.shard else None
        return d

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CertifyJob:
        """Inverse of :meth:`to_config` (extra keys such as ``model`` are ignored)."""
        shard = (int(config["shard"][0]), int(config["shard"][1])) if config.get("shard") else None
        return cls(methods=list(config["methods"]), eps=[float(e) for e in config["eps"]], norm=config["norm"],
                   radius=bool(config["radius"]), batch_size=int(config["batch_size"]), seed=int(config["seed"]),
                   params=CertifyOptions.from_dict(config.get("params", {})), shard=shard)


def record_key(record: Record) -> RecordKey:
    """The done-key of a certify record: ``(index, method, eps)``.

    Example
    -------
    >>> record_key({"index": 3, "method": "crown", "eps": 0.1, "robust": True})
    (3, 'crown', 0.1)
    """
    return int(record["index"]), str(record["method"]), float(record["eps"])


def _value(t: torch.Tensor | None, i: int, j: int | None = None) -> Any:
    if t is None:
        return None
    v = t[i] if j is None else t[i, j]
    return bool(v) if v.dtype == torch.bool else (int(v) if not v.is_floating_point() else float(v))


def method_records(method: Method, norm: str, idx: Sequence[int], y: torch.Tensor, pred: torch.Tensor,
                   eps: Sequence[float], out: MethodOutput, with_radius: bool) -> Iterator[Record]:
    """The records of one (batch, method): one per (example, eps).

    Parameters
    ----------
    method : Method
        The registered method.
    norm : str
        The run's norm.
    idx : sequence of int
        The batch's indices in the split.
    y, pred : torch.Tensor
        Labels and clean predictions, (B,).
    eps : sequence of float
        The radii.
    out : MethodOutput
        What the method said.
    with_radius : bool
        Add ``radius`` and ``radius_upper``.

    Returns
    -------
    iterator of dict
        ``index, label, pred, method, kind, target, norm, eps, robust, certified, margin_lb,
        margin_ub`` (+ radii, + the method's extra fields).
    """
    for i, index in enumerate(idx):
        base = {"index": int(index), "label": int(y[i]), "pred": int(pred[i]), "method": method.name,
                "kind": method.kind, "target": method.target, "norm": norm}
        for j, e in enumerate(eps):
            robust = _value(out.robust, i, j)
            rec = dict(base, eps=float(e), robust=robust, certified=bool(robust and method.kind == CERTIFIED),
                       margin_lb=_value(out.margin_lb, i, j), margin_ub=_value(out.margin_ub, i, j))
            if with_radius:
                rec.update(radius=_value(out.radius, i), radius_upper=_value(out.radius_upper, i))
            rec.update({k: _value(v, i) for k, v in out.extra.items()})
            yield rec


def expected_keys(num_examples: int, job: CertifyJob) -> set[RecordKey]:
    """Every ``(index, method, eps)`` the job's shard of the first ``num_examples`` points must produce.

    Example
    -------
    >>> sorted(expected_keys(3, CertifyJob(methods=["crown"], eps=[0.1], batch_size=2, shard=(1, 2))))
    [(2, 'crown', 0.1), (2, 'pgd', 0.1)]
    """
    mine = [i for _, idx in batches(range(num_examples), job.batch_size, job.shard) for i in idx]
    return {(int(i), m, float(e)) for i in mine for m in job.all_methods() for e in job.eps}


def canonical_order(records: Iterable[Record], job: CertifyJob) -> list[Record]:
    """Records sorted by (index, method as in the job, eps as in the job); duplicates keep the first.

    Example
    -------
    >>> job = CertifyJob(methods=["crown"], eps=[0.2, 0.1])
    >>> recs = [{"index": 0, "method": m, "eps": e} for m in ("crown", "pgd") for e in (0.1, 0.2)]
    >>> [(r["method"], r["eps"]) for r in canonical_order(recs, job)]
    [('pgd', 0.2), ('pgd', 0.1), ('crown', 0.2), ('crown', 0.1)]
    """
    method_rank = {m: r for r, m in enumerate(job.all_methods())}
    eps_rank = {float(e): r for r, e in enumerate(job.eps)}
    unique: dict[RecordKey, Record] = {}
    for rec in records:
        unique.setdefault(record_key(rec), rec)
    return sorted(unique.values(), key=lambda r: (int(r["index"]), method_rank.get(r["method"], 99),
                                                  eps_rank.get(float(r["eps"]), 99)))


def read_per_example(path: str | Path) -> tuple[dict[str, Any] | None, list[Record]]:
    """``(config, records)`` of a certify record file; ``(None, [])`` when missing or empty.

    ``CertkdError`` when it is not a record file of ``certkd certify``.

    Example
    -------
    >>> read_per_example("no/such/file.jsonl")
    (None, [])
    """
    head, records = read_log(path)
    if head is None:
        return None, []
    if head["command"] != COMMAND:
        raise CertkdError(f"{path}: records of 'certkd {head['command']}', not of certify")
    return head["config"], records
