"""ONNX models in and out: ``certkd convert --onnx``, ``certkd verify``, ``certify --export-vnnlib``.

An ONNX graph that is a chain (every node reads the previous node's output plus
constants) of Gemm/MatMul, Conv, Add/Sub/Mul/Div by constants, Relu/Sigmoid/Tanh,
Flatten/Reshape, BatchNormalization and pooling is rewritten as certkd's
``layer_chain`` registry model (a description plus weights: no code), then checked
output-equal with onnxruntime on random inputs of the declared shape. The checkpoint
records the ONNX file's sha256. Inputs ranging over ``[lo, hi]`` rather than ``[0, 1]``
get an exact ``InputAffine`` first layer ``x = lo + (hi - lo) u`` (recorded in the
checkpoint's config), so certkd's unit box is the model's input box.

Needs the ``onnx`` extra (``pip install 'certkd[onnx]'``: onnx and onnxruntime). The reader
is certkd's own (``onnx2torch`` imports torchvision's compiled operators at import time), and
it emits a registry model, so a converted checkpoint rebuilds without any converter.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from certkd.checkpoint import Checkpoint, file_sha256, make_checkpoint, provenance
from certkd.errors import CertkdError
from certkd.io import atomic_write

EXTRA_HINT = "pip install 'certkd[onnx]'"
SAME_OUTPUT_RTOL = 1e-4
"""max |onnxruntime(x) - certkd(x)|, relative to max(1, max |onnxruntime(x)|), on the check's random inputs."""
CHECK_POINTS = 8
OPSET = 13

__all__ = ["OnnxImport", "read_onnx", "convert_onnx", "export_onnx", "onnx_forward", "require_onnx", "EXTRA_HINT"]


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """The ``onnx`` and ``onnxruntime`` modules, or one sentence naming the extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise CertkdError(f"ONNX models need the onnx extra: {EXTRA_HINT}") from None
    return onnx, onnxruntime


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; ``.gz`` files (as benchmark folders ship them) are decompressed."""
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"{path}: no such file")
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


@dataclass
class OnnxImport:
    """An ONNX model as certkd's ``layer_chain`` (``model`` takes ``input_shape`` inputs in [0, 1]).

    ``onnx_shape`` is the ONNX input's shape without the batch axis; ``lower``/``upper``
    the input box the affine first layer maps [0, 1] onto (None: the identity).
    """

    model: nn.Module
    layers: list[dict[str, Any]]
    input_shape: tuple[int, int, int]
    num_classes: int
    onnx_shape: tuple[int, ...]
    input_name: str
    sha256: str
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    max_difference: float = 0.0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_onnx_input(self, u: torch.Tensor) -> torch.Tensor:
        """certkd inputs u (B, *input_shape) in [0, 1] -> the ONNX model's inputs (B, *onnx_shape)."""
        x = u if self.lower is None or self.upper is None else self.lower + (self.upper - self.lower) * u
        return x.reshape(x.shape[0], *self.onnx_shape)


