"""Certified global L2 Lipschitz bounds and the radii they certify (theory.md §2.2).

The model is traced with ``torch.fx`` and walked node by node, carrying for
every node an upper bound ``L(node)`` on the L2 Lipschitz constant of the map
input -> node value:

- linear operators multiply by their operator norm: dense layers exactly (the
  Gram matrix's largest eigenvalue, ``torch.linalg.eigvalsh``), convolutions and average
  pooling through the convolution operator itself (below), ``Normalize`` and
  eval-mode BatchNorm as diagonal maps (BatchNorm folded into the preceding
  convolution or dense layer when it is that layer's only user);
- ``a + b`` and ``a - b`` give ``L(a) + L(b)`` (a residual block: ``1 + L(branch)``);
  a scalar factor multiplies; ReLU, Flatten, Identity, Dropout (eval) give 1.

Convolution operator norms are proven upper bounds: when the operator's matrix
is small it is built explicitly and its exact spectral norm computed.
Otherwise a stride-s convolution is rewritten as a stride-1 convolution of the
space-to-depth input (an isometric rearrangement), which on an n x n input is
a restriction of the circular convolution on a grid large enough that nothing
wraps onto data. The singular values of a circular convolution are exactly
those of the per-frequency ``c_out x c_in`` matrices of the kernel's 2-D DFT
(Sedghi et al. 2019), and restricting outputs or embedding inputs cannot
increase a norm, so the largest of them bounds the layer (exactly, for a
stride-1 circular convolution).
All norms are computed in float64 and inflated by ``1 + SLACK``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from bounds.errors import BoundsError, ContradictionError, UnsupportedModelError
from bounds.gradients import other_classes
from bounds.inputs import check_model, float32_model
from bounds.nn import Normalize
from bounds.norms import parse_norm
from bounds.tracing import NO_TRACE_HINT, check_no_value_dependence

SLACK = 1e-5  # relative inflation covering floating-point rounding
EXACT_MAX_ENTRIES = 2**20  # build a convolution's matrix explicitly up to this many entries
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Flatten, nn.Identity, *_DROPOUT)
_ONE_LIPSCHITZ_FUNCTIONS = {torch.relu, F.relu, torch.flatten, torch.reshape, torch.tanh}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "relu", "squeeze", "unsqueeze", "tanh"}
_LINEAR_COMBINATIONS = {operator.add, operator.sub, torch.add, torch.sub}


@dataclass
class LipschitzBound:
    """Certified L2 Lipschitz constants: of the logits (``logits``) and of every margin
    ``m_j = f_y - f_j`` (``margin`` (K, K), entry [y, j]; the diagonal is 0)."""

    logits: float
    margin: torch.Tensor


@dataclass
class LipschitzRadius:
    """Per-example radii **certified** by a global Lipschitz bound (0 where misclassified)."""

    radius: torch.Tensor
    lipschitz: float
    margin_lipschitz: torch.Tensor
    norm: float
    kind: str = "certified"


class _Tracer(fx.Tracer):
    """Leaves: torch.nn's own layers and ``Normalize`` itself (a subclass that overrides ``forward`` is traced
    into, so its own code is what the walk sees)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).forward is Normalize.forward or super().is_leaf_module(m, qualname)


