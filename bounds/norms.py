"""Norm helpers (theory.md §1): p in {inf, 2, 1}, q its dual, per-example norms and projections."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bounds.errors import BoundsError

INF = math.inf
SUPPORTED_NORMS = (INF, 2.0, 1.0)


def parse_norm(norm: str | float | int) -> float:
    """``"inf"``/``"linf"``/``inf`` -> ``math.inf``; ``"2"``/``2`` -> ``2.0``; ``"1"`` -> ``1.0``."""
    if isinstance(norm, str):
        key = norm.strip().lower().removeprefix("l")
        table = {"inf": INF, "infinity": INF, "2": 2.0, "1": 1.0}
        if key not in table:
            raise BoundsError(f"unknown norm {norm!r}: use one of inf, 2, 1")
        return table[key]
    value = float(norm)
    if value not in SUPPORTED_NORMS:
        raise BoundsError(f"unknown norm {norm!r}: use one of inf, 2, 1")
    return value


def norm_name(p: float) -> str:
    """``inf`` -> ``"inf"``, ``2.0`` -> ``"2"``."""
    return "inf" if math.isinf(p) else str(int(p))


def dual_norm(p: float) -> float:
    """The dual exponent q with 1/p + 1/q = 1 (inf <-> 1, 2 <-> 2)."""
    p = parse_norm(p)
    return {INF: 1.0, 2.0: 2.0, 1.0: INF}[p]


def batch_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-example ``||t_i||_p`` over all non-batch dimensions; shape (B,)."""
    flat = t.flatten(1)
    if math.isinf(p):
        return flat.abs().amax(dim=1)
    norms: torch.Tensor = flat.norm(p=p, dim=1)
    return norms


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(delta: torch.Tensor, p: float, eps: torch.Tensor | float) -> torch.Tensor:
    """Project each ``delta_i`` onto the ball ``||delta_i||_p <= eps_i`` (L-inf and L2)."""
    eps_t = torch.as_tensor(eps, dtype=delta.dtype, device=delta.device)
    eps_t = eps_t.expand(delta.shape[0]) if eps_t.dim() == 0 else eps_t
    if math.isinf(p):
        e = _expand(eps_t, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    if p == 2.0:
        n = batch_norm(delta, 2.0).clamp_min(1e-12)
        factor = torch.clamp(eps_t / n, max=1.0)
        return delta * _expand(factor, delta)
    raise BoundsError("projection is implemented for the inf and 2 norms")


def steepest_step(grad: torch.Tensor, p: float) -> torch.Tensor:
    """Unit-norm ascent direction for the p-norm: sign(g) for inf, g/||g||_2 for 2."""
    if math.isinf(p):
        return grad.sign()
    if p == 2.0:
        return grad / _expand(batch_norm(grad, 2.0).clamp_min(1e-12), grad)
    raise BoundsError("steepest ascent is implemented for the inf and 2 norms")


def random_in_ball(shape: torch.Size | tuple[int, ...], p: float, eps: torch.Tensor | float,
                   generator: torch.Generator | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform samples in the L-p ball of radius eps (per example; first dim is the batch).

    L-inf: uniform in the cube. L2 and L1: exact uniform sampling of the ball
    (direction x radius^(1/d) for L2; exponential spacings for L1).
    """
    eps_t = torch.as_tensor(eps, dtype=dtype, device=device)
    eps_t = eps_t.expand(shape[0]) if eps_t.dim() == 0 else eps_t
    d = int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1
    if math.isinf(p):
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
        return u * _expand(eps_t, u)
    if p == 2.0:
        g = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        g = g / _expand(batch_norm(g, 2.0).clamp_min(1e-12), g)
        r = torch.rand(shape[0], generator=generator, device=device, dtype=dtype) ** (1.0 / d)
        return g * _expand(r * eps_t, g)
    if p == 1.0:
        e = -torch.log(torch.rand((shape[0], d + 1), generator=generator, device=device, dtype=dtype))
        pts = e[:, :d] / e.sum(dim=1, keepdim=True)  # uniform in the simplex interior
        signs = torch.randint(0, 2, (shape[0], d), generator=generator, device=device).to(dtype) * 2 - 1
        return (pts * signs).view(shape) * eps_t.view(-1, *([1] * (len(shape) - 1)))
    raise BoundsError(f"unknown norm {p!r}")


def check_eps(eps: float | torch.Tensor) -> None:
    """Raise ``BoundsError`` for a negative, non-finite or non-numeric radius (a string, None)."""
    if isinstance(eps, (str, bytes, bool)) or eps is None:
        raise BoundsError(f"eps must be a number >= 0 (or one per example), got {eps!r}")
    try:
        t = torch.as_tensor(eps, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise BoundsError(f"eps must be a number >= 0 (or one per example), got {eps!r}") from None
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise BoundsError(f"eps must be a finite number >= 0, got {eps!r}")


def default_eps_max(norm: str | float, input_shape: Sequence[int]) -> float:
    """The radius of a ball that covers the whole box [0, 1]^d: 1 under L-inf, ``sqrt(d)`` under L2.

    The largest radius a search tries, and the worst case of a memory probe (every ReLU unstable).

    Examples
    --------
    >>> default_eps_max("inf", (1, 8, 8)), default_eps_max(2, (1, 8, 8))
    (1.0, 8.0)
    """
    p = parse_norm(norm)
    return 1.0 if math.isinf(p) else math.sqrt(math.prod(int(s) for s in input_shape))
