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

from bounds.bound_methods import costliest
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
from certkd.loading import check_device, check_fits, load_pair, load_points
from certkd.run import Run, plan_bound_memory
from certkd.runs import (
    Part,
    Points,
    Record,
    RecordLog,
    Shard,
    batches,
    execute,
    seed_stream,
    write_log,
)


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


def checkpoint_sources(path: Path, ckpt: Any, dataset: str, split: str, count: int) -> dict[str, Any]:
    """Where a certify run's inputs come from: the first part of its configuration (``Run.configure``)."""
    from certkd.checkpoint import file_sha256

    return {"checkpoint_sha256": file_sha256(path), "model": ckpt.model_name, "dataset": dataset, "split": split,
            "num_examples": count}


def certify_run(run: Run, ctx: Context, data: Points, count: int, job: CertifyJob,
                log_path: Path | None = None) -> list[Record]:
    """The work of a certify run (the command's and the API's): the memory plan of the costliest bound
    method asked for, then :func:`certify_points` into the run's record log; the records computed now
    (``run.log.records`` holds all of them)."""
    with run.open_log(log_path) as log:
        costly = costliest(job.methods)
        if costly:  # radius searches are probed at the worst case (eps None)
            run.plan_memory([ctx.bound_engine()], data, count, costly, None if job.radius else max(job.eps),
                            job.norm, job.batch_size)
        return certify_points(ctx, data, range(count), job, log, run.progress)


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
    from certkd.checkpoint import load_checkpoint

    run = Run.start(COMMAND, record_key, shard, out=per_example, out_kind="file", resume=resume,
                    overwrite=overwrite, progress=progress, max_memory=max_memory, notify=notify)
    job.shard = run.shard
    job.check()
    check_device(device)
    out, log_path = run.output(out), run.output(per_example)
    ckpt = load_checkpoint(checkpoint)
    data_name, data, count = load_points(ckpt, dataset, split, data_dir, num_examples)
    model = ckpt.build_model(device)
    ctx = prepare_methods(model, ckpt.input_shape, job.all_methods(), job.norm, job.params, device)
    if notify is not None:
        for note in ctx.notes:
            notify(note)
    run.configure(checkpoint_sources(checkpoint, ckpt, data_name, split, count), job.to_config())
    certify_run(run, ctx, data, count, job, log_path)

    def merge(parts: Sequence[Part]) -> dict[str, Any]:
        config, records = merge_shards(parts)
        if per_example is not None:
            write_log(per_example, COMMAND, config, records)
        return summarize(config, records)

    summary = run.finish(summarize, merge, shard_summary=True)
    if summary is None:
        return None
    summary["provenance"] = {"checkpoint": str(checkpoint), "device": str(device),
                             "per_example": str(per_example) if per_example else None,
                             "memory_plan": run.plans[0] if run.plans else None}
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


__all__ = ["plan_bound_memory", "load_pair", "merge_certify", "certify_checkpoint", "certify_points", "check_device", "check_fits", "load_points",
           "per_example_radii"]