def _hidden_code(model: nn.Module) -> str | None:
    """What runs in ``model`` besides the code fx traces (hooks, parametrizations), named; or None."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global forward hook (nn.modules.module.register_module_forward_hook)"
    for name, m in model.named_modules():
        where = f"{type(m).__name__} {name or '(the model)'}"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a forward hook on {where}"
        if parametrize.is_parametrized(m):
            return f"a parametrization of {where}"
    return None


def spectral_norm(matrix: torch.Tensor) -> torch.Tensor:
    """Largest singular value of (a batch of) matrices, via the Gram matrix of the smaller side."""
    gram = matrix.mH @ matrix if matrix.shape[-1] <= matrix.shape[-2] else matrix @ matrix.mH
    top: torch.Tensor = torch.linalg.eigvalsh(gram)[..., -1]
    return top.clamp_min(0.0).sqrt()


def _pads(padding: str | int | tuple[int, ...], kernel: tuple[int, int], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) padding of each spatial axis for int, tuple, 'valid' or 'same' padding."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, str):
        raise UnsupportedModelError(f"convolutions with padding={padding!r} are not supported")
    per_axis = (padding, padding) if isinstance(padding, int) else padding
    return tuple((p, p) for p in per_axis)


def _axis_phases(n: int, k: int, stride: int, dilation: int, pad: tuple[int, int], circular: bool) -> torch.Tensor:
    """DFT factors ``(N, stride, k)`` of one spatial axis of a convolution (polyphase form).

    Tap u reads input ``stride * i + offset_u`` with ``offset_u = u * dilation - pad_before``
    = ``stride * q_u + r_u``: input phase ``r_u`` (a channel of the space-to-depth input,
    an isometric rearrangement) shifted by ``q_u``, i.e. a stride-1 convolution. It is a
    restriction of the circular one on ``N`` points as long as nothing wraps onto data.
    """
    offsets = [u * dilation - pad[0] for u in range(k)]
    shifts = [o // stride for o in offsets]
    n_out = (n + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1
    if circular:
        if stride != 1 or n_out > n:
            raise UnsupportedModelError("circular convolutions with a stride or a larger output are not supported")
        grid = n
    else:
        n_phase = -(-n // stride)
        grid = max(n_phase + max(0, -min(shifts)), n_out + max(shifts), n_out, n_phase)
    omega = torch.arange(grid, dtype=torch.float64)
    phases = torch.zeros(grid, stride, k, dtype=torch.complex128)
    for u, (o, q) in enumerate(zip(offsets, shifts, strict=True)):
        phases[:, o % stride, u] = torch.exp(-2j * math.pi * q * omega / grid)
    return phases


def conv_operator_norm(weight: torch.Tensor, input_hw: tuple[int, int], stride: int | tuple[int, ...] = 1,
                       padding: str | int | tuple[int, ...] = 0, dilation: int | tuple[int, ...] = 1, groups: int = 1, padding_mode: str = "zeros",
                       exact_max_entries: int = EXACT_MAX_ENTRIES) -> float:
    """Proven upper bound on the L2 operator norm of ``conv2d(., weight)`` on ``input_hw`` inputs.

    Exact (explicit matrix, float64) when ``d_in * d_out <= exact_max_entries``;
    otherwise the circular-embedding DFT bound of the module docstring (exact
    for circular padding with stride 1 and 'same' output size).
    """
    weight = weight.detach().double()
    device = weight.device
    c_out, c_in_group, kh, kw = weight.shape
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pads = _pads(padding, (kh, kw), dilation)
    if padding_mode not in ("zeros", "circular"):
        raise UnsupportedModelError(f"convolutions with padding_mode={padding_mode!r} are not supported; "
                                    "use zeros or circular padding")
    c_in = c_in_group * groups
    h, w = input_hw
    flat_pads = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, flat_pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        return F.conv2d(x, weight, None, stride, 0, dilation, groups)

    d_in = c_in * h * w
    d_out = apply(torch.zeros(1, c_in, h, w, dtype=torch.float64, device=device)).numel()
    if d_in * d_out <= exact_max_entries:
        basis = torch.eye(d_in, dtype=torch.float64, device=device).view(d_in, c_in, h, w)
        return float(spectral_norm(apply(basis).view(d_in, -1))) * (1 + SLACK)

    circular = padding_mode == "circular"
    phases = [_axis_phases(n, k, st, d, pad, circular).to(device)
              for n, k, st, d, pad in zip((h, w), (kh, kw), stride, dilation, pads, strict=True)]
    kernel = weight.view(groups, c_out // groups, c_in_group, kh, kw).to(torch.complex128)
    per_row = phases[1].shape[0] * kernel[:, :, :, 0, 0].numel() * stride[0] * stride[1]
    rows = max(1, 2**24 // per_row)
    best = 0.0
    for start in range(0, phases[0].shape[0], rows):
        spectrum = torch.einsum("goiuv,aru,bsv->abgoirs", kernel, phases[0][start:start + rows], phases[1])
        best = max(best, float(spectral_norm(spectrum.flatten(-3)).max()))
    return best * (1 + SLACK)


def _scalar_factor(node: fx.Node) -> float | None:
    """``|c|`` for ``-a``, ``c * a``, ``a * c`` and ``a / c`` with a number c; None otherwise."""
    a, b = (list(node.args) + [None])[:2]
    if node.target is operator.neg:
        return 1.0
    if node.target is operator.mul and isinstance(a, fx.Node) != isinstance(b, fx.Node):
        c = b if isinstance(a, fx.Node) else a
        return abs(float(c)) if isinstance(c, (int, float)) else None
    if node.target is operator.truediv and isinstance(a, fx.Node) and isinstance(b, (int, float)) and b != 0:
        return 1.0 / abs(float(b))
    return None


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The diagonal ``gamma / sqrt(var + eps)`` of an eval-mode BatchNorm."""
    if bn.running_var is None:
        raise UnsupportedModelError("BatchNorm without running statistics has no fixed affine map")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale * bn.weight.detach().double() if bn.weight is not None else scale