def _attrs(node: Any, onnx: ModuleType) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _ChainBuilder:
    """Walks an ONNX graph node by node, appending ``layer_chain`` layers and their weights."""

    def __init__(self, source: str, onnx: ModuleType, example_shape: tuple[int, ...]):
        self.source = source
        self.onnx = onnx
        self.specs: list[dict[str, Any]] = []
        self.modules: list[nn.Module] = []
        self.shape = example_shape  # current tensor's shape without the batch axis

    def refuse(self, what: str) -> CertkdError:
        return CertkdError(f"{self.source}: {what}; certkd reads ONNX chains of Gemm/MatMul, Conv, "
                           "Add/Sub/Mul/Div by constants, Relu/Sigmoid/Tanh, Flatten/Reshape, BatchNormalization "
                           "and Max/AveragePool")

    def add(self, spec: dict[str, Any], module: nn.Module) -> None:
        from certkd.models.layers import build_layer

        built = build_layer(spec)
        built.load_state_dict(module.state_dict())
        self.specs.append(spec)
        self.modules.append(built.eval())
        with torch.no_grad():
            out = built.eval()(torch.zeros(1, *self.shape))
        self.shape = tuple(out.shape[1:])

    def linear(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        if len(self.shape) != 1 or weight.shape[1] != self.shape[0]:
            raise self.refuse(f"a matrix product of shape {weight.shape} reads a tensor of shape {self.shape}")
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros(weight.shape[0]))
        self.add({"type": "linear", "in_features": int(weight.shape[1]), "out_features": int(weight.shape[0])},
                 layer)

    def affine(self, scale: np.ndarray | float, shift: np.ndarray | float) -> None:
        """``x * scale + shift`` elementwise; a shift right after a Linear/Conv goes into its bias."""
        full = (1, *self.shape)
        try:
            s = np.broadcast_to(np.asarray(scale, dtype=np.float32), full)[0]
            b = np.broadcast_to(np.asarray(shift, dtype=np.float32), full)[0]
        except ValueError:
            raise self.refuse(f"a constant does not broadcast against a tensor of shape {self.shape}") from None
        last = self.modules[-1] if self.modules else None
        if np.all(s == 1) and isinstance(last, (nn.Linear, nn.Conv2d)) and last.bias is not None:
            channel = b.reshape(b.shape[0], -1)
            if np.all(channel == channel[:, :1]):  # one value per output feature / channel
                with torch.no_grad():
                    last.bias.add_(torch.from_numpy(channel[:, 0].copy()))
                return
        if self.specs and self.specs[-1]["type"] == "affine":  # compose: (x s1 + b1) s + b
            previous = self.modules[-1]
            assert isinstance(previous.scale, torch.Tensor) and isinstance(previous.shift, torch.Tensor)
            with torch.no_grad():
                previous.scale.mul_(torch.from_numpy(s.copy()))
                previous.shift.mul_(torch.from_numpy(s.copy())).add_(torch.from_numpy(b.copy()))
            return
        layer = build_affine(self.shape, torch.from_numpy(s.copy()), torch.from_numpy(b.copy()))
        self.add({"type": "affine", "shape": list(self.shape)}, layer)

    def reshape(self, target: list[int]) -> None:
        size = int(np.prod(self.shape))
        rest = [int(t) for t in target[1:]]
        if target and int(target[0]) not in (1, -1, 0):
            raise self.refuse(f"a Reshape to {target} changes the batch axis")
        rest = [self.shape[i] if t == 0 and i < len(self.shape) else t for i, t in enumerate(rest)]
        if rest.count(-1) == 1:
            known = int(np.prod([t for t in rest if t != -1])) or 1
            rest[rest.index(-1)] = size // known
        if int(np.prod(rest)) != size:
            raise self.refuse(f"a Reshape to {target} does not fit a tensor of shape {self.shape}")
        if tuple(rest) == self.shape:
            return
        if len(rest) == 1:
            self.add({"type": "flatten"}, nn.Flatten())
        else:
            self.add({"type": "reshape", "shape": rest}, build_reshape(rest))


