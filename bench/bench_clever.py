"""CLEVER throughput relative to a raw batched forward + backward over the same points (theory.md §2.2).

CLEVER (``bounds.clever.clever``: sampling in the ball, batched margin gradients, dual norms,
batch maxima, reverse-Weibull fits) against the bare gradient work it cannot avoid: one forward
and one backward of the same margins (all K-1 of them, batched, when untargeted; one when
targeted) on the same number of points, in steps of the same size. Both run interleaved, round
by round; the median of each is reported. Target: ratio (CLEVER points/s over raw points/s) >= 0.8.

    python bench/bench_clever.py --threads 1                         # mlp on digits-sized inputs, CPU
    python bench/bench_clever.py --arch resnet_small --shape 3,32,32 --examples 8 --points-per-step 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bounds.clever import clever
from bounds.gradients import other_classes
from certkd.models import create_model


def raw_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor,
                  n_points: int, step: int) -> None:
    """Forward + backward of the margins ``f_y - f_j`` (j in targets) over ``n_points`` points."""
    m = targets.shape[1]
    for start in range(0, n_points, step):
        idx = torch.arange(start, min(start + step, n_points), device=x.device) % len(x)
        points = x[idx].clone().requires_grad_(True)
        logits = model(points)
        margins = logits.gather(1, y[idx].view(-1, 1)) - logits.gather(1, targets[idx])
        if m == 1:
            torch.autograd.grad(margins.sum(), points)
        else:
            eye = torch.eye(m, device=x.device).unsqueeze(1).expand(m, *margins.shape)
            torch.autograd.grad(margins, points, eye, is_grads_batched=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--shape", default="1,8,8", help="input shape C,H,W")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--n-batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--points-per-step", type=int, default=4096)
    parser.add_argument("--norm", default="2")
    parser.add_argument("--targeted", action="store_true", help="one target class per example (top-2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = create_model(args.arch, 10, shape).to(device).eval().requires_grad_(False)
    x = torch.rand(args.examples, *shape, device=device)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    targets = logits.topk(2, dim=1).indices[:, 1:] if args.targeted else other_classes(y, 10)
    n_points = args.examples * args.n_batches * args.batch_size
    step = max(1, args.points_per_step // args.batch_size) * args.batch_size

    times = {"clever": [], "raw": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        sync(device)
        t0 = time.perf_counter()
        clever(model, x, y, args.norm, 0.5, args.n_batches, args.batch_size,
               targets=targets if args.targeted else None, points_per_step=args.points_per_step,
               generator=torch.Generator(device=device).manual_seed(r))
        sync(device)
        t1 = time.perf_counter()
        raw_gradients(model, x, y, targets, n_points, step)
        sync(device)
        t2 = time.perf_counter()
        if r:
            times["clever"].append(t1 - t0)
            times["raw"].append(t2 - t1)
    clever_s, raw_s = statistics.median(times["clever"]), statistics.median(times["raw"])
    kind = "targeted" if args.targeted else f"untargeted ({targets.shape[1]} margins)"
    print(f"{args.arch} {shape} on {device}, {kind}, L{args.norm}: {args.examples} examples x "
          f"{args.n_batches} batches x {args.batch_size} points = {n_points} points")
    print(f"CLEVER {clever_s:.3f} s, raw forward+backward {raw_s:.3f} s (median of {args.rounds})")
    print(f"throughput ratio CLEVER / raw = {raw_s / clever_s:.2f} (target >= 0.8)")
    if device.type == "cuda":
        print(f"CLEVER {n_points / clever_s:,.0f} points/s; raw {n_points / raw_s:,.0f} points/s")


if __name__ == "__main__":
    main()
