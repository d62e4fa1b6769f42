"""The verification view: the model exactly as auto_LiRPA may see it (auto_lirpa_notes.md, issue 8).

auto_LiRPA 0.3 gives false certificates through grouped/depthwise convolutions under
CROWN, loses the L2 ball when the first layer is not Linear/Conv, and bounds softmax
unsoundly. ``verification_view`` rewrites a model into an exactly equivalent one that
avoids the first two hazards; ``check_supported`` refuses everything outside an
allow-list of operators the installed auto_LiRPA bounds soundly (the third).

Rewrites (each exact, the whole view checked against the model before any bound):
- ``Normalize`` -> a dense 1x1 convolution (groups = 1) with diagonal weights ``1/std``
  and bias ``-mean/std`` (a diagonal ``Linear`` for (B, D) inputs);
- eval-mode BatchNorm -> folded into the Conv/Linear right before it in a Sequential,
  otherwise the same exact dense diagonal affine layer;
- grouped/depthwise convolutions -> ordinary convolutions with block-diagonal weights;
- dropout -> identity.
Submodules are replaced in a deep copy, so any ``nn.Module`` (custom forwards,
residual blocks) works; the model itself is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bounds.errors import BoundsError, UnsupportedModelError
from bounds.nn import Normalize
from bounds.norms import norm_name, parse_norm

VIEW_ATOL = 1e-5  # max |view(x) - model(x)|, relative to max(1, max |model(x)|)
ESTIMATE_HINT = ("use --method clever|smoothing for this model (an estimate, and randomized smoothing; "
                 "--method lipschitz covers plain and residual ReLU networks only)")

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
# modules auto_LiRPA 0.3 cannot bound soundly, with the name the refusal gives them
_REFUSED_MODULES: dict[type, str] = {
    nn.MultiheadAttention: "attention (nn.MultiheadAttention)",
    nn.Softmax: "softmax", nn.LogSoftmax: "log-softmax", nn.Softmin: "softmin",
    nn.LayerNorm: "LayerNorm", nn.GroupNorm: "GroupNorm",
    nn.InstanceNorm1d: "InstanceNorm", nn.InstanceNorm2d: "InstanceNorm",
    nn.GELU: "GELU", nn.SiLU: "SiLU", nn.Mish: "Mish", nn.ELU: "ELU", nn.Hardswish: "Hardswish",
    nn.BatchNorm3d: "BatchNorm3d", nn.Conv1d: "Conv1d", nn.Conv3d: "Conv3d",
    nn.ConvTranspose2d: "ConvTranspose2d", nn.Upsample: "Upsample",
}


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


def _fold_affine_into(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Compose ``scale * layer(x) + shift`` into the layer's own weight and bias (exact)."""
    weight = layer.weight.data
    bias = layer.bias.data if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    layer.weight.data = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_bias = bias * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.data = new_bias


def _dense_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A grouped/depthwise convolution as an ordinary one with block-diagonal weights (same function)."""
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"a grouped convolution with padding_mode={conv.padding_mode!r} has no "
                                    f"verification view; {ESTIMATE_HINT}.")
    g = conv.groups
    cin, cout = conv.in_channels, conv.out_channels
    per_in, per_out = cin // g, cout // g
    dense = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=1,
                      bias=conv.bias is not None).to(conv.weight.device)
    weight = torch.zeros_like(dense.weight)
    for k in range(g):
        weight[k * per_out:(k + 1) * per_out, k * per_in:(k + 1) * per_in] = \
            conv.weight.data[k * per_out:(k + 1) * per_out]
    dense.weight.data = weight
    if conv.bias is not None:
        dense.bias.data = conv.bias.data.clone()
    return dense


def _record_input_dims(model: nn.Module, example: torch.Tensor) -> dict[int, int]:
    """id(module) -> number of dimensions of its input, for the modules the view replaces."""
    dims: dict[int, int] = {}

    def hook(module, inputs, _output):
        dims[id(module)] = inputs[0].dim()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (Normalize, *_BATCHNORM))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return dims


def _rewrite(module: nn.Module, dims: dict[int, int]) -> None:
    """Replace, in place and recursively, every submodule the view rewrites (see the module docstring)."""
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        previous = module._modules[names[i - 1]] if i > 0 and isinstance(module, nn.Sequential) else None
        if isinstance(child, Normalize):
            std = child.std.detach()
            module._modules[name] = _diagonal_affine(1.0 / std, -child.mean.detach() / std, dims.get(id(child), 4))
        elif isinstance(child, _BATCHNORM):
            scale, shift = _batchnorm_affine(child)
            if isinstance(previous, (nn.Conv2d, nn.Linear)):
                _fold_affine_into(previous, scale, shift)
                module._modules[name] = nn.Identity()
            else:
                module._modules[name] = _diagonal_affine(scale, shift, dims.get(id(child), 4))
        elif isinstance(child, nn.Conv2d) and child.groups > 1:
            module._modules[name] = _dense_conv(child)
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
    error = float((expected - got).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not math.isfinite(error) or error > VIEW_ATOL * scale:
        raise BoundsError(f"the verification view differs from the model by {error:.2e} (allowed "
                          f"{VIEW_ATOL * scale:.1e}); this model cannot be bound propagated safely")
    return error


def verification_view(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """An eval-mode deep copy of ``model`` rewritten for auto_LiRPA (module docstring), checked equal to it.

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
    view = root[0]
    check_view(view, model, input_shape)
    return view


