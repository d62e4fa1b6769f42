"""Write a VNN-COMP-style benchmark folder of small MNIST and synthetic models, for ``certkd verify --instances``.

    python examples/vnncomp_folder.py --data-dir /work/data/mnist --out bench_folder
    certkd verify --instances bench_folder/instances.csv --expected bench_folder/expected_results.csv \
        --out runs/bench_folder

The MNIST model is a 784-64-64-10 ReLU network (inputs (1, 784) in [0, 1], as VNN-COMP's mnist_fc)
trained for one epoch; its queries are the L-inf robustness of the first test images at two radii.
The synthetic model carries planted counterexamples (``certkd.planted``): a correct verifier never
answers those ``unsat``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from certkd.data import load_dataset
from certkd.onnx_io import export_onnx
from certkd.planted import planted_folder
from certkd.vnnlib import robustness_spec, write_vnnlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = load_dataset("mnist", "train", args.data_dir)
    x, y = train.batch(list(range(len(train))))
    net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.randperm(len(x))
    for start in range(0, len(x), 128):  # one epoch
        idx = order[start:start + 128]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx].flatten(1)), y[idx]).backward()
        opt.step()
    net.eval()
    bench = planted_folder(args.out, timeout=args.timeout)
    export_onnx(net, (784,), args.out / "mnist_fc.onnx")
    test = load_dataset("mnist", "test", args.data_dir)
    xt, yt = test.batch(list(range(args.points)))
    rows = []
    for i in range(args.points):
        for eps in args.eps:
            name = f"mnist_prop_{i}_{eps:g}.vnnlib"
            write_vnnlib(args.out / name, robustness_spec(xt[i], eps, int(yt[i]), 10))
            rows.append(f"mnist_fc.onnx,{name},{args.timeout:g}")
    with open(bench.instances, "a") as fh:
        fh.write("\n".join(rows) + "\n")
    with torch.no_grad():
        accuracy = float((net(xt.flatten(1)).argmax(1) == yt).float().mean())
    print(f"wrote {bench.instances}: {len(rows)} MNIST queries (clean accuracy on them {accuracy:.2f}), "
          f"{len(bench.planted)} planted and {len(bench.clean)} clean synthetic queries")


if __name__ == "__main__":
    main()
