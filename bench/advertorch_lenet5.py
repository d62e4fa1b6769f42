"""The acceptance run of an advertorch-style PGD-trained MNIST LeNet5 into stock certkd.

1. Train advertorch's ``LeNet5`` (the class exactly as published in ``advertorch.test_utils``,
   defined here without certkd) with L-inf PGD adversarial training (advertorch's
   ``LinfPGDAttack`` recipe: random start, sign steps, projection) on MNIST-format data,
   and save its plain ``state_dict``. Real MNIST idx files are used when ``--mnist-dir``
   holds them; otherwise scikit-learn's digits are upsampled to 28x28 and written as idx
   files (the same format and shapes; no download here).
2. ``certkd convert --arch lenet5 --normalization identity`` in a fresh process.
3. The converted checkpoint must reproduce the original model's logits exactly (``torch.equal``).
4. ``certkd certify --method crown`` at default settings in a fresh process; its peak resident
   memory (``os.wait4``) is compared with the default ``--max-memory`` budget it printed.

    python bench/advertorch_lenet5.py --epochs 2 --num-examples 64
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from external_models import AdvertorchLeNet5 as LeNet5  # noqa: E402  (the class exactly as published)


def linf_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step: float) -> torch.Tensor:
    """advertorch LinfPGDAttack: uniform random start, ``steps`` sign-gradient steps, projection, clip to [0, 1]."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_format_digits(folder: Path) -> None:
    """scikit-learn digits, upsampled to 28x28 (bilinear, 20x20 centred like MNIST), as idx files."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.data / 16.0).float().view(-1, 1, 8, 8)
    images = F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(pixels, bunch.target.astype(np.uint8), test_size=0.25,
                                              random_state=0, stratify=bunch.target)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, xs, ys in (("train", x_tr, y_tr), ("t10k", x_te, y_te)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx(np.ascontiguousarray(xs)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(np.ascontiguousarray(ys)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, eps: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 50):
            idx_ = order[i:i + 50]
            model.eval()
            x_adv = linf_pgd(model, x[idx_], y[idx_], eps, steps=10, step=eps / 4)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x_adv), y[idx_]).backward()
            opt.step()
        print(f"epoch {epoch + 1}/{epochs} done", flush=True)
    model.eval()


def certkd(args: list[str], cwd: Path, data_dir: Path) -> tuple[str, str, int, int]:
    """A fresh ``python -m certkd`` process: stdout, stderr, exit code, its own peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CERTKD_DATA_DIR": str(data_dir)}
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "certkd", *args], cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    return ((cwd / "out.txt").read_text(), (cwd / "err.txt").read_text(), os.waitstatus_to_exitcode(status),
            usage.ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", type=Path, default=None, help="Real MNIST idx files (else digits, upsampled).")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-eps", type=float, default=0.3)
    parser.add_argument("--eps", default="0.02")
    parser.add_argument("--num-examples", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from certkd.checkpoint import load_checkpoint
    from certkd.data import load_dataset

    work = Path(tempfile.mkdtemp(prefix="advertorch_lenet5_"))
    data_dir = args.mnist_dir or work / "mnist"
    if args.mnist_dir is None:
        mnist_format_digits(data_dir)
    train_set, test_set = load_dataset("mnist", "train", data_dir), load_dataset("mnist", "test", data_dir)
    torch.manual_seed(0)
    model = LeNet5()
    start = time.perf_counter()
    train(model, train_set.x, train_set.y, args.epochs, args.train_eps)
    print(f"PGD training: {time.perf_counter() - start:.0f}s")
    torch.save(model.state_dict(), work / "lenet5_advtrained.pt")

    out, err, code, _ = certkd(["convert", "--arch", "lenet5", "--dataset", "mnist", "--weights",
                                "lenet5_advtrained.pt", "--normalization", "identity", "--out", "lenet5.pt"],
                               work, data_dir)
    assert code == 0, err
    print(out.strip())
    converted = load_checkpoint(work / "lenet5.pt").build_model()
    with torch.no_grad():
        same = torch.equal(converted(test_set.x), model(test_set.x))
        accuracy = float((model(test_set.x).argmax(1) == test_set.y).float().mean())
    print(f"outputs on all {len(test_set)} test points identical: {same}; clean accuracy {accuracy:.3f}")

    out, err, code, peak = certkd(["certify", "lenet5.pt", "--method", "crown", "--eps", args.eps, "-n",
                                   str(args.num_examples), "--out", "certify.json"], work, data_dir)
    assert code == 0, err
    summary = json.loads((work / "certify.json").read_text())
    plan = summary["provenance"]["memory_plan"]
    print(out.strip())
    print("stderr:", err.strip().replace("\n", " | "))
    budget = plan["budget_bytes"]
    print(f"certify peak RSS {peak / 2**30:.2f} GB; bound batch {plan['batch_size']} "
          f"({plan['per_point_bytes'] / 2**20:.0f} MB per point measured); default budget "
          f"{budget / 2**30:.2f} GB; within budget: {peak <= budget + 2**30} (1 GB allowance for torch itself)")


if __name__ == "__main__":
    main()
