"""Rewrites of the verification view inside ``forward`` code, on its ``torch.fx`` graph.

Module replacement (``bounds.view``) cannot reach what a forward computes inline. Here the
view is traced with ``torch.fx`` and two exact rewrites are applied to the traced graph:

- **user-written normalization**: additions, subtractions, multiplications and divisions of
  the input by constants (buffers, parameters, tensors or numbers built in ``forward``, also
  ``x * (1 / std)``, ``torch.sub``/``torch.div``), per channel, are composed into one
  ``x -> scale * x + shift`` and written as the dense diagonal 1x1 convolution (or diagonal
  Linear) that ``Normalize`` becomes (theory.md §1);
- **clamping**: ``torch.clamp``/``clip``, ``Tensor.clamp``, ``F.hardtanh`` and ``F.relu6``
  with constant ends become ``bounds.nn.ClampReLU`` (``a + relu(x - a) - relu(x - b)``);
- **leaky activations**: ``F.leaky_relu`` and ``F.prelu`` with constant slopes become
  ``bounds.nn.SlopeReLU`` (``a x + (1 - a) relu(x)``);
- **batch-size-agnostic flatten**: ``x.view(x.size(0), -1)``, ``x.reshape(len(x), -1)``,
  ``x.view(x.shape[0], 16, 4)`` become ``torch.flatten(x, 1)`` / ``x.reshape(-1, 16, 4)``
  (auto_LiRPA would keep the traced batch size, 1, as a constant);
- **means**: ``x.mean(dim=(-1, -2))`` gets its axes positive and ascending (auto_LiRPA 0.3's
  CROWN fails on descending axes);
- **division by a constant**: ``h / c`` becomes ``h * (1 / c)`` (0.3 has no sound division);
- **zero padding**: ``F.pad(h, pads)`` with zeros (``mode="constant"``, value 0, pads >= 0) on
  (B, C, H, W) becomes an identity convolution with that padding (``zero_pad_conv``);
- **the head**: ``log_softmax`` over the classes and a shift of the logits by any (B, 1)
  tensor (``logits - logits.max(1, keepdim=True).values``, ``- logsumexp``) are dropped at
  the output: every margin ``f_y - f_j`` is unchanged, so the view's logits equal the
  model's up to one constant per example (``bounds.view.check_view`` compares them so).

``len(x)`` of the traced input is recorded as ``x.size(0)``. A model fx cannot trace
(data-dependent control flow) is left as it is: the allow-list and
the graph check (``bounds.graph``) still refuse what auto_LiRPA would mishandle.
"""

from __future__ import annotations

import builtins
import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bounds.nn import ClampReLU, SlopeReLU

Affine = tuple[torch.Tensor, torch.Tensor]  # per-channel (scale, shift): x -> scale * x + shift

_ARITHMETIC: dict[object, str] = {
    operator.add: "add", torch.add: "add", "add": "add",
    operator.sub: "sub", torch.sub: "sub", torch.subtract: "sub", "sub": "sub", "subtract": "sub",
    operator.mul: "mul", torch.mul: "mul", torch.multiply: "mul", "mul": "mul", "multiply": "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", "div": "div", "true_divide": "div",
    operator.neg: "neg", torch.neg: "neg", "neg": "neg",
}
_CLAMPS: dict[object, tuple[str, str, float | None, float | None]] = {  # target -> (min name, max name, defaults)
    torch.clamp: ("min", "max", None, None), torch.clip: ("min", "max", None, None),
    "clamp": ("min", "max", None, None), "clip": ("min", "max", None, None),
    F.hardtanh: ("min_val", "max_val", -1.0, 1.0), F.relu6: ("", "", 0.0, 6.0),
}


def _target(node: fx.Node) -> object:
    return node.target if node.op in ("call_function", "call_method") else None


