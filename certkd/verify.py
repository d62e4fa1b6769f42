"""``certkd verify``: VNN-LIB queries on ONNX models, one at a time or a VNN-COMP benchmark folder.

Answers (theory.md §2.1: certified means proved; anything else is not claimed):

- ``unsat``: bound propagation (``bounds.spec.spec_bounds``) proves that no input of the
  box satisfies any clause, and no evaluated point contradicts a bound;
- ``sat``: the attack found an input of the box that satisfies a clause, checked again by
  a forward pass of the ONNX file itself (onnxruntime) against the file's comparisons;
  the counterexample is written in the VNN-COMP format;
- ``unknown`` (with the reason) otherwise, ``timeout`` when the instance's time ran out.

A benchmark folder's ``instances.csv`` (``onnx,vnnlib,timeout`` rows, paths relative to
it) runs through ``certkd.runs.RecordLog``: records are appended as each instance ends
and a rerun with ``resume`` continues with an unchanged configuration. ``results.csv`` is
written in the VNN-COMP layout (``benchmark,onnx,vnnlib,prepare_time,result,run_time``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bounds.bound_methods import BOUND_METHODS
from bounds.certify import BoundEngine
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.spec import box_attack, spec_bounds
from certkd.errors import CertkdError
from certkd.io import atomic_write_json, atomic_write_text
from certkd.onnx_io import (
    OnnxImport,
    input_shape_of,
    onnx_forward,
    read_bytes,
    read_onnx,
    require_onnx,
    session_of,
)
from certkd.runs import RecordLog, execute
from certkd.vnnlib import Spec, format_counterexample, read_vnnlib

RESULTS = ("sat", "unsat", "unknown", "timeout", "error")
# answers of other verifiers' results files, as certkd names them (VNN-COMP 2021 used holds/violated;
# alpha,beta-CROWN's own summaries say safe/unsafe with the stage that decided)
RESULT_ALIASES = {"holds": "unsat", "violated": "sat", "unsat": "unsat", "sat": "sat", "unknown": "unknown",
                  "timeout": "timeout", "error": "error", "run_instance_timeout": "timeout",
                  **{word: "unsat" for word in ("safe", "safe-incomplete", "safe-bab", "safe-mip")},
                  **{word: "sat" for word in ("unsafe", "unsafe-pgd", "unsafe-bab", "unsafe-mip")}}
COMMAND = "verify"

__all__ = ["VerifyOptions", "Verdict", "verify_instance", "run_instances", "read_instances", "read_results",
           "format_run_summary"]


@dataclass
class VerifyOptions:
    """What decides an answer (and must match to resume a benchmark run)."""

    method: str = "crown"
    attack_steps: int = 50
    attack_restarts: int = 2
    seed: int = 0

    def check(self) -> None:
        if self.method not in BOUND_METHODS:
            raise CertkdError(f"unknown bound method {self.method!r}: use one of {', '.join(BOUND_METHODS)}")
        if self.attack_steps < 0 or self.attack_restarts < 0:
            raise CertkdError("attack steps and restarts must be >= 0")


@dataclass
class Verdict:
    """One instance's answer: ``result`` in ``RESULTS``, ``reason`` a sentence, ``counterexample`` (sat) text."""

    result: str
    reason: str
    prepare_time: float = 0.0
    run_time: float = 0.0
    counterexample: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that libraries' ``except Exception`` do not swallow it."""


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``_Timeout`` inside the block after ``seconds`` (main thread: SIGALRM; elsewhere checked after)."""
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(_signum: int, _frame: Any) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- one query

def input_domain(specs: list[Spec], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The box the model's affine first layer maps [0, 1]^d onto: ``[min(0, lower), max(1, upper)]`` elementwise."""
    lo = torch.zeros(size, dtype=torch.float64)
    hi = torch.ones(size, dtype=torch.float64)
    for spec in specs:
        for case in spec.cases:
            lo = torch.minimum(lo, case.lower)
            hi = torch.maximum(hi, case.upper)
    return lo, hi