# --------------------------------------------------------------------------- the allow-list

def _refused_modules(view: nn.Module) -> list[str]:
    found: list[str] = []
    for m in view.modules():
        for cls, label in _REFUSED_MODULES.items():
            if isinstance(m, cls) and label not in found:
                found.append(label)
    return found


def _join(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def refuse(operators: Sequence[str], version: str | None, hint: str = ESTIMATE_HINT) -> UnsupportedModelError:
    """The one-sentence refusal naming the operator(s) and pointing to the estimate/smoothing methods."""
    return UnsupportedModelError(f"auto_LiRPA {version or ''} cannot bound {_join(operators)} soundly; "
                                 f"{hint}.".replace("  ", " "))


_ALL_METHODS = frozenset({"ibp", "crown-ibp", "crown", "alpha-crown"})
_NO_ALPHA = frozenset({"ibp", "crown-ibp", "crown"})
_ANY_NORM = frozenset({math.inf, 2.0})
# auto_LiRPA 0.3 graph nodes bounded soundly, with the methods and norms the hazard suite
# (tests/test_hazards.py, tests/test_certify_sound.py) checks them under. Grows only with tests.
_ALLOWED_NODES_03: dict[str, tuple[frozenset, frozenset]] = {
    **{kind: (_ALL_METHODS, _ANY_NORM) for kind in (
        "BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant", "BoundShape",
        "BoundLinear", "BoundConv", "BoundRelu", "BoundFlatten", "BoundReshape")},
    **{kind: (_NO_ALPHA, _ANY_NORM) for kind in (
        "BoundAdd", "BoundSub", "BoundMul", "BoundNeg", "BoundUnsqueeze", "BoundSqueeze",
        "BoundGlobalAveragePool", "BoundReduceMean", "BoundAveragePool", "BoundMaxPool")},
}  # nodes whose values do not depend on the input (shapes, constants) are never bounded: not checked
# friendly names for refused auto_LiRPA nodes
_NODE_LABELS = {
    "BoundSoftmax": "softmax", "BoundExp": "exp", "BoundLog": "log", "BoundMatMul": "a matrix product (MatMul)",
    "BoundDiv": "division", "BoundPow": "power", "BoundSqrt": "sqrt", "BoundReduceMax": "max-reduction",
    "BoundBatchNormalization": "BatchNorm", "BoundAdd": "addition", "BoundSub": "subtraction",
    "BoundMul": "multiplication", "BoundMaxPool": "max-pooling", "BoundAveragePool": "average pooling",
    "BoundGlobalAveragePool": "global average pooling", "BoundReduceMean": "mean",
}


def _kind(node) -> str:
    """auto_LiRPA's operator class name (certkd's subclasses name the class they extend)."""
    return getattr(node, "lirpa_kind", type(node).__name__)


def _label(kind: str) -> str:
    return _NODE_LABELS.get(kind, kind.removeprefix("Bound"))


def _perturbed_names(bounded) -> set[str]:
    """Names of the nodes whose values depend on the input (edges out of a Shape node carry no values)."""
    frontier = [n for n in bounded._modules.values() if _kind(n) == "BoundInput"]
    seen = {n.name for n in frontier}
    while frontier:
        node = frontier.pop()
        if _kind(node) == "BoundShape":
            continue
        for name in getattr(node, "output_name", []):
            if name not in seen:
                seen.add(name)
                frontier.append(bounded[name])
    return seen


def _node_problem(node, method: str, norm: float) -> str | None:
    """Why a node of the bounded graph is outside the allow-list for ``method`` and ``norm``, or None."""
    kind = _kind(node)
    if kind not in _ALLOWED_NODES_03:
        return _label(kind)
    methods, norms = _ALLOWED_NODES_03[kind]
    if method not in methods:
        return f"{_label(kind)} with {method}"
    if norm not in norms:
        return f"{_label(kind)} under L{norm_name(norm)}"
    if kind == "BoundConv" and getattr(node, "groups", 1) != 1:
        return "a grouped convolution"
    if kind == "BoundMul" and not node.is_constant_op:
        return "a product of two perturbed tensors"
    if kind == "BoundMaxPool" and (list(node.kernel_size) != list(node.stride) or any(node.padding)):
        return "max-pooling with a stride other than its kernel size or with padding"
    return None


def check_modules(view: nn.Module, version: str | None) -> None:
    """Refuse, by name, modules auto_LiRPA cannot bound soundly (before any graph is built)."""
    refused = _refused_modules(view)
    if refused:
        raise refuse(refused, version)


def check_graph_supported(bounded, method: str, norm: str | float, version: str | None) -> None:
    """Refuse a built ``BoundedModule`` whose graph leaves the allow-list for ``method`` and ``norm``.

    Besides the per-operator allow-list: under L2 every node reading the perturbed input
    must be a Linear or Conv (auto_LiRPA 0.3 applies the ball only there; hazard 2).
    """
    p = parse_norm(norm)
    problems: list[str] = []
    perturbed = _perturbed_names(bounded)
    nodes = [n for n in bounded._modules.values() if n.name in perturbed]
    kinds = {_kind(n) for n in nodes}
    if "BoundSoftmax" in kinds or {"BoundExp", "BoundDiv"} <= kinds:  # a softmax, as traced at opset 12
        problems.append("softmax")
    for node in nodes:
        problem = _node_problem(node, method, p)
        if problem is not None and problem not in problems:
            problems.append(problem)
    if not math.isinf(p):
        input_names = {n.name for n in nodes if _kind(n) == "BoundInput"}
        for node in nodes:
            reads_input = any(getattr(i, "name", None) in input_names for i in getattr(node, "inputs", []))
            if reads_input and _kind(node) not in ("BoundLinear", "BoundConv"):
                problems.append(f"a first layer that is not Linear or Conv ({_label(_kind(node))}) under "
                                f"L{norm_name(p)}")
                break
    if problems:
        only_alpha = method == "alpha-crown" and all(" with alpha-crown" in q for q in problems)
        raise refuse(problems, version, "use --method crown" if only_alpha else ESTIMATE_HINT)


def check_supported(view: nn.Module, method: str, norm: str | float, input_shape: Sequence[int],
                    bounded=None) -> None:
    """Raise ``UnsupportedModelError`` (one sentence) unless the installed auto_LiRPA bounds ``view`` soundly.

    Checks the module types first (attention, softmax, LayerNorm, GELU, ... are refused by
    name), then the operators of auto_LiRPA's graph of the view (``bounded``, built here if
    not given) against the allow-list for ``method`` and ``norm``. Called by every path that
    bounds a model with auto_LiRPA; there is no switch to skip it.
    """
    from bounds.lirpa import auto_lirpa_version, import_auto_lirpa

    version = auto_lirpa_version()
    check_modules(view, version)
    if bounded is None:
        lirpa = import_auto_lirpa()
        example = _example_inputs(input_shape, _device_of(view), 1)
        bounded = lirpa.BoundedModule(view, example, device=str(example.device))
    check_graph_supported(bounded, method, norm, version)