class _Recorder(fx.Interpreter):
    """Runs the traced graph once and keeps every node's value."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


def _per_channel(value: object, shape: torch.Size) -> torch.Tensor | None:
    """A constant broadcast against an input-path tensor of ``shape`` as a (C,) vector, or None if it varies
    along another axis (or changes the shape)."""
    c = torch.as_tensor(value, dtype=torch.float32)
    try:
        full = torch.broadcast_to(c, shape)
    except RuntimeError:
        return None
    joint = torch.broadcast_shapes(c.shape, shape)  # type: ignore[no-untyped-call]  # unannotated in torch
    if joint != shape or c.dim() > len(shape):
        return None
    one = full[0]
    flat = one.reshape(one.shape[0], -1)
    if not bool((flat == flat[:, :1]).all()) or (c.dim() == len(shape) and c.shape[0] != 1):
        return None
    return flat[:, 0].clone()


def _compose(kind: str, affine: Affine, const: torch.Tensor | None, input_first: bool) -> Affine | None:
    """The affine map of ``kind(input-path value, constant)`` given the input-path value's map."""
    s, t = affine
    if kind == "neg":
        return -s, -t
    assert const is not None
    if kind == "add":
        return s, t + const
    if kind == "sub":
        return (s, t - const) if input_first else (-s, const - t)
    if kind == "mul":
        return s * const, t * const
    if kind == "div" and input_first and bool((const != 0).all()):
        return s / const, t / const
    return None


