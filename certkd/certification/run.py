"""A certify run, top to bottom: load the points and the model, prepare the methods once, run the
missing (batch, method) work into the record log, gather shards, summarize, write.

``certify_points`` is the loop (``certkd.runs.execute`` over this shard's batches);
``certify_checkpoint`` is ``certkd certify``; ``per_example_radii`` is one batch of radii.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certkd.certification.methods import (
    PGD,
    CertifyOptions,
    Context,
    Method,
    evaluate_batch,
    get_method,
    prepare_methods,
)
from certkd.certification.records import COMMAND, CertifyJob, merge_shards, method_records, record_key
from certkd.certification.summary import summarize
from certkd.errors import CertkdError
from certkd.io import atomic_write_json
from certkd.runs import (
    SLURM,
    TORCHRUN,
    Points,
    Record,
    RecordLog,
    Shard,
    batches,
    execute,
    gather_shards,
    resolve_shard,
    seed_stream,
    shard_path,
    write_log,
)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or one sentence when it does not exist here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CertkdError(f"unknown device {device!r} (examples: cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertkdError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def check_fits(input_shape: Sequence[int], num_classes: int, data: Points, data_name: str = "data") -> None:
    """Raise ``CertkdError`` when the data cannot be fed to the model; reads one sample only.

    Classes are checked through ``data.info`` when the data has one (labels of every
    batch are checked again as they are read).
    """
    info = getattr(data, "info", None)
    if info is not None and int(info.num_classes) != int(num_classes):
        raise CertkdError(f"{data_name} has {info.num_classes} classes but the model has {num_classes}")
    if len(data) == 0:
        raise CertkdError(f"{data_name} holds no examples")
    x, _ = data.batch([0])
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise CertkdError(f"{data_name} has inputs of shape {tuple(x.shape[1:])} but the model takes "
                          f"{tuple(input_shape)}")


BOUND_METHODS_BY_COST = ("alpha-crown", "crown", "crown-ibp", "ibp")
"""Bound methods, the most memory-hungry first: the probe pass uses the costliest a run asks for."""
def worst_case_eps(norm: str, input_shape: Sequence[int]) -> float:
    """A radius whose ball covers the whole input box: every ReLU unstable, the most memory a pass takes.

    A pass's memory grows with the number of unstable neurons (auto_LiRPA skips stable ones),
    so runs that search radii (``--radius``, ``compare``) are probed here.
    """
    d = 1
    for s in input_shape:
        d *= int(s)
    return 1.0 if norm == "inf" else float(d) ** 0.5


def plan_bound_memory(tools: Sequence[Any], data: Points, count: int, method: str, eps: float | None, norm: str,
                      cap: int, max_memory: int | None = None, notify: Callable[[str], None] | None = None,
                      target: str | None = None) -> list[dict[str, Any]]:
    """Size every bound pass of ``tools`` to ``max_memory`` from one measured probe pass each (bounds.memory).

    Parameters
    ----------
    tools : BoundEngines (``bounds.certify``) or, with ``target``, LinearityBounders (certified gamma)
    data, count : the run's points; the probe reads the first ``bounds.memory.PROBE_POINTS``
    method, eps, norm : what the run bounds (``eps`` None: a radius search, probed at ``worst_case_eps``)
    cap : the run's batch size (a pass never takes more points)
    max_memory : bytes one pass may add (None: a third of the available memory)
    notify : receives one line per plan (``bound batch 9 (measured 350 MB per point ...)``)

    Returns
    -------
    list of dict
        ``MemoryPlan.to_dict()`` per tool, for the run's summary.
    """
    from bounds.memory import PROBE_POINTS, plan_bounder, plan_engine

    if count == 0 or not tools:
        return []
    x, y = data.batch(list(range(min(PROBE_POINTS, count))))
    e = worst_case_eps(norm, tuple(x.shape[1:])) if eps is None else float(eps)
    plans = []
    for tool in tools:
        x_t, y_t = x.to(tool.device), y.to(tool.device)
        plan = (plan_engine(tool, x_t, y_t, e, norm, method, cap, max_memory) if target is None
                else plan_bounder(tool, x_t, y_t, e, target, cap, max_memory))
        if notify is not None:
            notify(plan.describe())
        plans.append(plan.to_dict())
    return plans


def load_points(ckpt: Any, dataset: str | None, split: str, data_dir: Path | None,
                num_examples: int | None) -> tuple[str, Any, int]:
    """``(dataset name, dataset, count)``: the checkpoint's dataset unless named, checked to fit it."""
    from certkd.data import load_dataset

    name = dataset or ckpt.dataset
    data = load_dataset(name, split, data_dir)
    check_fits(ckpt.input_shape, ckpt.num_classes, data, f"dataset {name!r}")
    return name, data, len(data) if num_examples is None else min(num_examples, len(data))


