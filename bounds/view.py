"""The verification view: the model exactly as auto_LiRPA may see it (docs/auto_lirpa.md).

auto_LiRPA 0.3 gives false certificates through grouped/depthwise and dilated
convolutions and unequal padding under CROWN, loses the L2 ball when the first layer is
not Linear/Conv, drops pooling attributes and bounds softmax unsoundly.
``verification_view`` rewrites a model into an exactly equivalent one that avoids what
can be avoided; ``check_supported`` and ``bounds.graph`` refuse the rest.

Rewrites (each exact, the whole view checked against the model before any bound):
- ``Normalize`` -> a dense 1x1 convolution (groups = 1) with diagonal weights ``1/std``
  and bias ``-mean/std`` (a diagonal ``Linear`` for (B, D) inputs);
- eval-mode BatchNorm -> folded into the Conv/Linear right before it in a Sequential,
  otherwise the same exact dense diagonal affine layer;
- grouped, dilated or unequally padded (``"same"``, ``(0, 2)``) convolutions -> ordinary
  convolutions with one padding on every side (``canonical_conv``);
- ``nn.Hardtanh``/``nn.ReLU6`` -> ``ClampReLU`` (``a + relu(x - a) - relu(x - b)``);
- ``nn.LeakyReLU``/``nn.PReLU`` -> ``SlopeReLU`` (``a x + (1 - a) relu(x)``);
- dropout -> identity;
- inside ``forward`` (``bounds.fold``): constant arithmetic on the input (user-written
  normalization) -> the dense 1x1 form, inline clamps -> ``ClampReLU``, batch-size-agnostic
  flattens, negative mean axes, division by constants, zero ``F.pad``, leaky activations, and
  a log-softmax or max-shift head (dropped: margins unchanged, so ``check_view`` compares the
  view's logits with the model's up to one shift per example).
Submodules are replaced in a deep copy, so any ``nn.Module`` (custom forwards,
residual blocks) works; the model itself is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bounds.errors import AutoLirpaMissing, BoundsError, UnsupportedModelError
from bounds.fold import fold_forward
from bounds.graph import ESTIMATE_HINT, check_graph_supported, input_readers, node_kind, refuse
from bounds.nn import ClampReLU, Normalize, SlopeReLU
from bounds.vit_rewrite import rewrite_transformer

if TYPE_CHECKING:
    from bounds.backends import Backend

VIEW_ATOL = 1e-5  # max |view(x) - model(x)|, relative to max(1, max |model(x)|)

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


# --------------------------------------------------------------------------- the view

def _diagonal_affine(scale: torch.Tensor, shift: torch.Tensor, input_dim: int) -> nn.Module:
    """``x -> scale * x + shift`` per channel as a dense layer: 1x1 Conv2d (4-D) or Linear (2-D)."""
    c = scale.numel()
    if input_dim == 4:
        layer: nn.Module = nn.Conv2d(c, c, 1, bias=True)
        layer.weight.data = torch.diag(scale).view(c, c, 1, 1).clone()
    elif input_dim == 2:
        layer = nn.Linear(c, c, bias=True)
        layer.weight.data = torch.diag(scale).clone()
    else:
        raise UnsupportedModelError(
            f"a per-channel affine layer on {input_dim}-D inputs has no verification view; "
            f"{ESTIMATE_HINT}.")
    layer.bias.data = shift.clone()
    return layer.to(scale.device)


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as ``scale * x + shift``: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("a BatchNorm without running statistics has no fixed eval function; "
                                    f"{ESTIMATE_HINT}.")
    scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.detach(), shift.detach()


def _fold_affine_into(layer: nn.Conv2d | nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Compose ``scale * layer(x) + shift`` into the layer's own weight and bias (exact)."""
    weight = layer.weight.data
    bias = layer.bias.data if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    layer.weight.data = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_bias = bias * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.data = new_bias


def _conv_pads(conv: nn.Conv2d) -> list[tuple[int, int]]:
    """Per spatial dimension, the (before, after) zero padding of ``conv`` (string padding resolved as torch does)."""
    if conv.padding == "valid":
        return [(0, 0), (0, 0)]
    if conv.padding == "same":  # total d (k - 1), the smaller half before (torch's rule)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in conv.padding]


def needs_canonical_conv(conv: nn.Conv2d) -> bool:
    """True for convolutions auto_LiRPA 0.3 mishandles: grouped, dilated, or padded unequally."""
    pads = {p for pair in _conv_pads(conv) for p in pair}
    return conv.groups != 1 or tuple(conv.dilation) != (1, 1) or len(pads) > 1 or isinstance(conv.padding, str)