def _linear_norm(module: nn.Linear | nn.Conv2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d, in_shape: torch.Size, scale: torch.Tensor | None) -> float:
    """Operator norm of a Linear / Conv2d / average pooling module, with an output scale folded in."""
    if isinstance(module, nn.Linear):
        w = module.weight.detach().double()
        w = w if scale is None else scale.to(w.device).view(-1, 1) * w
        return float(spectral_norm(w)) * (1 + SLACK)
    hw = (int(in_shape[-2]), int(in_shape[-1]))
    if isinstance(module, nn.Conv2d):
        w = module.weight.detach().double()
        w = w if scale is None else scale.view(-1, 1, 1, 1).to(w.device) * w
        return conv_operator_norm(w, hw, module.stride, module.padding, module.dilation, module.groups,
                                  module.padding_mode)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        requested = size if isinstance(size, tuple) else (size, size)
        out = tuple(n if o is None else o for n, o in zip(hw, requested, strict=True))
        if any(n % o for n, o in zip(hw, out, strict=True)):
            raise UnsupportedModelError(f"AdaptiveAvgPool2d from {hw} to {out} is not a uniform pooling")
        kernel: tuple[int, ...] = tuple(n // o for n, o in zip(hw, out, strict=True))
        stride: int | tuple[int, ...] = kernel
        padding: int | tuple[int, ...] = 0
        divisor: int | None = None
    else:  # nn.AvgPool2d
        if module.ceil_mode or (not module.count_include_pad and module.padding != 0):
            raise UnsupportedModelError("AvgPool2d with ceil_mode or count_include_pad=False is not supported")
        kernel = (module.kernel_size,) * 2 if isinstance(module.kernel_size, int) else module.kernel_size
        stride, padding, divisor = module.stride or kernel, module.padding, module.divisor_override
    # average pooling = the same depthwise convolution on every channel: the norm of one channel
    weight = torch.full((1, 1, *kernel), 1.0 / (divisor or kernel[0] * kernel[1]), dtype=torch.float64)
    return conv_operator_norm(weight, hw, stride, padding)


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, ...]) -> LipschitzBound:
    """Certified L2 Lipschitz constants of the logits and of every margin (theory.md §2.2).

    ``input_shape`` excludes the batch dimension. The margin constant of the
    pair (y, j) is ``sqrt(2) * L(logits)`` in general and, when the last node is
    a Linear layer ``W h + b``, the tighter ``||W_y - W_j||_2 * L(h)``.
    Raises ``UnsupportedModelError`` for operators without a sound rule here.
    """
    if any(m.training for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, *_DROPOUT))):
        raise BoundsError("BatchNorm and Dropout must be in eval mode: call model.eval() first")
    float32_model(model)  # bfloat16/float16 refused; float64 is analysed in its own precision
    dtype = check_model(model, input_shape, min_classes=1).dtype  # output, shape: one sentence before tracing
    hidden = _hidden_code(model)
    if hidden is not None:
        raise UnsupportedModelError(f"the Lipschitz bound cannot see {hidden} (torch.fx does not trace it); "
                                    f"{NO_TRACE_HINT}")
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    check_no_value_dependence(model, torch.zeros(1, *input_shape, device=device, dtype=dtype), "the Lipschitz bound")
    try:
        graph_module = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:
        raise UnsupportedModelError(f"the model cannot be traced by torch.fx ({type(exc).__name__}); "
                                    "use the clever or smoothing methods") from None
    with torch.no_grad():
        ShapeProp(graph_module).propagate(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    modules = dict(graph_module.named_modules())

    def module_of(node: fx.Node) -> nn.Module | None:
        return modules[node.target] if node.op == "call_module" else None

    # BatchNorm folded into its producer when it is the producer's only user
    folded: dict[fx.Node, torch.Tensor] = {}
    for node in graph_module.graph.nodes:
        producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        bn = module_of(node)
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and producer is not None
                and isinstance(module_of(producer), (nn.Linear, nn.Conv2d)) and len(producer.users) == 1):
            folded[producer] = _bn_scale(bn)
    folded_bn = {next(iter(n.users)) for n in folded}

    bound: dict[fx.Node, float] = {}
    for node in graph_module.graph.nodes:
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        first = bound.get(inputs[0], 0.0) if inputs else 0.0
        module = module_of(node)
        if node.op == "placeholder":
            bound[node] = 1.0
        elif node.op == "get_attr":
            bound[node] = 0.0  # a constant
        elif node.op == "output":
            output = node.args[0]
        elif node in folded_bn or isinstance(module, _ONE_LIPSCHITZ):
            bound[node] = first
        elif isinstance(module, nn.LeakyReLU):
            bound[node] = first * max(1.0, abs(module.negative_slope))
        elif isinstance(module, nn.Sigmoid):
            bound[node] = first * 0.25
        elif isinstance(module, Normalize):
            bound[node] = first * float((1.0 / module.get_buffer("std").double()).max())
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            bound[node] = first * float(_bn_scale(module).abs().max())
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            bound[node] = first * _linear_norm(module, inputs[0].meta["tensor_meta"].shape, folded.get(node))
        elif node.op == "call_function" and node.target in _LINEAR_COMBINATIONS and not node.kwargs:
            bound[node] = sum(bound[a] for a in inputs)
        elif node.op == "call_function" and node.target in _ONE_LIPSCHITZ_FUNCTIONS:
            bound[node] = first
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            bound[node] = first
        elif node.op == "call_function" and (factor := _scalar_factor(node)) is not None:
            bound[node] = first * factor
        else:
            what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
            raise UnsupportedModelError(f"no certified Lipschitz rule for {what} (node {node.name}); "
                                        "use the clever or smoothing methods")

    if not isinstance(output, fx.Node) or output not in bound:
        raise UnsupportedModelError("the model must return one logits tensor")
    logits_bound = bound[output]
    num_classes = output.meta["tensor_meta"].shape[-1]
    head = module_of(output)
    head_input = output.args[0] if output.args else None
    if isinstance(head, nn.Linear) and output not in folded and isinstance(head_input, fx.Node):
        w = head.weight.detach().double()
        pair = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * bound[head_input] * (1 + SLACK)
    else:
        pair = torch.full((num_classes, num_classes), math.sqrt(2.0) * logits_bound, dtype=torch.float64)
        pair.fill_diagonal_(0.0)
    return LipschitzBound(logits_bound, pair)