def certify_points(ctx: Context, data: Points, indices: Sequence[int], job: CertifyJob, log: RecordLog,
                   progress: bool = False) -> list[Record]:
    """Certify ``data[indices]`` with every method of ``job``; appends the missing records to ``log``.

    Parameters
    ----------
    ctx : Context
        From ``prepare_methods`` (engines built once per run).
    data : Points
        Read only through ``data.batch(indices)``; records carry these indices.
    indices : sequence of int
        The evaluated points; only this shard's batches run.
    job : CertifyJob
        Methods, eps, seed, ...
    log : RecordLog
        Records already there are not produced again (a (batch, method) with a missing
        record is recomputed whole, with its own random stream, so a resumed run equals
        an uninterrupted one).
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    list of dict
        The records appended now.
    """
    methods = [get_method(m) for m in job.all_methods()]
    work = [(b, idx, m) for b, idx in batches(indices, job.batch_size, job.shard) for m in methods
            if log.missing((i, m.name, float(e)) for i in idx for e in job.eps)]
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(item: tuple[int, list[int], Method]) -> list[Record]:
        b, idx, method = item
        if b not in cache:
            cache.clear()
            cache[b] = data.batch(idx)
        x, y = cache[b]
        pred, out = evaluate_batch(ctx, method, x, y, job.eps, job.radius,
                                   seed_stream(job.seed, b, method.name, device=ctx.device))
        return list(method_records(method, job.norm, idx, y, pred, job.eps, out, job.radius))

    return execute(work, compute, log, progress, "certify", label=lambda w: f"{w[2].name}, batch {w[0]}")


def per_example_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "crown",
                      norm: str = "inf", seed: int = 0, device: str | torch.device = "cpu",
                      **params: Any) -> torch.Tensor:
    """Per-example radius of ``method`` (certified or estimate, by the method's kind) of one batch.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x, y : torch.Tensor
        One batch, shapes (B, ...) and (B,).
    method : str
        Bound methods: the bisected certified radius (theory.md §2.1); lipschitz:
        ``margin / L``; clever: the CLEVER score; smoothing: the smoothed classifier's
        radius in ``norm`` (0 where it abstains or is wrong) (theory.md §2.2).
    norm : str
        ``inf`` or ``2``.
    seed : int
        Fixes the batch's random stream (that of batch 0 of a certify run).
    device : str or torch.device
        Where the model runs.
    **params
        Fields of ``CertifyOptions``.

    Returns
    -------
    torch.Tensor
        (B,) radii; misclassified points get 0.

    Example
    -------
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> per_example_radii(net, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]), "lipschitz", "2").shape
    torch.Size([3])
    """
    if method == PGD:
        raise CertkdError("pgd gives no radius: use crown, lipschitz, clever or smoothing")
    ctx = prepare_methods(model, x.shape[1:], [method], norm, CertifyOptions.from_dict(params), device)
    _, out = evaluate_batch(ctx, get_method(method), x, y, [], True, seed_stream(seed, 0, method, device=ctx.device))
    assert out.radius is not None
    return out.radius


