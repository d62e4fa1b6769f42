"""Rewrites of the verification view inside ``forward`` code, on its ``torch.fx`` graph.

Module replacement (``bounds.view``) cannot reach what a forward computes inline. Here the
view is traced with ``torch.fx`` and two exact rewrites are applied to the traced graph:

- **user-written normalization**: additions, subtractions, multiplications and divisions of
  the input by constants (buffers, parameters, tensors or numbers built in ``forward``, also
  ``x * (1 / std)``, ``torch.sub``/``torch.div``), per channel, are composed into one
  ``x -> scale * x + shift`` and written as the dense diagonal 1x1 convolution (or diagonal
  Linear) that ``Normalize`` becomes (theory.md §1);
- **clamping**: ``torch.clamp``/``clip``, ``Tensor.clamp``, ``F.hardtanh`` and ``F.relu6``
  with constant ends become ``bounds.nn.ClampReLU`` (``a + relu(x - a) - relu(x - b)``).

A model fx cannot trace (data-dependent control flow) is left as it is: the allow-list and
the graph check (``bounds.graph``) still refuse what auto_LiRPA would mishandle.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bounds.nn import ClampReLU

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
                self._clamp(node)
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
        traced = fx.GraphModule(view, _Tracer().trace(view), type(view).__name__)
        folder = _Folder(traced, example)
        folder.run(affine_layer)
    except Exception:  # fx raises many kinds on untraceable code: keep the view, the graph check guards it
        return view
    return traced if folder.changed else view
