"""Transformer modules written exactly in operators auto_LiRPA 0.7.x bounds.

auto_LiRPA 0.7.x relaxes LayerNorm, softmax and GELU, but not as torch exports them:
``nn.GELU`` traces to ``onnx::Erf`` (no relaxation) and ``nn.MultiheadAttention`` runs
``scaled_dot_product_attention`` (no operator). ``rewrite_transformer`` replaces, in place
and recursively:

- ``nn.GELU(approximate="none")`` -> ``ExactGELU``: the same ``F.gelu``, traced as the
  ``custom::Gelu`` node auto_LiRPA 0.7.x bounds with its GELU relaxation;
- ``nn.MultiheadAttention`` -> ``ExplicitAttention``: the same function written as three
  linear projections, ``softmax(q k^T / sqrt(d_h)) v`` per head (MatMul, Softmax) and the
  output projection (Vaswani et al. 2017, eq. 1).

Each rewrite computes the model's function (up to float rounding); the verification view
checks the whole rewritten model against the original before any bound (``bounds.view``).
Only ``bounds.view`` calls this, and only for a backend whose capability table bounds
transformers (``bounds.backends.Backend.bounds_vits``).

Example
-------
>>> block = nn.Sequential(nn.Linear(4, 4), nn.GELU())
>>> rewrite_transformer(block)
>>> type(block[1]).__name__
'ExactGELU'
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bounds.errors import UnsupportedModelError

_SQRT_2 = math.sqrt(2.0)
_SQRT_2PI = math.sqrt(2.0 * math.pi)


class _GeluFunction(torch.autograd.Function):
    """``F.gelu`` with an ONNX symbolic ``custom::Gelu`` (auto_LiRPA 0.7.x maps it to ``BoundGelu``)."""

    @staticmethod
    def symbolic(g: Any, x: Any) -> Any:
        return g.op("custom::Gelu", x)

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        """GELU'(x) = Phi(x) + x phi(x)."""
        x: torch.Tensor = ctx.saved_tensors[0]
        return grad_output * (0.5 * (1.0 + torch.erf(x / _SQRT_2)) + x * torch.exp(-0.5 * x * x) / _SQRT_2PI)


class ExactGELU(nn.Module):
    """``GELU(x) = x Phi(x)`` (exact, erf form), traced as ``custom::Gelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _GeluFunction.apply(x)  # type: ignore[no-untyped-call]
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device, weight.dtype)
    layer.weight.data = weight.detach().clone()
    if bias is not None:
        layer.bias.data = bias.detach().clone()
    return layer


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` (eval mode, no masks) as projections, MatMul and softmax.

    ``out = W_o concat_h(softmax(q_h k_h^T / sqrt(d_h)) v_h) + b_o`` with
    ``q = W_q x_q + b_q`` etc. (Vaswani et al. 2017). Takes the arguments of
    ``nn.MultiheadAttention.forward`` and returns ``(out, weights or None)``; masks and
    causal attention raise ``UnsupportedModelError`` (no exact view).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModelError("attention with bias_k/bias_v or add_zero_attn has no verification view "
                                        "yet; use --method clever|smoothing for this model")
        d = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        self.scale = 1.0 / math.sqrt(d // mha.num_heads)
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            weights = [mha.in_proj_weight[i * d:(i + 1) * d] for i in range(3)]
        else:
            weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        biases = [None] * 3 if bias is None else [bias[i * d:(i + 1) * d] for i in range(3)]
        self.q, self.k, self.v = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
        self.out = _linear(mha.out_proj.weight, mha.out_proj.bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedModelError("masked attention has no verification view yet; use --method "
                                        "clever|smoothing for this model")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        weights = torch.softmax(scores, dim=-1)
        mixed = torch.matmul(weights, v).transpose(1, 2)
        out = self.out(mixed.reshape(mixed.shape[0], mixed.shape[1], -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def rewrite_transformer(module: nn.Module) -> None:
    """Replace, in place and recursively, every exact GELU and every ``nn.MultiheadAttention`` (module docstring).

    ``nn.GELU(approximate="tanh")`` is left alone (its ``Tanh`` node is outside every allow-list).

    Parameters
    ----------
    module : nn.Module
        Modified in place (``bounds.view`` passes its deep copy, never the user's model).

    Raises
    ------
    UnsupportedModelError
        For attention with ``bias_k``/``bias_v`` or ``add_zero_attn`` (no exact view yet).
    """
    for name, child in list(module._modules.items()):
        if isinstance(child, nn.GELU) and child.approximate == "none":
            module._modules[name] = ExactGELU()
        elif isinstance(child, nn.MultiheadAttention):
            module._modules[name] = ExplicitAttention(child)
        elif child is not None:
            rewrite_transformer(child)