def certify_checkpoint(checkpoint: Path, job: CertifyJob, shard: Shard | str | None = None,
                       dataset: str | None = None, split: str = "test", data_dir: Path | None = None,
                       num_examples: int | None = None, device: str = "cpu", out: Path | None = None,
                       per_example: Path | None = None, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, max_memory: int | None = None,
                       notify: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """``certkd certify``: certify the first points of a split for a checkpoint; the summary.

    Parameters
    ----------
    checkpoint : Path
        A certkd checkpoint.
    job : CertifyJob
        Methods, eps, norm, radius, batch size, seed, options (its ``shard`` is set here).
    shard : (k, n), "auto" or None
        ``auto``: torchrun (``RANK``/``WORLD_SIZE``; rank 0 gathers and writes everything)
        or a Slurm job array (each task writes ``NAME.shardKofN.EXT`` files for ``certkd merge``).
    dataset, split, data_dir, num_examples
        The points (default: the checkpoint's dataset, all of ``split``).
    device : str
        Where the model runs.
    out, per_example : Path or None
        Summary JSON (written atomically) and the record log (appended as computed).
    resume, overwrite : bool
        Continue the run in ``per_example`` (same configuration only) or discard it.
    progress : bool
        Progress on stderr (a bar on a terminal, one line per stage otherwise).
    max_memory : int or None
        Bytes one bound pass may add (``--max-memory``; None: a third of the available memory):
        the bound batch comes from one measured probe pass (``plan_bound_memory``).
    notify : callable or None
        Receives the one-line memory plan.

    Returns
    -------
    dict or None
        The summary (None on torchrun ranks other than 0); ``provenance.memory_plan`` records the
        bound batch.
    """
    from certkd.checkpoint import file_sha256, load_checkpoint

    job.shard, launcher = resolve_shard(shard)
    job.check()
    check_device(device)
    if launcher == SLURM:
        out, per_example = shard_path(out, job.shard), shard_path(per_example, job.shard)
    ckpt = load_checkpoint(checkpoint)
    data_name, data, count = load_points(ckpt, dataset, split, data_dir, num_examples)
    model = ckpt.build_model(device)
    ctx = prepare_methods(model, ckpt.input_shape, job.all_methods(), job.norm, job.params, device)
    if notify is not None:
        for note in ctx.notes:
            notify(note)
    config: dict[str, Any] = {"checkpoint_sha256": file_sha256(checkpoint), "model": ckpt.model_name,
                              "dataset": data_name, "split": split, "num_examples": count, **job.to_config()}
    log_path = shard_path(per_example, job.shard) if launcher == TORCHRUN else per_example
    with RecordLog.open(log_path, COMMAND, config, record_key, resume=resume, overwrite=overwrite) as log:
        costly = [m for m in BOUND_METHODS_BY_COST if m in job.methods]
        probe_eps = None if job.radius else max(job.eps)  # radius searches: probed at the worst case
        plans = plan_bound_memory([ctx.bound_engine()], data, count, costly[0], probe_eps, job.norm, job.batch_size,
                                  max_memory, notify) if costly else []
        certify_points(ctx, data, range(count), job, log, progress)
    records = log.records
    if launcher == TORCHRUN:
        parts = gather_shards(COMMAND, config, records, job.shard)
        if parts is None:
            return None
        config, records = merge_shards(parts)
        if per_example is not None:
            write_log(per_example, COMMAND, config, records)
    summary = summarize(config, records)
    summary["provenance"] = {"checkpoint": str(checkpoint), "device": str(device),
                             "per_example": str(per_example) if per_example else None,
                             "memory_plan": plans[0] if plans else None}
    if out is not None:
        atomic_write_json(out, summary)
    return summary


def merge_certify(parts: Sequence[tuple[str, Record | None, list[Record]]], out: Path, per_example: Path | None,
                  names: list[str]) -> dict[str, Any]:
    """Merge certify shards; writes the summary JSON (and, if asked, the merged record file)."""
    config, records = merge_shards(parts)
    summary = summarize(config, records)
    summary["provenance"] = {"merged_from": names}
    if per_example is not None:
        write_log(per_example, COMMAND, config, records)
    atomic_write_json(out, summary)
    return summary


def load_pair(student_path: Path, teacher_path: Path, device: str) -> tuple[Any, Any, nn.Module, nn.Module]:
    """Both checkpoints, checked to fit each other (input shape, classes), and their models."""
    from certkd.checkpoint import check_compatible, load_checkpoint

    check_device(device)
    student_ckpt, teacher_ckpt = load_checkpoint(student_path), load_checkpoint(teacher_path)
    check_compatible(student_ckpt, teacher_ckpt)
    return student_ckpt, teacher_ckpt, student_ckpt.build_model(device), teacher_ckpt.build_model(device)


__all__ = ["plan_bound_memory", "load_pair", "merge_certify", "certify_checkpoint", "certify_points", "check_device", "check_fits", "load_points",
           "per_example_radii"]