class _Folder:
    """One pass over a traced graph: input-path affine maps and clamp calls (see the module docstring)."""

    def __init__(self, module: fx.GraphModule, example: torch.Tensor):
        self.module = module
        recorder = _Recorder(module)
        with torch.no_grad():
            recorder.run(example)
        self.values = recorder.values
        self.placeholder = next(n for n in module.graph.nodes if n.op == "placeholder")
        self.dependent: set[fx.Node] = {self.placeholder}
        self.affine: dict[fx.Node, Affine] = {}
        channels = example.shape[1]
        self.affine[self.placeholder] = (torch.ones(channels), torch.zeros(channels))
        self.changed = False
        self.count = 0

    def _constant(self, arg: object, shape: torch.Size) -> torch.Tensor | None:
        if isinstance(arg, fx.Node):
            if arg in self.dependent or not torch.is_tensor(self.values.get(arg)):
                return None
            return _per_channel(self.values[arg], shape)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.full((shape[1],), float(arg))
        return None

    def _affine_of(self, node: fx.Node) -> Affine | None:
        kind = _ARITHMETIC.get(_target(node))
        value = self.values.get(node)
        if kind is None or node.kwargs or not torch.is_tensor(value) or value.shape != self.values[self.placeholder].shape:
            return None
        args: list[Any] = list(node.args)
        if kind == "neg":
            return _compose(kind, self.affine[args[0]], None, True) if args[0] in self.affine else None
        if len(args) != 2:
            return None
        for first in (True, False):
            path, other = (args[0], args[1]) if first else (args[1], args[0])
            if isinstance(path, fx.Node) and path in self.affine:
                const = self._constant(other, value.shape)
                return None if const is None else _compose(kind, self.affine[path], const, first)
        return None

    def _new_module(self, module: nn.Module) -> str:
        name = f"certkd_rewrite_{self.count}"
        self.count += 1
        self.module.add_submodule(name, module)
        return name

    def _clamp(self, node: fx.Node) -> None:
        spec = _CLAMPS.get(_target(node))
        if spec is None:
            return
        low_name, high_name = spec[0], spec[1]
        low: Any = spec[2]
        high: Any = spec[3]
        args = list(node.args[1:])
        kwargs = dict(node.kwargs)
        kwargs.pop("inplace", None)
        if low_name:
            low = args.pop(0) if args else kwargs.pop(low_name, low)
            high = args.pop(0) if args else kwargs.pop(high_name, high)
        if args and args != [False] or kwargs:
            return
        ends = [low, high]
        if not all(e is None or (isinstance(e, (int, float)) and not isinstance(e, bool)) for e in ends):
            return
        if low is None and high is None:
            return
        name = self._new_module(ClampReLU(low, high))
        with self.module.graph.inserting_after(node):
            new = self.module.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        self.module.graph.erase_node(node)
        self.dependent.add(new)
        self.changed = True

    def _replace(self, node: fx.Node, make: Callable[[], fx.Node]) -> None:
        """Put the node ``make()`` builds (right after ``node``) in the place of ``node``."""
        with self.module.graph.inserting_after(node):
            new = make()
        node.replace_all_uses_with(new)
        self.module.graph.erase_node(node)
        self.dependent.add(new)
        self.values[new] = self.values.get(node)
        self.changed = True

    def _slope(self, node: fx.Node) -> None:
        """``F.leaky_relu(h, a)``, ``F.prelu(h, w)`` with constant slopes -> ``SlopeReLU``."""
        target = _target(node)
        args, kwargs = list(node.args), dict(node.kwargs)
        kwargs.pop("inplace", None)
        if target in (F.leaky_relu, "leaky_relu"):
            slope = args[1] if len(args) > 1 else kwargs.pop("negative_slope", 0.01)
            if len(args) > 3 or set(kwargs) or not isinstance(slope, (int, float)) or isinstance(slope, bool):
                return
            module: nn.Module = SlopeReLU(float(slope))
        elif target in (F.prelu, torch.prelu, "prelu") and len(args) == 2 and not kwargs:
            weight = args[1]
            if not isinstance(weight, fx.Node) or weight in self.dependent or not torch.is_tensor(
                    self.values.get(weight)):
                return
            module = SlopeReLU(self.values[weight].detach().clone())
        else:
            return
        name = self._new_module(module)
        self._replace(node, lambda: self.module.graph.call_module(name, (args[0],)))

    def _is_batch_size(self, arg: object) -> bool:
        """True for ``h.size(0)``, ``h.size()[0]``, ``h.shape[0]`` (and ``len(h)``) of an input-path tensor."""
        if not isinstance(arg, fx.Node):
            return False
        if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2 and arg.args[1] == 0:
            return arg.args[0] in self.dependent
        if _target(arg) is operator.getitem and arg.args[1] == 0 and isinstance(arg.args[0], fx.Node):
            whole = arg.args[0]
            if whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1:
                return whole.args[0] in self.dependent
            if _target(whole) is getattr and whole.args[1] == "shape":
                return whole.args[0] in self.dependent
        return False

    def _flatten(self, node: fx.Node) -> None:
        """``h.view(B, -1)`` -> ``torch.flatten(h, 1)``; ``h.view(B, a, b)`` -> ``h.reshape(-1, a, b)``."""
        if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
            return
        source, *shape = node.args
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        if not shape or not self._is_batch_size(shape[0]):
            return
        rest = shape[1:]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in rest):
            return
        if rest == [-1]:
            self._replace(node, lambda: self.module.graph.call_function(torch.flatten, (source, 1)))
        elif -1 not in rest:
            self._replace(node, lambda: self.module.graph.call_method("reshape", (source, (-1, *rest))))

    def _mean_axes(self, node: fx.Node) -> None:
        """``h.mean(dim=(-1, -2))`` -> ``h.mean(dim=(2, 3))`` (positive, ascending axes)."""
        if _target(node) not in ("mean", torch.mean):
            return
        source = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        value = self.values.get(source) if isinstance(source, fx.Node) else None
        if (not torch.is_tensor(value) or not isinstance(dims, (int, tuple, list)) or len(node.args) > 3
                or set(node.kwargs) - {"dim", "keepdim"}):
            return
        listed = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in listed):
            return
        fixed = tuple(sorted(d % value.dim() for d in listed))
        if list(fixed) == listed:
            return
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        self._replace(node, lambda: self.module.graph.call_function(torch.mean, (source, fixed),
                                                                    {"keepdim": keepdim}))

    def _division(self, node: fx.Node) -> None:
        """``h / c`` with a constant number ``c != 0`` -> ``h * (1 / c)``."""
        if _ARITHMETIC.get(_target(node)) != "div" or node.kwargs or len(node.args) != 2:
            return
        source, const = node.args
        if not isinstance(source, fx.Node) or source not in self.dependent:
            return
        if not isinstance(const, (int, float)) or isinstance(const, bool) or const == 0:
            return
        self._replace(node, lambda: self.module.graph.call_function(operator.mul, (source, 1.0 / float(const))))

    def _zero_pad(self, node: fx.Node) -> None:
        """``F.pad(h, pads)`` with zeros on (B, C, H, W) -> an identity convolution with that padding."""
        if _target(node) is not F.pad:
            return
        args, kwargs = list(node.args), dict(node.kwargs)
        pads = args[1] if len(args) > 1 else kwargs.get("pad")
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value")
        source = self.values.get(args[0]) if isinstance(args[0], fx.Node) else None
        if (mode != "constant" or value not in (None, 0, 0.0) or not torch.is_tensor(source) or source.dim() != 4
                or not isinstance(pads, (tuple, list)) or len(pads) not in (2, 4)
                or not all(isinstance(p, int) and p >= 0 for p in pads)):
            return
        left, right, top, bottom = (*pads, 0, 0) if len(pads) == 2 else pads
        name = self._new_module(zero_pad_conv(int(source.shape[1]), (left, right, top, bottom), source))
        self._replace(node, lambda: self.module.graph.call_module(name, (args[0],)))

    def _head(self) -> None:
        """Drop what only shifts each example's logits at the output (log-softmax, ``- max``, ``- logsumexp``)."""
        output = next(n for n in self.module.graph.nodes if n.op == "output")
        while isinstance(output.args[0], fx.Node):
            node = output.args[0]
            logits = self.values.get(node)
            if not torch.is_tensor(logits) or logits.dim() != 2 or len(node.users) != 1:
                return
            kept = self._shifted(node, logits)
            if kept is None:
                return
            node.replace_all_uses_with(kept)
            self.module.graph.erase_node(node)
            self.changed = True

    def _shifted(self, node: fx.Node, logits: torch.Tensor) -> fx.Node | None:
        """The logits ``node`` shifts by one value per example (None if it does not)."""
        target = _target(node)
        args = list(node.args)
        if target in (F.log_softmax, torch.log_softmax, "log_softmax"):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
            source = args[0]
            if isinstance(source, fx.Node) and dim in (1, -1) and node.kwargs.get("dtype") is None:
                return source
            return None
        if node.op == "call_module" and isinstance(self.module.get_submodule(str(node.target)), nn.LogSoftmax):
            if self.module.get_submodule(str(node.target)).dim in (1, -1) and isinstance(args[0], fx.Node):
                return args[0]
            return None
        kind = _ARITHMETIC.get(target)
        if kind not in ("add", "sub") or node.kwargs or len(args) != 2:
            return None
        first, second = args
        for logits_arg, shift in ((first, second), (second, first)) if kind == "add" else ((first, second),):
            if not isinstance(logits_arg, fx.Node) or not torch.is_tensor(self.values.get(logits_arg)):
                continue
            shift_value = self.values.get(shift) if isinstance(shift, fx.Node) else shift
            kept = self.values[logits_arg]
            if kept.shape != logits.shape:
                continue
            if isinstance(shift_value, (int, float)) and not isinstance(shift_value, bool):
                return logits_arg
            if torch.is_tensor(shift_value) and tuple(shift_value.shape) in ((len(logits), 1), (1, 1), (1,), ()):
                return logits_arg
        return None

    def run(self, affine_layer: Callable[[torch.Tensor, torch.Tensor], nn.Module]) -> None:
        for node in list(self.module.graph.nodes):
            if node is self.placeholder:
                continue
            if any(isinstance(a, fx.Node) and a in self.dependent for a in node.all_input_nodes):
                self.dependent.add(node)
            folded = self._affine_of(node) if node in self.dependent else None
            if folded is not None:
                self.affine[node] = folded
            elif node in self.dependent:
                for rewrite in (self._clamp, self._slope, self._flatten, self._mean_axes, self._division,
                                self._zero_pad):
                    if getattr(node, "_erased", False):
                        break
                    rewrite(node)
        self._head()
        for node, (scale, shift) in list(self.affine.items()):
            if node is self.placeholder or all(u in self.affine for u in node.users):
                continue
            name = self._new_module(affine_layer(scale, shift))
            with self.module.graph.inserting_after(self.placeholder):
                new = self.module.graph.call_module(name, (self.placeholder,))
            node.replace_all_uses_with(new)
            self.changed = True
        self.module.graph.eliminate_dead_code()
        self.module.recompile()