def build_affine(shape: tuple[int, ...], scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    from certkd.models.layers import InputAffine

    layer = InputAffine(shape)
    layer.scale.copy_(scale.reshape(shape))
    layer.shift.copy_(shift.reshape(shape))
    return layer


def build_reshape(shape: list[int]) -> nn.Module:
    from certkd.models.layers import Reshape

    return Reshape(shape)


def _symmetric_pads(builder: _ChainBuilder, pads: list[int] | None, op: str) -> tuple[int, int]:
    pads = list(pads or [0, 0, 0, 0])
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise builder.refuse(f"{op} with asymmetric padding {pads}")
    return pads[0], pads[1]


def _node_step(b: _ChainBuilder, node: Any, const: dict[str, np.ndarray], cur: str) -> None:
    """Append the layers of one node reading the current tensor ``cur``."""
    op = node.op_type
    a = _attrs(node, b.onnx)
    consts = [const.get(name) for name in node.input]
    if op in ("Relu", "Sigmoid", "Tanh"):
        plain = {"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}[op]
        b.add({"type": op.lower()}, plain())
    elif op in ("Identity", "Dropout"):
        return
    elif op == "Flatten":
        if int(a.get("axis", 1)) != 1:
            raise b.refuse(f"Flatten with axis {a.get('axis')}")
        if len(b.shape) != 1:
            b.add({"type": "flatten"}, nn.Flatten())
    elif op == "Reshape":
        if consts[1] is None:
            raise b.refuse("a Reshape whose shape is computed in the graph")
        b.reshape([int(t) for t in consts[1].flatten()])
    elif op == "Gemm":
        if int(a.get("transA", 0)) or consts[1] is None:
            raise b.refuse("a Gemm with a transposed or non-constant operand")
        w = consts[1] if int(a.get("transB", 0)) else consts[1].T
        bias = consts[2] if len(consts) > 2 and consts[2] is not None else None
        w = float(a.get("alpha", 1.0)) * w.astype(np.float32)
        bias = None if bias is None else float(a.get("beta", 1.0)) * np.broadcast_to(bias, (w.shape[0],))
        b.linear(np.ascontiguousarray(w, dtype=np.float32), None if bias is None else bias.astype(np.float32))
    elif op == "MatMul":
        if node.input[0] != cur or consts[1] is None or consts[1].ndim != 2:
            raise b.refuse("a MatMul that is not (tensor) x (constant matrix)")
        b.linear(np.ascontiguousarray(consts[1].T, dtype=np.float32), None)
    elif op in ("Add", "Sub", "Mul", "Div"):
        other = consts[1] if node.input[0] == cur else consts[0]
        if other is None or list(node.input).count(cur) != 1:
            raise b.refuse(f"an {op} of two computed tensors")
        first = node.input[0] == cur
        if op == "Add":
            b.affine(1.0, other)
        elif op == "Sub" and first:
            b.affine(1.0, -other)
        elif op == "Sub":
            b.affine(-1.0, other)
        elif op == "Mul":
            b.affine(other, 0.0)
        elif first:
            b.affine(1.0 / other, 0.0)
        else:
            raise b.refuse("a Div of a constant by the tensor")
    elif op == "Conv":
        auto_pad = a.get("auto_pad", b"NOTSET")
        if consts[1] is None or len(b.shape) != 3 or (auto_pad.decode() if isinstance(auto_pad, bytes)
                                                      else str(auto_pad)) != "NOTSET":
            raise b.refuse("a Conv that is not 2-D with a constant kernel and explicit padding")
        w = consts[1].astype(np.float32)
        groups = int(a.get("group", 1))
        conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], (w.shape[2], w.shape[3]),
                         stride=tuple(a.get("strides", [1, 1])), padding=_symmetric_pads(b, a.get("pads"), "Conv"),
                         dilation=tuple(a.get("dilations", [1, 1])), groups=groups)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            assert conv.bias is not None
            conv.bias.copy_(torch.from_numpy(consts[2].astype(np.float32)) if len(consts) > 2
                            and consts[2] is not None else torch.zeros(w.shape[0]))
        b.add({"type": "conv2d", "in_channels": conv.in_channels, "out_channels": conv.out_channels,
               "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
               "dilation": list(conv.dilation), "groups": groups}, conv)
    elif op == "BatchNormalization":
        if any(c is None for c in consts[1:5]):
            raise b.refuse("a BatchNormalization with computed statistics")
        kind = "batchnorm2d" if len(b.shape) == 3 else "batchnorm1d"
        eps = float(a.get("epsilon", 1e-5))
        bn: nn.Module = (nn.BatchNorm2d if kind == "batchnorm2d" else nn.BatchNorm1d)(b.shape[0], eps=eps)
        with torch.no_grad():
            for key, value in zip(("weight", "bias", "running_mean", "running_var"), consts[1:5], strict=True):
                getattr(bn, key).copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
        b.add({"type": kind, "num_features": b.shape[0], "eps": eps}, bn)
    elif op in ("MaxPool", "AveragePool"):
        if int(a.get("ceil_mode", 0)) or any(int(d) != 1 for d in a.get("dilations", [1, 1])):
            raise b.refuse(f"a {op} with ceil_mode or dilation")
        pads = _symmetric_pads(b, a.get("pads"), op)
        if op == "AveragePool" and any(pads) and not int(a.get("count_include_pad", 0)):
            raise b.refuse("an AveragePool with padding that excludes the padding from its count")
        kernel = list(a["kernel_shape"])
        spec = {"type": "maxpool2d" if op == "MaxPool" else "avgpool2d", "kernel_size": kernel,
                "stride": list(a.get("strides", kernel)), "padding": list(pads)}
        from certkd.models.layers import build_layer

        b.add(spec, build_layer(spec))
    else:
        raise b.refuse(f"operator {op} (node {node.name or node.output[0]})")


def _load(path: str | Path, onnx: ModuleType) -> tuple[Any, bytes]:
    data = read_bytes(path)
    try:
        return onnx.load_model_from_string(data), data
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CertkdError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def _declared_input(proto: Any, source: str, const: set[str]) -> tuple[Any, tuple[int, ...]]:
    """The graph's one input and its shape without the batch axis."""
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in const]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CertkdError(f"{source}: certkd reads ONNX models with one input and one output, this one has "
                          f"{len(inputs)} inputs and {len(graph.output)} outputs")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [int(d.dim_value) if d.HasField("dim_value") else 0 for d in dims]
    if len(shape) < 2 or shape[0] not in (0, 1) or any(s < 1 for s in shape[1:]):
        raise CertkdError(f"{source}: the input's declared shape {shape} is not (batch, ...) with fixed sizes")
    return inputs[0], tuple(shape[1:])


