"""The table of examples/mnist_transfer.sh: clean, PGD-40 and APGD accuracy, share of the teacher's kept, s/epoch.

    python examples/mnist_table.py OUT teacher kdiga_w1_0.1 ... kd

Reads ``OUT/NAME.eval.json`` (``certkd certify --method apgd --pgd-steps 40``) and ``OUT/NAME.metrics.jsonl``;
a student named ``..._EPS`` is shown at its training radius, the teacher and ``kd`` at every radius.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def accuracies(evaluation: dict) -> dict[tuple[str, float], float]:
    return {(r["method"], float(r["eps"])): r["accuracy"] for r in evaluation["results"]}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    evals = {n: json.loads((out / f"{n}.eval.json").read_text()) for n in names if (out / f"{n}.eval.json").exists()}
    teacher = accuracies(evals["teacher"])
    radii = sorted({e for (_, e) in teacher})
    print("| model | trained at | clean | PGD-40 | APGD | kept (PGD-40) | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for name, ev in evals.items():
        acc = accuracies(ev)
        tail = name.rsplit("_", 1)[-1]
        own = [float(tail)] if tail.replace(".", "", 1).isdigit() else radii
        metrics = out / f"{name}.metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        seconds = f"{sum(r['seconds'] for r in rows) / len(rows):.0f}" if rows else ""
        for e in own:
            pgd, apgd = acc.get(("pgd", e)), acc.get(("apgd", e))
            kept = "" if name == "teacher" or not teacher.get(("pgd", e)) else f"{100 * pgd / teacher[('pgd', e)]:.0f} %"
            print(f"| {name} | {tail if len(own) == 1 else 'eps ' + str(e)} | "
                  f"{100 * ev['clean_accuracy']['accuracy']:.1f} | {100 * pgd:.1f} | {100 * apgd:.1f} | {kept} | {seconds} |")
    n = evals["teacher"].get("num_examples")
    print(f"\nAccuracy in % on the first {n} MNIST test points (PGD-40 and APGD are estimates); kept: the student's "
          "PGD-40 accuracy over the teacher's at the same radius.")


if __name__ == "__main__":
    main()