def zero_pad_conv(channels: int, pads: tuple[int, int, int, int], like: torch.Tensor) -> nn.Conv2d:
    """``F.pad(h, (left, right, top, bottom))`` with zeros as an identity convolution (exact).

    One padding ``P = max(pads)`` on every side and a kernel of zeros with a single 1 at
    ``(P - top, P - left)``: output ``(o, q)`` reads input ``(o - top, q - left)``, zero outside,
    and the output size ``H + top + bottom`` is the padded one. Unequal pads give an
    ``ExpandedConv2d`` (bounded in matrix mode, ``bounds.view.needs_matrix_mode``).
    """
    from bounds.view import ExpandedConv2d

    left, right, top, bottom = pads
    big = max(pads)
    kernel = (1 + 2 * big - top - bottom, 1 + 2 * big - left - right)
    cls = nn.Conv2d if len(set(pads)) == 1 else ExpandedConv2d
    conv = cls(channels, channels, kernel, padding=big, bias=False).to(device=like.device, dtype=like.dtype)
    weight = torch.zeros_like(conv.weight)
    weight[torch.arange(channels), torch.arange(channels), big - top, big - left] = 1.0
    conv.weight.data = weight
    conv.weight.requires_grad_(False)
    return conv


@contextlib.contextmanager
def _len_as_size(view: nn.Module) -> Iterator[None]:
    """While tracing, ``len(t)`` in the forwards of the view's modules records ``t.size(0)`` (fx refuses ``len``).

    The modules' own (non-torch) source modules get a global ``len`` for the duration only.
    """
    def _len(obj: Any) -> Any:
        return obj.size(0) if isinstance(obj, fx.Proxy) else builtins.len(obj)

    patched: dict[int, dict[str, Any]] = {}
    for module in view.modules():
        namespace = getattr(type(module).forward, "__globals__", None)
        if (namespace is None or "len" in namespace or id(namespace) in patched
                or str(namespace.get("__name__", "")).startswith("torch.")):
            continue
        patched[id(namespace)] = namespace
    for namespace in patched.values():
        namespace["len"] = _len
    try:
        yield
    finally:
        for namespace in patched.values():
            namespace.pop("len", None)


class _Tracer(fx.Tracer):
    """fx's tracer with every convolution kept as one module, subclasses included.

    fx inlines a module whose class is not in ``torch.nn`` into its functional calls; the
    view's ``ExpandedConv2d`` (``bounds.view``) would then vanish from the traced view, and
    with it the decision to bound the graph in matrix mode (CROWN bounds above PGD
    margins on dilated convolutions behind a functional clamp).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def fold_forward(view: nn.Module, example: torch.Tensor,
                 affine_layer: Callable[[torch.Tensor, torch.Tensor], nn.Module]) -> nn.Module:
    """``view`` with inline normalization and clamps rewritten (module docstring), or ``view`` itself.

    ``affine_layer(scale, shift)`` builds the dense layer for a per-channel affine map.
    Returns ``view`` unchanged when fx cannot trace it or there is nothing to rewrite.
    """
    try:
        with _len_as_size(view):
            graph = _Tracer().trace(view)
        traced = fx.GraphModule(view, graph, type(view).__name__)
        folder = _Folder(traced, example)
        folder.run(affine_layer)
    except Exception:  # fx raises many kinds on untraceable code: keep the view, the graph check guards it
        return view
    return traced if folder.changed else view
