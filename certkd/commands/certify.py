"""``certkd certify``, top to bottom: load the points and the model, prepare the methods once, run the
missing (batch, method) work into the record log, gather shards, summarize, write.

``certify_points`` is the loop (``certkd.runs.execute`` over this shard's batches); ``certify_run`` is
the work of every certify run (the command's, ``certkd ablate``'s, ``certkd demo``'s, the API's);
``certify_checkpoint`` is ``certkd certify``; ``certkd.certify`` (the Python API) is a certify run on
tensors or a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bounds.bound_methods import costliest
from certkd.certification.methods import (
    Context,
    Method,
    evaluate_batch,
    get_method,
    prepare_methods,
)
from certkd.certification.records import (
    COMMAND,
    CertifyJob,
    canonical_order,
    expected_keys,
    method_records,
    record_key,
)
from certkd.certification.summary import format_summary, summarize
from certkd.data import Points
from certkd.io import atomic_write_json
from certkd.loading import check_device, load_points
from certkd.run import Command, Run, RunSettings
from certkd.runs import Record, RecordLog, batches, execute, seed_stream

CERTIFY = Command(
    COMMAND, record_key, lambda config: expected_keys(int(config["num_examples"]), CertifyJob.from_config(config)),
    lambda config, records: canonical_order(records, CertifyJob.from_config(config)), summarize,
    lambda out, summary, records: atomic_write_json(out, summary), format_summary, shard_summary=True,
    merged_provenance=True)


def certify_points(ctx: Context, data: Points, indices: Sequence[int], job: CertifyJob, log: RecordLog,
                   progress: bool = False) -> list[Record]:
    """Certify ``data[indices]`` with every method of ``job``; the missing records go to ``log`` and are returned
    (``certkd.runs.execute``, with ``progress``).

    A (batch, method) with a missing record is recomputed whole, with its own random stream, so a resumed
    run equals an uninterrupted one.

    Parameters
    ----------
    ctx : Context
        From ``prepare_methods`` (engines built once per run).
    data, indices : Points, sequence of int
        The evaluated points, read only through ``data.batch(indices)``; only this shard's batches run.
    job : CertifyJob
        Methods, eps, seed, ...
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


def certify_run(run: Run, ctx: Context, data: Points, job: CertifyJob, sources: dict[str, Any]) -> list[Record]:
    """The work of a certify run: its configuration (``sources``: where its points come from, then
    ``job``), the memory plan of the costliest bound method asked for, then :func:`certify_points`
    into the run's record log; the records computed now (``run.records`` holds all of them)."""
    run.configure(sources, job.to_config())
    count = int(sources["num_examples"])
    with run.open_log() as log:
        costly = costliest(job.methods)
        if costly:  # radius searches are probed at the worst case (eps None)
            run.plan_memory([ctx.bound_engine()], data, count, costly, None if job.radius else max(job.eps),
                            job.norm, job.batch_size)
        return certify_points(ctx, data, range(count), job, log, run.settings.progress)


def certify_checkpoint(checkpoint: Path, job: CertifyJob, settings: RunSettings,
                       per_example: Path | None = None) -> dict[str, Any] | None:
    """``certkd certify``: certify the first points of a split for a checkpoint; the summary.

    Parameters
    ----------
    checkpoint : Path
        A certkd checkpoint.
    job : CertifyJob
        Methods, eps, norm, radius, batch size, seed, options (its ``shard`` is set here).
    settings : RunSettings
        The points (default: the checkpoint's dataset), device, summary JSON (``out``), shard, ...
    per_example : Path or None
        The record log, appended as computed (``settings.resume`` continues it).

    Returns
    -------
    dict or None
        The summary (None on torchrun ranks other than 0); ``provenance.memory_plan`` records the
        bound batch.
    """
    from certkd.checkpoint import load_checkpoint

    run = Run.start(CERTIFY, settings, per_example)
    job.shard = run.shard
    job.check()
    check_device(settings.device)
    ckpt = load_checkpoint(checkpoint)
    data_name, data, count = load_points(ckpt, settings.dataset, settings.split, settings.data_dir,
                                         settings.num_examples)
    ctx = prepare_methods(ckpt.build_model(settings.device), ckpt.input_shape, job.all_methods(), job.norm,
                          job.params, settings.device)
    if settings.notify is not None:
        for note in ctx.notes:
            settings.notify(note)
    certify_run(run, ctx, data, job, checkpoint_sources(checkpoint, ckpt, data_name, settings.split, count))
    return run.finish({"checkpoint": str(checkpoint), "device": str(settings.device),
                       "per_example": str(per_example) if per_example else None,
                       "memory_plan": run.plans[0] if run.plans else None})