GRADIENT_RTOL = 1e-4  # float32 rounding of a measured gradient norm


def check_gradients(model: nn.Module, x: torch.Tensor, others: torch.Tensor, y: torch.Tensor,
                    pair: torch.Tensor) -> None:
    """Raise ``ContradictionError`` when a margin's L2 gradient norm at ``x`` exceeds its certified constant.

    ``others`` (B, K-1) are the classes j of the margins ``m_j = f_y - f_j`` and ``pair`` (B, K-1) their
    constants: a Lipschitz constant is at least every gradient norm, so a larger one measured here is
    proof that the walk missed code that runs (a hook, an overridden ``forward``).
    """
    rows = x.detach().repeat_interleave(others.shape[1], dim=0).requires_grad_(True)
    with torch.enable_grad():
        logits = model(rows)
        true = logits.gather(1, y.repeat_interleave(others.shape[1]).view(-1, 1)).squeeze(1)
        margin = true - logits.gather(1, others.reshape(-1, 1)).squeeze(1)
        (grad,) = torch.autograd.grad(margin.sum(), rows)
    measured = grad.flatten(1).double().norm(dim=1).view_as(pair)
    excess = measured > pair * (1 + GRADIENT_RTOL)
    if bool(excess.any()):
        ratio = float((measured / pair.clamp_min(1e-300)).max())
        raise ContradictionError(
            f"lipschitz is refused for this model: a margin's gradient norm at {int(excess.any(dim=1).sum())} of "
            f"{len(x)} points is {ratio:.3g} times its certified Lipschitz constant, so the bound misses code "
            f"that runs in this model; {NO_TRACE_HINT}.")


def lipschitz_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str | float = "2",
                     bound: LipschitzBound | None = None) -> LipschitzRadius:
    """Radii certified by the global bound: ``min_j m_j(x) / L_{y,j}`` in L2 (theory.md §2.2).

    Since ``m_j(x + delta) >= m_j(x) - L_{y,j} ||delta||_2``, no margin changes
    sign inside that L2 ball (``sqrt(2) * L`` per pair in the generic case).
    L-inf: ``||delta||_2 <= sqrt(d) ||delta||_inf`` divides by ``sqrt(d)``; L1:
    ``||delta||_2 <= ||delta||_1`` keeps it. Misclassified points get 0.
    Pass a precomputed ``bound`` (``lipschitz_bound``) to reuse it across batches. The bound
    must be at least every margin's gradient norm at ``x`` (``check_gradients``), or the
    call raises ``ContradictionError``.
    """
    p = parse_norm(norm)
    bound = bound if bound is not None else lipschitz_bound(model, tuple(x.shape[1:]))
    with torch.no_grad():
        logits = model(x).double()
    others = other_classes(y, logits.shape[1])
    margins = logits.gather(1, y.view(-1, 1)) - logits.gather(1, others)
    pair = bound.margin.to(logits.device)[y.view(-1, 1), others]
    check_gradients(model, x, others, y, pair)
    radius_2 = torch.where(margins > 0, margins / pair, torch.zeros_like(margins)).amin(dim=1)
    scale = math.sqrt(x[0].numel()) if math.isinf(p) else 1.0
    return LipschitzRadius((radius_2 / scale).to(x.dtype), bound.logits, bound.margin, p)