def input_shape_of(path: str | Path) -> tuple[int, ...]:
    """The ONNX model's declared input shape without the batch axis (a quick look, no conversion)."""
    onnx, _ = require_onnx()
    proto, _ = _load(path, onnx)
    return _declared_input(proto, str(path), {init.name for init in proto.graph.initializer})[1]


def _graph_chain(proto: Any, source: str, onnx: ModuleType) -> tuple[_ChainBuilder, str, tuple[int, ...]]:
    graph = proto.graph
    const = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    first, example = _declared_input(proto, source, set(const))
    b = _ChainBuilder(source, onnx, example)
    cur = first.name
    for node in graph.node:
        if node.op_type == "Constant":
            const[node.output[0]] = onnx.numpy_helper.to_array(_attrs(node, onnx)["value"])
            continue
        if cur not in node.input:
            raise b.refuse(f"node {node.name or node.output[0]} ({node.op_type}) does not read the previous "
                           "node's output: not a chain")
        if any(name != cur and name and name not in const for name in node.input):
            raise b.refuse(f"node {node.name or node.output[0]} ({node.op_type}) reads two computed tensors")
        _node_step(b, node, const, cur)
        cur = node.output[0]
    if cur != graph.output[0].name:
        raise b.refuse("the graph's output is not its last node's")
    return b, first.name, example


