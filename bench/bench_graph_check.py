"""Cost of the graph check: ``GraphCheck.check`` over one CROWN pass, side by side.

Both run interleaved on the same batch of a registry cnn7 on digits-shaped inputs for
``--rounds`` rounds; medians are reported. Target: (CROWN + check) / CROWN at most 1.05.

    python bench/bench_graph_check.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import timeit

import torch

from bounds.certify import BoundEngine, margin_spec
from certkd.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--shape", default="1,8,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = create_model("cnn7", 10, shape, [0.3] * shape[0], [0.3] * shape[0]).eval()
    engine = BoundEngine(model, shape)
    x = torch.rand(args.examples, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(args.examples, dtype=torch.long)
    eps = torch.full((args.examples,), 2 / 255)
    lirpa = engine._lirpa
    ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=2 / 255, x_L=(x - 2 / 255).clamp(0, 1),
                                   x_U=(x + 2 / 255).clamp(0, 1))

    def crown() -> None:
        with torch.no_grad():
            engine.bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method="CROWN",
                                          bound_upper=False)

    def check() -> None:
        engine.graph_check.check(x, eps, math.inf)

    crown_times, check_times = [], []
    for _ in range(args.rounds):
        crown_times.append(timeit.timeit(crown, number=1))
        check_times.append(timeit.timeit(check, number=1))
    c, g = statistics.median(crown_times), statistics.median(check_times)
    print(f"cnn7 {shape}, {args.examples} examples: CROWN {c:.3f} s, graph check {g * 1e3:.1f} ms, "
          f"ratio (CROWN + check) / CROWN = {(c + g) / c:.4f} (target <= 1.05)")


if __name__ == "__main__":
    main()
