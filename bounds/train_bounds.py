"""Differentiable margin bounds of a model while it trains (theory.md §7): IBP and CROWN-IBP by auto_LiRPA.

Certified training needs lower bounds ``lb_j`` of the margins ``m_j = z_y - z_j`` over the
L-inf ball (intersected with the box [0, 1]) *as functions of the weights*: auto_LiRPA's
``BoundedModule`` shares the parameters of the model it wraps, and its IBP and CROWN-IBP
bounds are differentiable, so a loss built from them trains the model itself.

Unlike ``bounds.certify`` (the verifier: verification view, allow-list, graph checks), this
module bounds the network *as it trains*: BatchNorm in training mode normalizes the bounds
with the statistics of the clean batch (the forward pass at the centre), as in Shi et al.
(2021) and auto_LiRPA's certified-training examples; in eval mode with the running ones.
A leading ``Normalize`` layer (certkd's models) is applied to the box corners directly
(exact: it is increasing in every coordinate) and the rest of the network is bounded, which
keeps auto_LiRPA's default convolution mode. Certified accuracy is always reported by the
verifier (``bounds.certify``, CROWN or stronger), never by these bounds.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> tb = TrainingBounds(net, (4,))
>>> out = tb.margins(torch.rand(2, 4), torch.tensor([0, 2]), 0.01)
>>> tuple(out.ibp.shape), out.ibp.requires_grad
((2, 2), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bounds.errors import BoundsError
from bounds.graph import lirpa_call
from bounds.lirpa import auto_lirpa_version, import_auto_lirpa
from bounds.nn import Normalize

__all__ = ["TrainingBounds", "TrainingMarginBounds", "margin_spec_matrix"]


def margin_spec_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C (B, K-1, K) with ``(C z)_k = z_y - z_{j_k}``, the classes ``j != y`` in order (theory.md §1)."""
    eye = torch.eye(num_classes, device=y.device)
    diff = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = torch.ones(len(y), num_classes, dtype=torch.bool, device=y.device)
    keep[torch.arange(len(y), device=y.device), y] = False
    return diff[keep].view(len(y), num_classes - 1, num_classes)


@dataclass
class TrainingMarginBounds:
    """Lower bounds of the margins (B, K-1) over the ball, differentiable in the weights.

    ``ibp``: interval bound propagation; ``crown_ibp``: CROWN-IBP (IBP intermediate bounds, a
    CROWN pass for the margins), when asked; ``relu_inputs``: the IBP interval ``(l, u)`` of
    the input of every ReLU (for the warm-up regularizers); ``input_halfwidth``: the mean
    half-width of the bounded input box, after the leading normalization.
    """

    ibp: torch.Tensor
    crown_ibp: torch.Tensor | None
    relu_inputs: list[tuple[torch.Tensor, torch.Tensor]]
    input_halfwidth: torch.Tensor


class TrainingBounds:
    """auto_LiRPA's graph of a model being trained, built once, bounding it at every step.

    Parameters
    ----------
    model : the network (its parameters are shared, not copied)
    input_shape : the shape of one input, e.g. (1, 28, 28)
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.lirpa = import_auto_lirpa()
        self.version = auto_lirpa_version()
        self.model = model
        self.normalize: Normalize | None = None
        body: nn.Module = model
        if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[0], Normalize):
            self.normalize, body = model[0], (model[1] if len(model) == 2 else nn.Sequential(*list(model)[1:]))
        self.body = body
        device = next(model.parameters()).device
        example = torch.zeros((2, *(int(s) for s in input_shape)), device=device)
        was_training = body.training
        body.eval()
        with lirpa_call("build its graph of this model for certified training", self.version):
            self.bounded: Any = self.lirpa.BoundedModule(body, example, bound_opts={"relu": "adaptive"},
                                                         device=str(device))
        body.train(was_training)
        with torch.no_grad():
            self.num_classes = int(body(example).shape[1])
        if self.num_classes < 2:
            raise BoundsError("margins need a model with at least 2 outputs")

    def _sync_buffers(self) -> None:
        """Copy the model's buffers (BatchNorm running statistics) into auto_LiRPA's copies of them."""
        own = dict(self.body.named_buffers())
        with torch.no_grad():
            for node in self.bounded.modules():
                source = own.get(str(getattr(node, "ori_name", "")))
                buffer = getattr(node, "buffer", None)
                if type(node).__name__ == "BoundBuffers" and source is not None and isinstance(buffer, torch.Tensor):
                    buffer.copy_(source)

    def _box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centre and corners of the normalized box ``clip(x +- eps, 0, 1)`` (exact through Normalize)."""
        lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        if self.normalize is None:
            return x, lo, hi
        return self.normalize(x), self.normalize(lo), self.normalize(hi)

    def margins(self, x: torch.Tensor, y: torch.Tensor, eps: float, crown_ibp: bool = False) -> TrainingMarginBounds:
        """IBP (and CROWN-IBP) lower bounds of ``z_y - z_j`` over ``B_inf(x, eps)`` intersected with [0, 1]^d.

        The bounds follow the model's mode (train: BatchNorm with the clean batch's statistics).

        Parameters
        ----------
        x : (B, ...) inputs in [0, 1]
        y : (B,) labels
        eps : L-inf radius (0 gives the clean margins)
        crown_ibp : also compute the CROWN-IBP bound

        Returns
        -------
        TrainingMarginBounds
        """
        if not (math.isfinite(eps) and eps >= 0):
            raise BoundsError(f"eps must be a finite number >= 0, got {eps}")
        self.bounded.train(self.model.training)
        self._sync_buffers()
        centre, lo, hi = self._box(x, eps)
        ptb = self.lirpa.PerturbationLpNorm(norm=math.inf, eps=eps, x_L=lo, x_U=hi)
        spec = margin_spec_matrix(y, self.num_classes)
        with lirpa_call("bound this model for certified training", self.version):
            if self.model.training:  # BatchNorm: the clean batch's statistics, set by a forward pass
                self.bounded(centre)
            ibp, _ = self.bounded.compute_bounds(x=(self.lirpa.BoundedTensor(centre, ptb),), C=spec, method="IBP")
            relu_inputs = [(node.inputs[0].lower, node.inputs[0].upper) for node in self.bounded.modules()
                           if type(node).__name__ == "BoundRelu" and getattr(node.inputs[0], "lower", None) is not None]
            crown = None
            if crown_ibp:
                crown, _ = self.bounded.compute_bounds(x=(self.lirpa.BoundedTensor(centre, ptb),), C=spec,
                                                       method="CROWN-IBP", bound_upper=False)
        return TrainingMarginBounds(ibp=ibp, crown_ibp=crown, relu_inputs=relu_inputs,
                                    input_halfwidth=((hi - lo) / 2).mean())
