"""Cost of the evidence gate: ``BoundEngine.margin_bounds`` (graph check, bound, rounding allowance, evidence
points, per-node intervals) over one bare auto_LiRPA CROWN pass on the same batch, side by side.

Models: a registry cnn7 on digits-shaped inputs (1x8x8; CROWN on cnn7 at 28x28 takes about 10 GB for four
points on a CPU) and an advertorch-layout LeNet5 on MNIST-shaped inputs (1x28x28), eps 0.02 L-inf.
Both paths run interleaved for ``--rounds`` rounds; medians are reported. Target: ratio at most 1.10.

    python bench/bench_gate.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from bounds.certify import BoundEngine, margin_spec
from certkd.models import create_model


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, shape: tuple[int, ...], examples: int, rounds: int, eps: float) -> float:
    torch.manual_seed(0)
    model = create_model(name, 10, shape, [0.1307] * shape[0], [0.3081] * shape[0]).eval()
    engine = BoundEngine(model, shape, batch_size=examples)
    x = torch.rand(examples, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    lirpa = engine._lirpa
    ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))

    def bare() -> None:
        with torch.no_grad():
            engine.bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method="CROWN",
                                          bound_upper=False)

    def gated() -> None:
        engine.margin_bounds(x, y, eps, "inf", "crown")

    bare_times, gated_times = [], []
    for _ in range(rounds):
        bare_times.append(timed(bare))
        gated_times.append(timed(gated))
    b, g = statistics.median(bare_times), statistics.median(gated_times)
    print(f"{name} {shape}, {examples} examples: CROWN {b:.3f} s, margin_bounds with the gate {g:.3f} s, "
          f"ratio {g / b:.3f} (target <= 1.10)")
    return g / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="cnn7:1x8x8,lenet5:1x28x28")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for entry in args.models.split(","):
        name, shape = entry.split(":")
        compare(name, tuple(int(s) for s in shape.split("x")), args.examples, args.rounds, args.eps)


if __name__ == "__main__":
    main()