def check_fits(spec: Spec, imp: OnnxImport, where: str) -> None:
    """The query's variables must be the model's inputs and outputs (one sentence otherwise)."""
    n_in = math.prod(imp.onnx_shape)
    if spec.num_inputs != n_in or spec.num_outputs != imp.num_classes:
        raise CertkdError(f"{where}: the query has {spec.num_inputs} inputs and {spec.num_outputs} outputs, the "
                          f"model {imp.source} takes {n_in} inputs and gives {imp.num_classes} outputs")


@dataclass
class Prepared:
    """An ONNX model ready for queries: its import, bound engine (None when refused), and onnxruntime session."""

    imp: OnnxImport
    engine: BoundEngine | None
    refusal: str | None
    session: Any
    seconds: float


def prepare(onnx_path: Path, specs: list[Spec]) -> Prepared:
    """Import the model with the affine first layer covering every query's box, and build its bound engine."""
    _, ort = require_onnx()
    start = time.perf_counter()
    size = specs[0].num_inputs
    declared = math.prod(input_shape_of(onnx_path))
    for spec in specs:
        if spec.num_inputs != declared:
            raise CertkdError(f"{onnx_path}: the model takes {declared} inputs, a query for it has "
                              f"{spec.num_inputs} inputs")
    lo, hi = input_domain(specs, size)
    imp = read_onnx(onnx_path, lo.float(), hi.float())
    engine, refusal = None, None
    try:
        engine = BoundEngine(imp.model, imp.input_shape)
    except BoundsError as exc:
        refusal = " ".join(str(exc).split())
    session = session_of(read_bytes(onnx_path), ort)
    return Prepared(imp, engine, refusal, session, time.perf_counter() - start)


