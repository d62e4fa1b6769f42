"""Helpers shared by the test modules: independent checks (attacks, exact MILP), raw auto_LiRPA, files.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix
from torch import nn

from bounds.attack import margins, pgd_maximize
from bounds.certify import margin_spec
from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
from certkd.train import Trainer

SLACK = 1e-5  # float rounding allowed between a bound and an attack value

SMALL_FAMILIES = {  # every registry family auto_LiRPA 0.3 bounds, at a size a CPU test can afford
    "mlp": {"hidden": (32, 16)},
    "cnn4": {"width": 4, "linear": 16},
    "cnn7": {"width": 4, "linear": 16},
    "resnet_small": {"width": 4},
    "wide_resnet": {"depth": 10, "widen": 1},
    "mobilenet_v2": {"width_mult": 0.25, "depth": 3},
}


# --------------------------------------------------------------------------- attacks and raw auto_LiRPA

def per_margin_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str,
                      steps: int = 50, restarts: int = 2) -> torch.Tensor:
    """(B, K-1): for each margin ``m_j`` separately, the smallest value PGD finds in the ball (an upper bound of its min)."""
    k = 10
    rows, labels = x.repeat_interleave(k - 1, 0), y.repeat_interleave(k - 1)
    which = torch.arange(k - 1).repeat(len(y))
    eps_rows = torch.as_tensor(eps, dtype=x.dtype)
    eps_rows = eps_rows.repeat_interleave(k - 1) if eps_rows.dim() else eps_rows

    def objective(z: torch.Tensor) -> torch.Tensor:
        return -margins(model(z), labels)[torch.arange(len(labels)), which]

    _, best = pgd_maximize(objective, rows, eps_rows, norm, steps=steps, restarts=restarts,
                           generator=torch.Generator().manual_seed(0))
    return (-best).view(len(y), k - 1)


def raw_lower(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, method: str,
              bound_opts: dict | None = None) -> torch.Tensor:
    """auto_LiRPA called directly on the model, without certkd's view or allow-list."""
    lirpa = import_auto_lirpa()
    bounded = lirpa.BoundedModule(model, torch.zeros(1, *x.shape[1:]), bound_opts=bound_opts or {})
    if norm == "inf":
        ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    else:
        ptb = lirpa.PerturbationLpNorm(norm=2.0, eps=eps)
    with torch.no_grad():
        lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=margin_spec(y, 10), method=method,
                                          bound_upper=False)
    return lower


def require_hazard(violations: int, what: str) -> None:
    if violations == 0:
        pytest.skip(f"auto_LiRPA {auto_lirpa_version()} no longer shows the {what} hazard on this stack")


def labels_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def briefly_trained(model: nn.Module, train, steps: int = 40, seed: int = 0) -> nn.Module:
    """40 full-batch Adam steps on 300 digits (fixed seed): ordinary weights, not a crafted counterexample."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.x[:300]), train.y[:300]).backward()
        opt.step()
    return model.eval()


def count_violations(lower: torch.Tensor, attack: torch.Tensor) -> int:
    return int((lower > attack + SLACK).sum())


# --------------------------------------------------------------------------- exact MILP

def affine_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of a registry mlp in float64, its Normalize folded into the first Linear (exact)."""
    norm, body = model[0], model[1]
    linears = [m for m in body if isinstance(m, nn.Linear)]
    w0, b0 = linears[0].weight.double(), linears[0].bias.double()
    reps = w0.shape[1] // norm.mean.numel()
    mean, std = norm.mean.double().repeat_interleave(reps), norm.std.double().repeat_interleave(reps)
    layers = [(w0 / std, b0 - w0 @ (mean / std))] + [(m.weight.double(), m.bias.double()) for m in linears[1:]]
    return [(w.detach().numpy(), b.detach().numpy()) for w, b in layers]