def _dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The (out, in, kh, kw) weight of ``conv`` with groups = 1: block-diagonal over the groups."""
    g, w = conv.groups, conv.weight.detach()
    per_in, per_out = conv.in_channels // g, conv.out_channels // g
    dense = torch.zeros(conv.out_channels, conv.in_channels, *w.shape[2:], dtype=w.dtype, device=w.device)
    for k in range(g):
        dense[k * per_out:(k + 1) * per_out, k * per_in:(k + 1) * per_in] = w[k * per_out:(k + 1) * per_out]
    return dense


class ExpandedConv2d(nn.Conv2d):
    """A convolution ``canonical_conv`` rewrote from a dilated or unequally padded one (same function).

    auto_LiRPA 0.3's patches mode still gave CROWN bounds above PGD margins on trained dilated
    models after the rewrite (84 of 144 margins, L-inf 0.02; its full patches path crashes on
    them), while its matrix mode was sound on the same graphs: ``needs_matrix_mode`` sends
    views with such a layer to matrix mode (tests/test_hazards.py).
    """


def needs_matrix_mode(view: nn.Module) -> bool:
    """True when the view holds an ``ExpandedConv2d`` (its graph is bounded in auto_LiRPA's matrix mode)."""
    return any(isinstance(m, ExpandedConv2d) for m in view.modules())


def canonical_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution with groups = 1, dilation 1 and one zero padding ``P`` on every side (exact).

    - groups: block-diagonal dense weights;
    - dilation ``d``: the kernel with ``d - 1`` zeros between its taps, size ``d (k - 1) + 1``;
    - padding ``(before, after)`` per dimension (``"same"``/``"valid"``, tuples, unequal H and W):
      ``P = max`` of all four, and the kernel gets ``P - before`` zero rows in front and
      ``P - after`` behind, so output ``o`` still reads input rows ``o s - before + t``
      (``t`` the original taps) and the output size ``(N + before + after - K) // s + 1``
      is unchanged.
    Only ``padding_mode="zeros"`` has this form; other modes are refused.
    """
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"auto_LiRPA cannot bound a convolution with padding_mode="
                                    f"{conv.padding_mode!r} soundly; {ESTIMATE_HINT}.")
    dense = _dense_weight(conv)
    (dh, dw), (kh, kw) = conv.dilation, conv.kernel_size
    dilated = torch.zeros(*dense.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1, dtype=dense.dtype,
                          device=dense.device)
    dilated[:, :, ::dh, ::dw] = dense
    pads = _conv_pads(conv)
    big = max(p for pair in pads for p in pair)
    weight = F.pad(dilated, (big - pads[1][0], big - pads[1][1], big - pads[0][0], big - pads[0][1]))
    expanded = tuple(conv.dilation) != (1, 1) or len({p for pair in pads for p in pair}) > 1
    cls = ExpandedConv2d if expanded else nn.Conv2d
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    stride = (int(conv.stride[0]), int(conv.stride[1]))
    out = cls(conv.in_channels, conv.out_channels, kernel, stride, big,
              bias=conv.bias is not None).to(device=dense.device, dtype=dense.dtype)
    out.weight.data = weight
    if conv.bias is not None and out.bias is not None:
        out.bias.data = conv.bias.detach().clone()
    return out


def _record_input_dims(model: nn.Module, example: torch.Tensor) -> dict[int, int]:
    """id(module) -> number of dimensions of its input, for the modules the view replaces."""
    dims: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: object) -> None:
        dims[id(module)] = inputs[0].dim()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (Normalize, *_BATCHNORM))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return dims


_REWRITTEN = (Normalize, *_BATCHNORM, nn.Conv2d, nn.Linear, nn.Hardtanh, nn.ReLU6, *_DROPOUT)


def _runs_own_code(module: nn.Module) -> bool:
    """Whether ``module`` runs more than its layer class declares: a forward hook or pre-hook, or a subclass of a
    layer the view rewrites that overrides ``forward``; such a module is never replaced or folded into."""
    if module._forward_hooks or module._forward_pre_hooks:
        return True
    base = next((cls for cls in _REWRITTEN if isinstance(module, cls)), None)
    return base is not None and type(module).forward is not base.forward


def _rewrite(module: nn.Module, dims: dict[int, int]) -> None:
    """Replace, in place and recursively, every submodule the view rewrites (see the module docstring)."""
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        previous = module._modules[names[i - 1]] if i > 0 and isinstance(module, nn.Sequential) else None
        if _runs_own_code(child):  # a hook or an overridden forward: kept as it is, its children rewritten
            _rewrite(child, dims)
        elif isinstance(child, Normalize):
            std = child.std.detach()
            module._modules[name] = _diagonal_affine(1.0 / std, -child.mean.detach() / std, dims.get(id(child), 4))
        elif isinstance(child, _BATCHNORM):
            scale, shift = _batchnorm_affine(child)
            if isinstance(previous, (nn.Conv2d, nn.Linear)) and not _runs_own_code(previous):
                _fold_affine_into(previous, scale, shift)
                module._modules[name] = nn.Identity()
            else:
                module._modules[name] = _diagonal_affine(scale, shift, dims.get(id(child), 4))
        elif isinstance(child, nn.Conv2d) and needs_canonical_conv(child):
            module._modules[name] = canonical_conv(child)
        elif isinstance(child, (nn.Hardtanh, nn.ReLU6)):
            module._modules[name] = ClampReLU(child.min_val, child.max_val)
        elif isinstance(child, nn.LeakyReLU):
            module._modules[name] = SlopeReLU(child.negative_slope)
        elif isinstance(child, nn.PReLU):
            module._modules[name] = SlopeReLU(child.weight.detach())
        elif isinstance(child, _DROPOUT):
            module._modules[name] = nn.Identity()
        else:
            _rewrite(child, dims)


def _example_inputs(input_shape: Sequence[int], device: torch.device, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((n, *input_shape), generator=generator).to(device)


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def check_view(view: nn.Module, model: nn.Module, input_shape: Sequence[int]) -> float:
    """Max |view(x) - model(x)| on inputs in [0, 1]^d; raise ``BoundsError`` above ``VIEW_ATOL`` (relative)."""
    x = _example_inputs(input_shape, _device_of(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, got = model(x), view(x)
    finally:
        model.train(was_training)
    if expected.shape != got.shape:
        raise BoundsError(f"the verification view returns shape {tuple(got.shape)} instead of "
                          f"{tuple(expected.shape)}")
    # margins f_y - f_j only: one shift per example (a dropped log-softmax head) is no difference
    error = float(((expected - expected[:, :1]) - (got - got[:, :1])).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not math.isfinite(error) or error > VIEW_ATOL * scale:
        raise BoundsError(f"the verification view differs from the model by {error:.2e} (allowed "
                          f"{VIEW_ATOL * scale:.1e}); this model cannot be bound propagated safely")
    return error


def verification_view(model: nn.Module, input_shape: Sequence[int], transformers: bool | None = None) -> nn.Module:
    """An eval-mode deep copy of ``model`` rewritten for auto_LiRPA (module docstring), checked equal to it.

    ``transformers`` (default: whether the installed backend bounds ViTs, ``bounds.backends``)
    also writes GELU and attention in the operators auto_LiRPA 0.7.x relaxes (``bounds.vit_rewrite``).
    ``input_shape`` is one example's shape, e.g. (C, H, W). Raises ``UnsupportedModelError``
    for a module with no exact view and ``BoundsError`` if the view differs from the model
    by more than ``VIEW_ATOL`` (relative to the logits' scale) on inputs in [0, 1]^d.
    """
    input_shape = tuple(int(s) for s in input_shape)
    was_training = model.training
    view = copy.deepcopy(model).eval()
    model.train(was_training)
    for p in view.parameters():
        p.requires_grad_(False)
    dims = _record_input_dims(view, _example_inputs(input_shape, _device_of(view), 2))
    # a bare Normalize/BatchNorm model is its own root: wrap it so it can be replaced
    root = nn.Sequential(view)
    _rewrite(root, dims)
    if _bounds_vits() if transformers is None else transformers:
        rewrite_transformer(root)
    example = _example_inputs(input_shape, _device_of(root), 2)
    view = fold_forward(root[0], example, lambda scale, shift: _diagonal_affine(scale, shift, example.dim()))
    check_view(view, model, input_shape)
    return view


def _bounds_vits() -> bool:
    try:
        return _backend().bounds_vits
    except AutoLirpaMissing:
        return False


def identity_first(view: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """``view`` behind an identity 1x1 convolution (Linear for (B, D) inputs): the same function.

    auto_LiRPA 0.3 applies an L2 ball only in a Linear or Conv reading the input; a model whose
    first operation is anything else (ReLU, flatten, a clamp, a residual add of the input) gets
    this layer in front.
    """
    channels = int(input_shape[0])
    device = _device_of(view)
    layer = _diagonal_affine(torch.ones(channels, device=device), torch.zeros(channels, device=device),
                             len(input_shape) + 1)
    return nn.Sequential(layer, view).eval()


# --------------------------------------------------------------------------- the allow-list

def _pooling_problem(m: nn.Module) -> str | None:
    """The pooling attribute auto_LiRPA 0.3 drops (it bounds a different function), named, or None."""
    if isinstance(m, nn.MaxPool2d):
        if m.ceil_mode:
            return "max-pooling with ceil_mode=True"
        if m.dilation not in (1, (1, 1)):
            return f"max-pooling with dilation={m.dilation}"
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode:
            return "average pooling with ceil_mode=True"
        if m.divisor_override is not None:
            return f"average pooling with divisor_override={m.divisor_override}"
        if not m.count_include_pad and m.padding not in (0, (0, 0)):
            return "average pooling with count_include_pad=False and padding"
    return None


def _backend(baseline: bool = False) -> Backend:
    """The installed backend (``bounds.backends``); with ``baseline``, restricted to the 0.3 table."""
    from bounds.backends import current_backend

    backend = current_backend()
    return backend.baseline() if baseline else backend


def _refused_modules(view: nn.Module, refused: Mapping[type, str]) -> list[str]:
    found: list[str] = []
    for m in view.modules():
        labels = [label for cls, label in refused.items() if isinstance(m, cls)]
        problem = _pooling_problem(m)
        for label in labels + ([problem] if problem else []):
            if label not in found:
                found.append(label)
    return found


def check_modules(view: nn.Module, version: str | None, baseline: bool = False) -> None:
    """Refuse, by name, modules the installed backend cannot bound soundly (before any graph is built).

    Under 0.3 a transformer's refusal names auto_LiRPA 0.7.x as the way (``bounds.backends``).
    """
    backend = _backend(baseline)
    refused = _refused_modules(view, backend.refused_modules)
    if refused:
        raise refuse(refused, version, backend.module_hint(refused) or ESTIMATE_HINT)


def graph_of(view: nn.Module, input_shape: Sequence[int], version: str | None = None) -> tuple[nn.Module, Any]:
    """auto_LiRPA's ``BoundedModule`` of ``view``, with ``identity_first`` where a non-Linear/Conv reads the input.

    Returns the (possibly prefixed) view and its graph; the graph still needs the allow-list and
    the graph check (``bounds.graph``) before any bound.
    """
    from bounds.certify import bounded_module

    example = torch.zeros((1, *input_shape), device=_device_of(view))
    mode = "matrix" if needs_matrix_mode(view) else "patches"
    bounded = bounded_module(view, example, version, mode)
    if mode == "matrix" and any(node_kind(n) == "BoundMaxPool" for n in bounded._modules.values()):
        raise refuse(["max-pooling after a dilated or unequally padded convolution"], version)
    if any(node_kind(n) not in ("BoundLinear", "BoundConv") for n in input_readers(bounded)):
        view = identity_first(view, input_shape)
        bounded = bounded_module(view, example, version, mode)
    return view, bounded


def check_supported(view: nn.Module, method: str, norm: str | float, input_shape: Sequence[int],
                    bounded: object | None = None, baseline: bool = False) -> nn.Module:
    """Raise ``UnsupportedModelError`` (one sentence) unless the installed auto_LiRPA bounds ``view`` soundly.

    Checks the module types first (attention, softmax, LayerNorm, GELU, ... are refused by
    name), then the operators and attributes of auto_LiRPA's graph of the view (``bounded``,
    built here by ``graph_of`` if not given) against the allow-list for ``method`` and
    ``norm``. Called by every path that bounds a model with auto_LiRPA; there is no switch to
    skip it. Returns the view the graph was built from (``graph_of`` may prefix an identity).
    ``baseline`` checks against the 0.3 table whatever is installed (composites proven only there).
    """
    from bounds.lirpa import auto_lirpa_version

    version = auto_lirpa_version()
    check_modules(view, version, baseline)
    if bounded is None:
        view, bounded = graph_of(view, input_shape, version)
    check_graph_supported(bounded, method, norm, version, _backend(baseline).allow)
    return view
