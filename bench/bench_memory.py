"""Peak memory per point of certkd's bound passes against raw auto_LiRPA on the same batch.

For each model (certkd's cnn7 and the LeNet family: advertorch ``lenet5`` and TRADES
``small_cnn``) and method, two fresh processes bound the same batch at the same eps:

- ``certkd``: ``BoundEngine.margin_bounds`` with the bound batch that ``certkd.memory.plan_batch``
  chooses (one probe pass, then the batch) -- what ``certkd certify`` runs;
- ``raw``: auto_LiRPA called directly (a ``BoundedModule`` of the same verification view, the
  same margin spec matrix and perturbation, the whole batch at once).

Each process measures the peak resident memory its bound call adds (``certkd.memory.measure_peak``)
and the ratio ``certkd / raw`` per point is printed. Target: at most 1.1. The planned batch and
the per-point cost the probe measured are printed too.

    python bench/bench_memory.py --batch 8
    python bench/bench_memory.py --models lenet5 --methods crown,alpha-crown --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MODELS = {"cnn7": ("cifar10", {"width": 16, "linear": 128}), "lenet5": ("mnist", {}), "small_cnn": ("mnist", {})}
REPO = Path(__file__).resolve().parents[1]


def child(model_name: str, method: str, batch: int, which: str, eps: float) -> dict:
    """Runs in a fresh process: one bound pass of ``which`` on ``batch`` random points; peak bytes added."""
    import torch

    from bounds.certify import _LIRPA_METHODS, BoundEngine, margin_spec
    from certkd.data import dataset_info
    from certkd.memory import measure_peak, plan_batch
    from certkd.models import create_model

    dataset, kwargs = MODELS[model_name]
    meta = dataset_info(dataset)
    torch.manual_seed(0)
    model = create_model(model_name, meta.num_classes, meta.input_shape, meta.mean, meta.std, **kwargs).eval()
    x = torch.rand(batch, *meta.input_shape)
    y = torch.randint(0, meta.num_classes, (batch,))
    engine = BoundEngine(model, meta.input_shape, batch_size=batch)
    engine.check(method, "inf")
    result: dict = {"model": model_name, "method": method, "batch": batch, "which": which}
    if which == "certkd":
        plan = plan_batch(lambda n: engine.margin_bounds(x[:n], y[:n], eps, "inf", method), min(2, batch), batch)
        engine.batch_size = plan.batch_size
        result["plan"] = plan.to_dict()
        with measure_peak() as used:
            engine.margin_bounds(x, y, eps, "inf", method)
    else:
        lirpa = engine._lirpa
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
        with measure_peak() as used, torch.set_grad_enabled(method == "alpha-crown"):
            engine.bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, engine.num_classes),
                                          method=_LIRPA_METHODS[method], bound_upper=False)
    result["peak_bytes"] = used["bytes"]
    return result


def run_child(model: str, method: str, batch: int, which: str, eps: float, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, __file__, "--child", json.dumps([model, method, batch, which, eps])]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {method} {which} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn7,lenet5,small_cnn")
    parser.add_argument("--methods", default="crown")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=2 / 255)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    mb = 1 << 20
    print(f"{'model':<10} {'method':<12} {'batch':>5} {'raw MB/pt':>10} {'certkd MB/pt':>13} {'ratio':>6}  plan")
    for model in args.models.split(","):
        for method in args.methods.split(","):
            raw = run_child(model, method, args.batch, "raw", args.eps, args.threads)
            ours = run_child(model, method, args.batch, "certkd", args.eps, args.threads)
            r, c = raw["peak_bytes"] / args.batch / mb, ours["peak_bytes"] / args.batch / mb
            plan = ours["plan"]
            print(f"{model:<10} {method:<12} {args.batch:>5} {r:>10.1f} {c:>13.1f} {c / max(r, 1e-9):>6.2f}  "
                  f"batch {plan['batch_size']}, probe {plan['per_point_bytes'] / mb:.0f} MB/pt, "
                  f"budget {plan['budget_bytes'] / mb:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