def exact_min_margin(layers, x0: np.ndarray, y: int, eps: float) -> float:
    """``min_{x in B_inf(x0, eps) ∩ [0,1]^d} min_{j != y} f_y(x) - f_j(x)``: a big-M MILP solved by HiGHS.

    ReLU z = max(a, 0) with pre-activation bounds [l, u] from interval arithmetic: z >= a,
    z <= u d, z <= a - l (1 - d), d binary; the outer min over j picks one j with binaries s_j:
    t >= m_j - M (1 - s_j), sum s_j = 1, minimize t.
    """
    lo, hi = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
    var_lo, var_hi, integer = list(lo), list(hi), [0] * len(x0)
    rows, cols, vals, row_lo, row_hi = [], [], [], [], []

    def var(a: float, b: float, is_int: int = 0) -> int:
        var_lo.append(a)
        var_hi.append(b)
        integer.append(is_int)
        return len(var_lo) - 1

    def row(coeffs, a: float, b: float) -> None:
        for k, v in coeffs:
            rows.append(len(row_lo))
            cols.append(k)
            vals.append(v)
        row_lo.append(a)
        row_hi.append(b)

    index, act_lo, act_hi = np.arange(len(x0)), lo, hi
    for n, (w, b) in enumerate(layers):
        wp, wn = np.maximum(w, 0), np.minimum(w, 0)
        pre_lo, pre_hi = wp @ act_lo + wn @ act_hi + b, wp @ act_hi + wn @ act_lo + b
        pre = [var(pre_lo[k], pre_hi[k]) for k in range(w.shape[0])]
        for k in range(w.shape[0]):
            row([(int(i), -w[k, c]) for c, i in enumerate(index)] + [(pre[k], 1.0)], b[k], b[k])
        if n == len(layers) - 1:
            break
        post = []
        for k in range(w.shape[0]):
            if pre_hi[k] <= 0:
                post.append(var(0.0, 0.0))
            elif pre_lo[k] >= 0:
                post.append(pre[k])
            else:
                z, d = var(0.0, pre_hi[k]), var(0.0, 1.0, 1)
                row([(z, 1.0), (pre[k], -1.0)], 0.0, np.inf)
                row([(z, 1.0), (d, -pre_hi[k])], -np.inf, 0.0)
                row([(z, 1.0), (pre[k], -1.0), (d, -pre_lo[k])], -np.inf, -pre_lo[k])
                post.append(z)
        index, act_lo, act_hi = np.array(post), np.maximum(pre_lo, 0), np.maximum(pre_hi, 0)
    others = [j for j in range(len(pre)) if j != y]
    big_m = max(pre_hi[y] - pre_lo[j] for j in others) - min(pre_lo[y] - pre_hi[j] for j in others) + 1.0
    t = var(-np.inf, np.inf)
    select = [var(0.0, 1.0, 1) for _ in others]
    for j, s in zip(others, select, strict=True):
        row([(pre[y], -1.0), (pre[j], 1.0), (t, 1.0), (s, -big_m)], -big_m, np.inf)
    row([(s, 1.0) for s in select], 1.0, 1.0)
    cost = np.zeros(len(var_lo))
    cost[t] = 1.0
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(row_lo), len(var_lo))).tocsr()
    res = milp(cost, constraints=LinearConstraint(matrix, row_lo, row_hi), bounds=Bounds(var_lo, var_hi),
               integrality=np.array(integer), options={"mip_rel_gap": 1e-9})
    assert res.status == 0, res.message
    return float(res.fun)


# --------------------------------------------------------------------------- files in the standard formats

def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """LeCun's idx format: 0, 0, element type, number of dims, big-endian uint32 dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool, type_byte: int = 0x08) -> Path:
    data = idx_bytes(array, type_byte)
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist_split(folder: Path, split: str, n: int, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


# --------------------------------------------------------------------------- the model registry

@contextmanager
def registered_models(makers: dict[str, Callable[[], nn.Module]]) -> Iterator[None]:
    """Registry builders named by the keys of ``makers`` (each returning ``make()``), for the block only.

    A hand-written model reaches ``certkd certify`` through a checkpoint, hence the registry;
    removing the builders afterwards leaves later tests the registry certkd ships.
    """
    from certkd.models import MODELS
    from certkd.models._registry import register_model

    for name, make in makers.items():
        def build(num_classes: int, input_shape: tuple[int, ...], _make=make) -> nn.Module:
            """A hand-written test model."""
            return _make()
        build.__name__ = name
        register_model(build)
    try:
        yield
    finally:
        for name in makers:
            MODELS.remove(name)


# --------------------------------------------------------------------------- training

def train_natural(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    """Full-batch Adam (lr 1e-2) on the CE for ``epochs`` steps; the model is returned in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class InterruptedTrainer(Trainer):
    """Stops like a killed job at the start of one epoch (0-based ``stop_at``)."""

    stop_at = 2

    def train_epoch(self, epoch: int) -> dict[str, float]:
        if epoch == self.stop_at:
            raise KeyboardInterrupt
        return super().train_epoch(epoch)