def _unit_box(imp: OnnxImport, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query box in certkd's coordinates u in [0, 1]^d, widened outward by float32 rounding."""
    shape = (1, *imp.input_shape)
    if imp.lower is None or imp.upper is None:
        lo, up = lower.view(shape), upper.view(shape)
    else:
        base, width = imp.lower.double().view(shape), (imp.upper - imp.lower).double().view(shape)
        safe = torch.where(width > 0, width, torch.ones_like(width))
        lo = torch.where(width > 0, (lower.view(shape) - base) / safe, torch.zeros_like(base))
        up = torch.where(width > 0, (upper.view(shape) - base) / safe, torch.zeros_like(base))
    slack = 1e-7
    return ((lo - slack).clamp(0.0, 1.0).float(), (up + slack).clamp(0.0, 1.0).float())


def _check_counterexample(prep: Prepared, spec: Spec, case: int, clause: int, u: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ONNX input of ``u`` (clamped into the query's box) and onnxruntime's outputs, if they satisfy the clause."""
    box = spec.cases[case]
    x = prep.imp.to_onnx_input(u.view(1, *prep.imp.input_shape)).double().flatten()
    x = torch.maximum(torch.minimum(x, box.upper), box.lower).float()
    x = torch.where(x.double() < box.lower, torch.nextafter(x, torch.tensor(float("inf"))), x)
    x = torch.where(x.double() > box.upper, torch.nextafter(x, torch.tensor(float("-inf"))), x)
    if bool((x.double() < box.lower).any() or (x.double() > box.upper).any()):
        return None  # the box's float64 ends have no float32 between them here
    y = onnx_forward(prep.session, prep.imp.input_name, x.view(1, *prep.imp.onnx_shape)).double().flatten()
    cl = box.clauses[clause]
    values = cl.A @ y - cl.b
    strict = torch.tensor(cl.strict or [False] * len(cl.b), dtype=torch.bool)
    holds = bool(((values <= 0) & ~strict | (values < 0) & strict).all())
    return (x, y) if holds else None


def answer(prep: Prepared, spec: Spec, options: VerifyOptions, where: str = "") -> Verdict:
    """The answer to one query on a prepared model (no time limit here; see ``verify_instance``)."""
    check_fits(spec, prep.imp, where or "query")
    gen = torch.Generator().manual_seed(options.seed)
    view = prep.engine.view if prep.engine is not None else prep.imp.model
    pending: list[str] = []
    for k, case in enumerate(spec.cases):
        c, d, rows = spec.matrix(k)
        lo, up = _unit_box(prep.imp, case.lower, case.upper)
        if len(case.clauses) and any(len(cl.b) == 0 for cl in case.clauses):
            found = _check_counterexample(prep, spec, k, next(i for i, cl in enumerate(case.clauses)
                                                                if len(cl.b) == 0), (lo + up) / 2)
            if found is not None:
                return Verdict("sat", "a clause without output constraints holds at the box's centre",
                               counterexample=format_counterexample(*found))
        attack = box_attack(view, lo, up, c.float(), d, rows, options.attack_steps, options.attack_restarts, gen)
        for clause in torch.argsort(attack.worst).tolist():
            if float(attack.worst[clause]) > 1e-6 * max(1.0, float(d.abs().max()) if len(d) else 1.0):
                break
            found = _check_counterexample(prep, spec, k, clause, attack.points[clause])
            if found is not None:
                return Verdict("sat", f"the attack found a counterexample (clause {clause}), checked by onnxruntime",
                               counterexample=format_counterexample(*found))
        if prep.engine is None:
            pending.append(f"bound propagation refused the model: {prep.refusal}")
            continue
        try:
            bounds = spec_bounds(prep.engine, lo, up, c, d, rows, options.method, evidence=attack.points)
        except UnsupportedModelError as exc:
            pending.append(" ".join(str(exc).split()))
            continue
        if bounds.contradiction is not None:
            pending.append(f"refused: {bounds.contradiction}")
        elif not bounds.unsat:
            open_clauses = int((~bounds.refuted).sum())
            pending.append(f"{options.method} leaves {open_clauses} of {len(case.clauses)} clauses open "
                           f"(box {k}); the attack found no counterexample")
    if pending:
        return Verdict("unknown", "; ".join(dict.fromkeys(pending)))
    return Verdict("unsat", f"{options.method} proves that no input of the box satisfies the property")


def verify_instance(onnx_path: str | Path, vnnlib_path: str | Path, options: VerifyOptions | None = None,
                    timeout: float | None = None, prepared: Prepared | None = None) -> Verdict:
    """The answer to one VNN-LIB query on one ONNX model (``certkd verify model.onnx prop.vnnlib``).

    Parameters
    ----------
    onnx_path, vnnlib_path : the model and the query (``.gz`` accepted).
    options : VerifyOptions (method, attack, seed).
    timeout : seconds for the whole instance (None: no limit); past it the answer is ``timeout``.
    prepared : a model already prepared for this query (benchmark runs reuse one per ONNX file).

    Returns
    -------
    Verdict

    Example
    -------
    >>> verify_instance("net.onnx", "prop.vnnlib", timeout=60).result  # doctest: +SKIP
    'unsat'
    """
    options = options or VerifyOptions()
    options.check()
    spec = read_vnnlib(vnnlib_path)
    start = time.perf_counter()
    try:
        with _time_limit(timeout):
            prep = prepared or prepare(Path(onnx_path), [spec])
            verdict = answer(prep, spec, options, str(vnnlib_path))
    except _Timeout:
        return Verdict("timeout", f"no answer within {timeout:g} s", run_time=time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    verdict.prepare_time = prep.seconds if prepared is None else 0.0
    verdict.run_time = elapsed - verdict.prepare_time
    if timeout is not None and elapsed > timeout:
        return Verdict("timeout", f"the answer came after the time limit of {timeout:g} s", run_time=elapsed)
    return verdict


# --------------------------------------------------------------------------- benchmark folders

@dataclass
class Instance:
    index: int
    onnx: str  # as written in instances.csv
    vnnlib: str
    timeout: float
    onnx_path: Path
    vnnlib_path: Path


def read_instances(path: str | Path) -> list[Instance]:
    """The rows ``onnx,vnnlib,timeout`` of a VNN-COMP ``instances.csv`` (paths relative to its folder).

    Every file must exist; one sentence otherwise (before any work starts).
    """
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"{path}: no such instances file")
    out: list[Instance] = []
    for n, row in enumerate(csv.reader(io.StringIO(path.read_text())), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) < 3:
            raise CertkdError(f"{path}:{n}: expected 'onnx,vnnlib,timeout', found {','.join(cells)!r}")
        try:
            limit = float(cells[2])
        except ValueError:
            raise CertkdError(f"{path}:{n}: the timeout {cells[2]!r} is not a number") from None
        if not limit > 0:
            raise CertkdError(f"{path}:{n}: the timeout must be positive, got {cells[2]}")
        onnx_path, vnnlib_path = path.parent / cells[0], path.parent / cells[1]
        for file in (onnx_path, vnnlib_path):
            if not file.is_file():
                raise CertkdError(f"{path}:{n}: {file}: no such file")
        out.append(Instance(len(out), cells[0], cells[1], limit, onnx_path, vnnlib_path))
    if not out:
        raise CertkdError(f"{path}: no instances")
    return out


def read_results(path: str | Path) -> dict[tuple[str, str], str]:
    """A results file's answers: ``(onnx name, vnnlib name) -> result`` (file names, without folders or .gz).

    Reads VNN-COMP layouts: rows holding an onnx and a vnnlib path and a result word
    (sat/unsat/unknown/timeout/error, or 2021's holds/violated).
    """
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"{path}: no such results file")
    out: dict[tuple[str, str], str] = {}
    for row in csv.reader(io.StringIO(path.read_text())):
        cells = [c.strip() for c in row]
        onnx = next((c for c in cells if ".onnx" in c), None)
        vnnlib = next((c for c in cells if ".vnnlib" in c), None)
        result = next((RESULT_ALIASES[c.lower()] for c in cells if c.lower() in RESULT_ALIASES), None)
        if onnx and vnnlib and result:
            out[(_name(onnx), _name(vnnlib))] = result
    if not out:
        raise CertkdError(f"{path}: no rows with an onnx file, a vnnlib file and a result")
    return out


def _name(path: str) -> str:
    return Path(path).name.removesuffix(".gz")


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def run_instances(instances: str | Path, out_dir: str | Path, options: VerifyOptions | None = None,
                  resume: bool = False, overwrite: bool = False, expected: str | Path | None = None,
                  notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row of ``instances`` (``certkd verify --instances``); returns the summary.

    Writes ``out_dir/records.jsonl`` (the run log, appended per instance; ``resume``
    continues it), ``results.csv`` (VNN-COMP layout), ``counterexamples/`` and ``summary.json``.
    One model import and bound engine serve all rows of an ONNX file. With ``expected``
    (a results file of known answers), a known ``sat`` answered ``unsat`` is a soundness
    failure listed in the summary.
    """
    options = options or VerifyOptions()
    options.check()
    rows = read_instances(instances)
    known = read_results(expected) if expected is not None else {}
    specs: dict[Path, Spec] = {}
    sizes: dict[Path, int] = {}
    for inst in rows:  # every query parses, and fits its model's input, before any work starts
        if inst.vnnlib_path not in specs:
            specs[inst.vnnlib_path] = read_vnnlib(inst.vnnlib_path)
        if inst.onnx_path not in sizes:
            sizes[inst.onnx_path] = math.prod(input_shape_of(inst.onnx_path))
        if specs[inst.vnnlib_path].num_inputs != sizes[inst.onnx_path]:
            raise CertkdError(f"{instances}: {inst.vnnlib} has {specs[inst.vnnlib_path].num_inputs} inputs, "
                              f"{inst.onnx} takes {sizes[inst.onnx_path]}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"{out} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted({p for inst in rows for p in (inst.onnx_path, inst.vnnlib_path)})
    config = {"instances": str(Path(instances).name), "files_sha256": _file_digest([Path(instances), *files]),
              **asdict(options)}
    benchmark = Path(instances).resolve().parent.name
    prepared: dict[Path, Prepared | str] = {}

    def compute(inst: Instance) -> list[dict[str, Any]]:
        spec = specs[inst.vnnlib_path]
        start = time.perf_counter()
        prep = prepared.get(inst.onnx_path)
        prep_time = 0.0
        if prep is None:
            same = [specs[r.vnnlib_path] for r in rows if r.onnx_path == inst.onnx_path]
            try:
                with _time_limit(inst.timeout):
                    prep = prepare(inst.onnx_path, same)
                prep_time = prep.seconds
            except _Timeout:
                prep = "preparing the model took longer than the instance's timeout"
            except CertkdError as exc:
                prep = " ".join(str(exc).split())
            prepared[inst.onnx_path] = prep
        if isinstance(prep, str):
            verdict = Verdict("error" if "timeout" not in prep else "timeout", prep)
        else:
            try:
                check_fits(spec, prep.imp, str(inst.vnnlib_path))
                verdict = verify_instance(inst.onnx_path, inst.vnnlib_path, options,
                                          max(inst.timeout - prep_time, 1e-3), prep)
            except CertkdError as exc:
                verdict = Verdict("error", " ".join(str(exc).split()))
        if verdict.result == "timeout":
            prepared.pop(inst.onnx_path, None)  # interrupted inside a library: the next row prepares afresh
        verdict.prepare_time = prep_time
        verdict.run_time = time.perf_counter() - start - prep_time
        cex = None
        if verdict.counterexample is not None:
            cex = f"counterexamples/{inst.index:05d}.counterexample"
            (out / "counterexamples").mkdir(exist_ok=True)
            atomic_write_text(out / cex, verdict.counterexample)
        if notify is not None:
            notify(f"{inst.index}: {inst.onnx} {inst.vnnlib}: {verdict.result} ({verdict.run_time:.2f} s)")
        return [{"index": inst.index, "onnx": inst.onnx, "vnnlib": inst.vnnlib, "timeout": inst.timeout,
                 "result": verdict.result, "reason": verdict.reason, "prepare_time": round(verdict.prepare_time, 4),
                 "run_time": round(verdict.run_time, 4), "counterexample": cex}]

    with RecordLog.open(out / "records.jsonl", COMMAND, config, key=lambda r: (int(r["index"]),),
                        resume=resume, overwrite=overwrite) as log:
        execute([inst for inst in rows if log.missing([(inst.index,)])], compute, log, desc="verify")
        records = sorted(log.records, key=lambda r: int(r["index"]))
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    for r in records:
        writer.writerow([benchmark, r["onnx"], r["vnnlib"], f"{r['prepare_time']:.4f}", r["result"],
                         f"{r['run_time']:.4f}"])
    atomic_write_text(out / "results.csv", lines.getvalue())
    summary = summarize(records, known)
    atomic_write_json(out / "summary.json", summary)
    return summary


def summarize(records: list[dict[str, Any]], known: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Counts per answer, total time, and the soundness failures against known answers."""
    counts = {name: sum(r["result"] == name for r in records) for name in RESULTS}
    failures, disagreements = [], []
    for r in records:
        truth = known.get((_name(r["onnx"]), _name(r["vnnlib"])))
        if truth == "sat" and r["result"] == "unsat":
            failures.append(f"{r['onnx']} {r['vnnlib']}: known sat, answered unsat")
        elif truth == "unsat" and r["result"] == "sat":
            disagreements.append(f"{r['onnx']} {r['vnnlib']}: known unsat, answered sat (counterexample "
                                 f"{r['counterexample']})")
    return {"instances": len(records), "verified": counts["unsat"], "falsified": counts["sat"],
            "unknown": counts["unknown"], "timeout": counts["timeout"], "error": counts["error"],
            "time_s": round(sum(r["prepare_time"] + r["run_time"] for r in records), 3),
            "soundness_failures": failures, "disagreements": disagreements}


def format_run_summary(summary: dict[str, Any]) -> str:
    """The printed summary of a benchmark run."""
    text = (f"{summary['instances']} instances: {summary['verified']} verified (unsat), {summary['falsified']} "
            f"falsified (sat), {summary['unknown']} unknown, {summary['timeout']} timeout, {summary['error']} error; "
            f"{summary['time_s']:.1f} s")
    for line in summary["soundness_failures"]:
        text += f"\nSOUNDNESS FAILURE: {line}"
    for line in summary["disagreements"]:
        text += f"\ndisagreement: {line}"
    return text
