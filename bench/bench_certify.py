"""Speed of bounds.certify, measured side by side (theory.md §2.1).

(1) ``certified_radius`` (attack upper end + joint search of all examples) divided by ONE
    CROWN pass at a fixed eps on the same points. Target: at most 4.
(2) ``BoundEngine.margin_bounds`` divided by calling auto_LiRPA directly (a ``BoundedModule``
    of the same verification view, the same spec matrix and perturbation built by hand) on
    the same batch. Target: at most 1.1.

Both are run interleaved for ``--rounds`` rounds; medians are reported. The model is a
PGD-trained digits cnn4: ``--checkpoint`` or, by default, one trained here (``certkd.train``).

    python bench/bench_certify.py --threads 1
    python bench/bench_certify.py --checkpoint teacher.pt --norm 2 --fixed-eps 0.1 --tol 2e-3
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import torch

from bounds.certify import BoundEngine, margin_spec
from bounds.lirpa import import_auto_lirpa
from certkd.checkpoint import load_model
from certkd.data import load_dataset


def pgd_trained_cnn(out: Path) -> Path:
    from certkd.train import ObjectiveParams, TrainConfig, train

    return train(TrainConfig(method="pgd-at", arch="cnn4", out=out / "teacher.pt", epochs=8, batch_size=128, lr=0.1,
                             params=ObjectiveParams(eps=0.2, norm="inf", attack_steps=5), val_size=200,
                             val_attack_steps=10, progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--norm", default="inf", choices=["inf", "2"])
    parser.add_argument("--fixed-eps", type=float, default=2 / 255)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(args.checkpoint or pgd_trained_cnn(Path(tmp))).eval()
    data = load_dataset("digits", "test")
    x, y = data.x[:args.examples], data.y[:args.examples]
    shape = data.info.input_shape
    engine = BoundEngine(model, shape, batch_size=args.examples)
    p = math.inf if args.norm == "inf" else 2.0

    lirpa = import_auto_lirpa()
    direct = lirpa.BoundedModule(engine.view, torch.zeros(1, *shape), bound_opts={"sparse_features_alpha": False})

    def direct_call() -> torch.Tensor:
        if math.isinf(p):
            ptb = lirpa.PerturbationLpNorm(norm=p, eps=args.fixed_eps, x_L=(x - args.fixed_eps).clamp(0, 1),
                                           x_U=(x + args.fixed_eps).clamp(0, 1))
        else:
            ptb = lirpa.PerturbationLpNorm(norm=p, eps=args.fixed_eps)
        with torch.no_grad():
            return direct.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method="CROWN",
                                         bound_upper=False)[0]

    def certkd_call() -> torch.Tensor:
        return engine.margin_bounds(x, y, args.fixed_eps, args.norm, "crown").lower

    assert torch.allclose(direct_call(), certkd_call(), atol=1e-5)  # the same bounds
    radius_times, pass_times, direct_times, certkd_times = [], [], [], []
    result = None
    for r in range(args.rounds):
        pass_times.append(timeit.timeit(certkd_call, number=1))
        generator = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        result = engine.certified_radius(x, y, args.norm, "crown", tol=args.tol, generator=generator)
        radius_times.append(time.perf_counter() - start)
        direct_times.append(timeit.timeit(direct_call, number=1))
        certkd_times.append(timeit.timeit(certkd_call, number=1))
    one_pass, radius = statistics.median(pass_times), statistics.median(radius_times)
    rows = sum(len(e) for e in result.pass_eps) / max(int(result.correct.sum()), 1)
    print(f"model cnn4 (PGD-AT, digits), {args.examples} points, L{args.norm}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"(1) radius search {radius:.3f}s / one CROWN pass at eps {args.fixed_eps:.4g} {one_pass:.3f}s = "
          f"{radius / one_pass:.2f}  (target <= 4; {result.passes} passes, {rows:.2f} examples-passes per "
          f"point, tol {args.tol:g}, mean radius {float(result.radius.mean()):.4f})")
    mine, theirs = statistics.median(certkd_times), statistics.median(direct_times)
    print(f"(2) certkd margin_bounds {mine:.3f}s / auto_LiRPA directly {theirs:.3f}s = {mine / theirs:.3f}  "
          f"(target <= 1.1)")


if __name__ == "__main__":
    main()
