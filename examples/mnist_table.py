"""The table of examples/mnist_transfer.sh: clean, PGD-40 and APGD accuracy, share of the teacher's kept, s/epoch.

    python examples/mnist_table.py OUT teacher kdiga_w1_0.1 ... kd
    python examples/mnist_table.py OUT_SEED0,OUT_SEED1,OUT_SEED2 teacher ...   # mean +- sd over the seeds

Reads ``OUT/NAME.eval.json`` (``certkd certify --method apgd --pgd-steps 40``) and ``OUT/NAME.metrics.jsonl``;
a student named ``..._EPS`` is shown at its training radius, the teacher and ``kd`` at every radius. With several
folders (one per seed, the same teacher) every figure is the mean over the folders that hold the model, with the
sample standard deviation; "kept" is taken per seed against that folder's teacher evaluation.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def accuracies(evaluation: dict) -> dict[tuple[str, float], float]:
    return {(r["method"], float(r["eps"])): r["accuracy"] for r in evaluation["results"]}


def cell(values: list[float]) -> str:
    """``mean`` or ``mean +- sd`` of the per-seed values, in %."""
    mean = f"{100 * statistics.mean(values):.1f}"
    return mean if len(values) < 2 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    outs, names = [Path(p) for p in sys.argv[1].split(",")], sys.argv[2:]
    evals = {o: {n: json.loads((o / f"{n}.eval.json").read_text()) for n in names if (o / f"{n}.eval.json").exists()}
             for o in outs}
    teachers = {o: accuracies(evals[o]["teacher"]) for o in outs}
    radii = sorted({e for (_, e) in teachers[outs[0]]})
    seeds = len(outs) > 1
    print("| model | trained at | clean | PGD-40 | APGD | kept (PGD-40) | s/epoch |" + (" seeds |" if seeds else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if seeds else ""))
    for name in names:
        held = [o for o in outs if name in evals[o]]
        if not held:
            continue
        tail = name.rsplit("_", 1)[-1]
        own = [float(tail)] if tail.replace(".", "", 1).isdigit() else radii
        rows = [json.loads(line) for o in held if (o / f"{name}.metrics.jsonl").exists()
                for line in (o / f"{name}.metrics.jsonl").read_text().splitlines()]
        seconds = f"{sum(r['seconds'] for r in rows) / len(rows):.0f}" if rows else ""
        for e in own:
            acc = [accuracies(evals[o][name]) for o in held]
            pgd, apgd = [a[("pgd", e)] for a in acc], [a[("apgd", e)] for a in acc]
            kept = "" if name == "teacher" else cell([p / teachers[o][("pgd", e)] for p, o in zip(pgd, held, strict=True)])
            clean = [evals[o][name]["clean_accuracy"]["accuracy"] for o in held]
            print(f"| {name} | {tail if len(own) == 1 else 'eps ' + str(e)} | {cell(clean)} | {cell(pgd)} | "
                  f"{cell(apgd)} | {kept}{' %' if kept else ''} | {seconds} |" + (f" {len(held)} |" if seeds else ""))
    n = evals[outs[0]]["teacher"].get("num_examples")
    print(f"\nAccuracy in % on the first {n} MNIST test points (PGD-40 and APGD are estimates); kept: the student's "
          "PGD-40 accuracy over the teacher's at the same radius" + (", mean ± sd over the seeds." if seeds else "."))


if __name__ == "__main__":
    main()
