"""A VNN-COMP-style benchmark folder with planted counterexamples (a soundness self-check).

``planted_folder`` trains a small ReLU network on a synthetic 2-class problem in which
point ``p`` (class 0) and its neighbour ``q = p + delta`` (class 1) are both fitted, so
every robustness query of ``p`` with ``eps >= |delta|_inf`` has a counterexample (``q``),
checked by a forward pass before anything is written. Clean queries at a small eps around
points far from the decision boundary complete the folder. The folder holds the ONNX
model, the VNN-LIB queries, ``instances.csv`` and ``expected_results.csv`` (the planted
queries answered ``sat``): a verifier that answers one of them ``unsat`` is unsound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.io import atomic_write_text
from certkd.onnx_io import export_onnx
from certkd.vnnlib import robustness_spec, write_vnnlib

__all__ = ["PlantedFolder", "planted_folder", "fit_classifier"]

DELTA = 0.06  # |q - p|_inf: the planted counterexample's distance


@dataclass
class PlantedFolder:
    """The written folder: its ``instances.csv``, the planted (sat) and the clean query file names."""

    instances: Path
    expected: Path
    planted: list[str]
    clean: list[str]


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """Full-batch Adam (lr 0.01) on the cross-entropy for ``steps`` steps; the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.autograd.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    return model.eval()


def planted_folder(folder: str | Path, seed: int = 3, timeout: float = 30.0, name: str = "planted") -> PlantedFolder:
    """Write the planted benchmark into ``folder`` (module docstring); returns what it wrote.

    Example
    -------
    >>> bench = planted_folder("bench")  # doctest: +SKIP
    >>> # certkd verify --instances bench/instances.csv --expected bench/expected_results.csv --out runs
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(300, 4, generator=gen)
    y = (x[:, 0] + x[:, 1] > 1.0).long()
    p = torch.tensor([0.2, 0.2, 0.5, 0.5])
    q = p + torch.tensor([0.0, 0.0, DELTA, 0.0])
    x = torch.cat([x, p.repeat(20, 1), q.repeat(20, 1)])
    y = torch.cat([y, torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    net = fit_classifier(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)), x, y, 600)
    with torch.no_grad():
        if net(p[None]).argmax().item() != 0 or net(q[None]).argmax().item() != 1:
            raise CertkdError(f"seed {seed}: the network did not fit the planted pair; try another seed")
    export_onnx(net, (4,), folder / f"{name}.onnx")
    rows: list[str] = []
    planted: list[str] = []
    clean: list[str] = []
    queries = ((f"{name}_a", p, 0, DELTA + 0.01), (f"{name}_b", p, 0, DELTA + 0.04),
               ("clean_a", torch.tensor([0.1, 0.1, 0.5, 0.5]), 0, 0.002),
               ("clean_b", torch.tensor([0.9, 0.9, 0.5, 0.5]), 1, 0.002))
    for stem, point, label, eps in queries:
        write_vnnlib(folder / f"{stem}.vnnlib", robustness_spec(point, eps, label, 2),
                     comment=f"{'planted counterexample inside the box' if stem.startswith(name) else 'clean'}")
        rows.append(f"{name}.onnx,{stem}.vnnlib,{timeout:g}")
        (planted if stem.startswith(name) else clean).append(f"{stem}.vnnlib")
    atomic_write_text(folder / "instances.csv", "\n".join(rows) + "\n")
    atomic_write_text(folder / "expected_results.csv",
                      "".join(f"{folder.name},{name}.onnx,{n},0,sat,0\n" for n in planted))
    return PlantedFolder(folder / "instances.csv", folder / "expected_results.csv", planted, clean)