def certkd_shape(onnx_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """certkd's (C, H, W) for an ONNX input shape without batch: (d,) -> (d, 1, 1), (h, w) -> (1, h, w)."""
    if len(onnx_shape) == 3:
        return onnx_shape[0], onnx_shape[1], onnx_shape[2]
    if len(onnx_shape) == 2:
        return 1, onnx_shape[0], onnx_shape[1]
    if len(onnx_shape) == 1:
        return onnx_shape[0], 1, 1
    raise CertkdError(f"certkd reads ONNX inputs of 1 to 3 axes besides the batch, not {onnx_shape}")


def read_onnx(path: str | Path, lower: torch.Tensor | None = None, upper: torch.Tensor | None = None,
              seed: int = 0) -> OnnxImport:
    """Read the ONNX model at ``path`` as a certkd ``layer_chain`` checked output-equal with onnxruntime.

    Parameters
    ----------
    path : the ``.onnx`` (or ``.onnx.gz``) file.
    lower, upper : the input box, broadcast against one ONNX input (None: [0, 1]). When it
        is not [0, 1], an exact affine first layer maps certkd's [0, 1] onto it.
    seed : the random inputs of the check.

    Returns
    -------
    OnnxImport, whose ``model`` is ``Sequential(Normalize(identity), layer_chain)`` in eval mode.

    Example
    -------
    >>> imp = read_onnx("mnist_fc.onnx")  # doctest: +SKIP
    >>> imp.model(torch.rand(1, *imp.input_shape)).shape  # doctest: +SKIP
    torch.Size([1, 10])
    """
    onnx, ort = require_onnx()
    proto, data = _load(path, onnx)
    builder, input_name, onnx_shape = _graph_chain(proto, str(path), onnx)
    shape = certkd_shape(onnx_shape)
    specs, modules = list(builder.specs), list(builder.modules)
    if len(builder.shape) != 1 or builder.shape[0] < 2:
        raise CertkdError(f"{path}: the model's output has shape {builder.shape}; certkd needs (batch, K >= 2)")
    if tuple(onnx_shape) != shape:
        first = {"type": "flatten"} if len(onnx_shape) == 1 else {"type": "reshape", "shape": list(onnx_shape)}
        specs.insert(0, first)
        modules.insert(0, nn.Flatten() if len(onnx_shape) == 1 else build_reshape(list(onnx_shape)))
    lo = up = None
    if lower is not None and upper is not None:
        lo, up = _box_tensor(lower, onnx_shape, shape, path), _box_tensor(upper, onnx_shape, shape, path)
        if bool((up < lo).any()):
            raise CertkdError(f"{path}: the input range has an upper end below its lower end")
        if bool((lo != 0).any() or (up != 1).any()):
            specs.insert(0, {"type": "affine", "shape": list(shape)})
            modules.insert(0, build_affine(shape, up - lo, lo))
        else:
            lo = up = None
    from certkd.models import create_model

    num_classes = int(builder.shape[0])
    model = create_model("layer_chain", num_classes=num_classes, input_shape=shape, layers=specs)
    model.get_submodule("1").load_state_dict(nn.Sequential(*modules).state_dict())
    model.eval()
    imp = OnnxImport(model=model, layers=specs, input_shape=shape, num_classes=num_classes, onnx_shape=onnx_shape,
                     input_name=input_name, sha256=file_sha256(path), lower=lo, upper=up, source=str(path))
    imp.max_difference = _check_same_outputs(imp, data, ort, seed)
    return imp


def _box_tensor(value: torch.Tensor, onnx_shape: tuple[int, ...], shape: tuple[int, int, int],
                path: str | Path) -> torch.Tensor:
    """One end of the input box as a tensor of certkd's shape: a number, a flat vector, or ONNX-shaped."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.numel() == math.prod(onnx_shape):
        return t.reshape(shape).clone()
    try:
        return t.broadcast_to(onnx_shape).reshape(shape).clone()
    except RuntimeError:
        raise CertkdError(f"{path}: an input range of shape {tuple(t.shape)} does not fit the model's input "
                          f"{onnx_shape}") from None


def onnx_forward(session: Any, input_name: str, x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's outputs for a batch of ONNX inputs (run one example at a time: batch axes may be fixed)."""
    rows = [session.run(None, {input_name: x[i:i + 1].detach().cpu().numpy().astype(np.float32)})[0]
            for i in range(x.shape[0])]
    return torch.from_numpy(np.concatenate([np.asarray(r).reshape(1, -1) for r in rows]))


def session_of(data: bytes, ort: ModuleType) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _check_same_outputs(imp: OnnxImport, data: bytes, ort: ModuleType, seed: int) -> float:
    """Max relative difference between onnxruntime and the rebuilt model; refuse above ``SAME_OUTPUT_RTOL``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.cat([torch.zeros(1, *imp.input_shape), torch.ones(1, *imp.input_shape),
                   torch.rand((CHECK_POINTS, *imp.input_shape), generator=gen)])
    try:
        session = session_of(data, ort)
        expected = onnx_forward(session, imp.input_name, imp.to_onnx_input(u))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        raise CertkdError(f"{imp.source}: onnxruntime cannot run this model ({' '.join(str(exc).split())[:160]})") \
            from None
    with torch.no_grad():
        got = imp.model(u)
    if got.shape != expected.shape:
        raise CertkdError(f"{imp.source}: the rebuilt model's outputs {tuple(got.shape)} differ in shape from "
                          f"onnxruntime's {tuple(expected.shape)}")
    diff = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    if diff > SAME_OUTPUT_RTOL:
        raise CertkdError(f"{imp.source}: the rebuilt model differs from onnxruntime by {diff:.3g} (relative) on "
                          f"random inputs; certkd does not read this model faithfully")
    return diff


def convert_onnx(path: str | Path, dataset: str | None = None, input_range: tuple[float, float] | None = None,
                 seed: int = 0) -> Checkpoint:
    """A certkd checkpoint of the ONNX model at ``path`` (``certkd convert --onnx``).

    ``dataset`` (optional) must match the model's input shape and classes; ``input_range``
    ``(lo, hi)`` is the range of the ONNX model's inputs (default [0, 1]): other ranges get the
    exact affine first layer. The checkpoint records the file's sha256 and the affine map.
    """
    lo, hi = input_range if input_range is not None else (0.0, 1.0)
    if not hi > lo:
        raise CertkdError(f"--input-range needs LO < HI, got {lo} {hi}")
    imp = read_onnx(path, torch.tensor(float(lo)), torch.tensor(float(hi)), seed)
    if dataset is not None:
        from certkd.data import dataset_info

        meta = dataset_info(dataset)
        if tuple(meta.input_shape) != imp.input_shape or int(meta.num_classes) != imp.num_classes:
            raise CertkdError(f"{path}: the model takes {imp.input_shape} with {imp.num_classes} outputs, dataset "
                              f"{dataset} has {tuple(meta.input_shape)} with {meta.num_classes} classes")
    info = SimpleNamespace(name=dataset or "onnx", input_shape=imp.input_shape, num_classes=imp.num_classes,
                           mean=[0.0] * imp.input_shape[0], std=[1.0] * imp.input_shape[0])
    config = {"source": "certkd convert --onnx", "onnx_input_shape": list(imp.onnx_shape),
              "input_affine": None if imp.lower is None else {"lower": float(lo), "upper": float(hi)},
              "onnx_max_difference": imp.max_difference}
    prov = provenance(seed=seed, converted_from=str(path), onnx_sha256=imp.sha256)
    return make_checkpoint(imp.model, "layer_chain", {"layers": imp.layers}, info, config=config,
                           provenance_info=prov)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` (inputs (1, *input_shape)) as an ONNX file, atomically; returns the path."""
    require_onnx()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_shape),), buf,  # type: ignore[arg-type]
                          dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"])
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode="wb")
    return Path(path)
