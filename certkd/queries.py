"""certkd's certification queries for other verifiers, and their answers back as certify records.

``export_queries`` (``certkd certify ... --export-vnnlib DIR``) writes a VNN-COMP
benchmark folder: ``model.onnx`` (the checkpoint's verification view, inputs in [0, 1]),
one VNN-LIB file per (point, eps) (the L-inf robustness query: ``unsat`` means the point is
robust at eps), ``instances.csv`` and ``queries.json`` (which point and eps each file asks
about). ``import_results`` (``certkd import-results``) reads a verifier's ``results.csv``
for that folder and writes certify records (method ``complete``, kind ``certified``):
``unsat`` is certified, ``sat`` is not (a counterexample exists), anything else is not
certified either. Each record's ``radius`` is the largest exported eps its point was
answered ``unsat`` at (a certified radius on the exported grid: L-inf balls are nested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bounds.view import verification_view
from certkd.checkpoint import file_sha256, load_checkpoint
from certkd.errors import CertkdError
from certkd.io import atomic_write_json, atomic_write_text, check_output_dir
from certkd.onnx_io import export_onnx, require_onnx
from certkd.runs import read_log, write_log
from certkd.vnnlib import robustness_spec, write_vnnlib

QUERIES_FILE = "queries.json"
COMPLETE = "complete"
"""The method name of records imported from a complete verifier's results."""

__all__ = ["export_queries", "import_results", "QUERIES_FILE", "COMPLETE"]


def export_queries(checkpoint: str | Path, out_dir: str | Path, eps: list[float], dataset: str | None = None,
                   split: str = "test", data_dir: Path | None = None, num_examples: int | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
    """Write the L-inf certification queries of the first points of a split as a VNN-COMP folder.

    Parameters
    ----------
    checkpoint : the certkd checkpoint.
    out_dir : the folder (created; must not hold another export).
    eps : the radii; one VNN-LIB file per (point, eps). Points the model misclassifies are
        skipped (certify never certifies them).
    dataset, split, data_dir, num_examples : the points, as for ``certkd certify``.
    timeout : the per-instance timeout written in ``instances.csv``.

    Returns
    -------
    dict: the ``queries.json`` contents (``queries``, and the ``misclassified`` points without one).

    Example
    -------
    >>> export_queries("ckpt.pt", "queries", [2 / 255], num_examples=10)  # doctest: +SKIP
    """
    require_onnx()
    from certkd.loading import load_points

    out = check_output_dir(out_dir, "--export-vnnlib")
    if (out / QUERIES_FILE).exists():
        raise CertkdError(f"{out} already holds exported queries; use another folder")
    ckpt = load_checkpoint(checkpoint)
    name, data, count = load_points(ckpt, dataset, split, data_dir, num_examples)
    model = ckpt.build_model()
    view = verification_view(model, ckpt.input_shape)
    export_onnx(view, ckpt.input_shape, out / "model.onnx")
    x, y = data.batch(list(range(count)))
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    rows, queries, skipped = [], [], []
    for i in range(count):
        if int(pred[i]) != int(y[i]):
            skipped.append({"index": i, "label": int(y[i]), "pred": int(pred[i])})
            continue
        for e in eps:
            file = f"prop_{i}_eps_{e:.6g}.vnnlib"
            write_vnnlib(out / file, robustness_spec(x[i], e, int(y[i]), ckpt.num_classes),
                         comment=f"certkd: point {i} of {name}/{split}, label {int(y[i])}, L-inf eps {e!r}")
            rows.append(f"model.onnx,{file},{timeout:g}")
            queries.append({"vnnlib": file, "index": i, "label": int(y[i]), "pred": int(pred[i]), "eps": float(e)})
    atomic_write_text(out / "instances.csv", "\n".join(rows) + ("\n" if rows else ""))
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "dataset": name,
            "split": split, "num_examples": count, "norm": "inf", "eps": [float(e) for e in eps],
            "onnx": "model.onnx", "queries": queries, "misclassified": skipped}
    atomic_write_json(out / QUERIES_FILE, info)
    return info


def import_results(results: str | Path, queries_dir: str | Path, per_example: str | Path) -> dict[str, int]:
    """Certify records from a verifier's ``results.csv`` for the queries exported in ``queries_dir``.

    Every exported query must have an answer (one sentence naming the first missing one
    otherwise). Returns the counts of answers.
    """
    from certkd.verify import read_results

    info = _read_queries(Path(queries_dir))
    answers = {vnnlib: result for (_, vnnlib), result in read_results(results).items()}
    missing = [q["vnnlib"] for q in info["queries"] if q["vnnlib"] not in answers]
    if missing:
        raise CertkdError(f"{results}: no answer for {len(missing)} of the exported queries (first: {missing[0]})")
    records = []
    counts: dict[str, int] = {}
    radius: dict[int, float] = {}  # the largest exported eps answered unsat (balls are nested: robust below it)
    for q in info["queries"]:
        if answers[q["vnnlib"]] == "unsat":
            radius[q["index"]] = max(radius.get(q["index"], 0.0), q["eps"])
    for q in info["queries"]:
        result = answers[q["vnnlib"]]
        counts[result] = counts.get(result, 0) + 1
        records.append({"index": q["index"], "label": q["label"], "pred": q["pred"], "method": COMPLETE,
                        "kind": "certified", "target": "model", "norm": "inf", "eps": q["eps"],
                        "robust": result == "unsat", "certified": result == "unsat", "margin_lb": None,
                        "margin_ub": None, "verifier_result": result, "radius": radius.get(q["index"], 0.0)})
    for s in info.get("misclassified", []):  # no query: never certified, as in certify
        records += [{"index": s["index"], "label": s["label"], "pred": s["pred"], "method": COMPLETE,
                     "kind": "certified", "target": "model", "norm": "inf", "eps": float(e), "robust": False,
                     "certified": False, "margin_lb": None, "margin_ub": None, "verifier_result": "misclassified",
                     "radius": 0.0} for e in info["eps"]]
    records.sort(key=lambda r: (r["index"], r["eps"]))
    config = {"checkpoint_sha256": info["checkpoint_sha256"], "dataset": info["dataset"], "split": info["split"],
              "num_examples": info["num_examples"], "methods": [COMPLETE], "eps": info["eps"], "norm": "inf",
              "radius": "grid",
              "source": f"import of {Path(results).name}"}
    path = Path(per_example)
    if path.exists() and read_log(path)[0] is not None:
        raise CertkdError(f"{path} already holds records; use another file")
    write_log(path, "certify", config, records)
    return counts


def _read_queries(folder: Path) -> dict[str, Any]:
    import json

    path = folder / QUERIES_FILE
    if not path.is_file():
        raise CertkdError(f"{folder}: no {QUERIES_FILE} (export the queries with certkd certify --export-vnnlib)")
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        info["queries"] = list(info["queries"])
    except (ValueError, KeyError, TypeError):
        raise CertkdError(f"{path}: not a queries file written by certkd") from None
    return info
