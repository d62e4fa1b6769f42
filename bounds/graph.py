"""auto_LiRPA's graph against the model: the attribute-level allow-list and the graph check.

No allow-list foresees every attribute an old library ignores, so two checks run on every
path that calls auto_LiRPA (``bounds.certify.BoundEngine``, ``bounds.linearity``), with no
switch to skip them:

- ``check_graph_supported``: every node that carries the input's perturbation must be an
  operator of the backend's ``AllowList`` for the method and norm, and each of its ONNX
  attributes must be listed with an accepted value (an unlisted attribute is refused: it is
  one 0.3 may silently drop, as it drops MaxPool's ``dilations`` and ``ceil_mode``);
- ``GraphCheck``: the ``BoundedModule``'s forward equals the verification view's on the batch
  itself and on random points of its box (corners included), at ``GRAPH_RTOL``; a mismatch
  refuses the model naming the first diverging node and its operator.

``lirpa_call`` wraps every call into auto_LiRPA: its prints are captured and dropped, its
warnings silenced, and any exception it raises becomes one ``UnsupportedModelError`` sentence.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bounds.bound_methods import BOUND_METHOD_TABLE
from bounds.errors import BoundsError, UnsupportedModelError
from bounds.norms import norm_name, parse_norm

GRAPH_RTOL = 1e-5  # max |graph(x) - view(x)|, relative to max(1, max |view(x)|)
ESTIMATE_HINT = "use the lipschitz, smoothing or clever methods for this model instead"
ALPHA_HINT = "use the crown method instead"

ALL_METHODS = frozenset(m.name for m in BOUND_METHOD_TABLE)
NO_ALPHA = frozenset(m.name for m in BOUND_METHOD_TABLE if not m.optimized)
ANY_NORM = frozenset({math.inf, 2.0})

Accept = Callable[[object], bool]


def _any(_value: object) -> bool:
    return True


def _equals(expected: object) -> Accept:
    return lambda value: _plain(value) == expected


def _all_equal(value: object) -> bool:
    return len(set(_plain(value))) <= 1


def _all_zero(value: object) -> bool:
    return all(v == 0 for v in _plain(value))


def _not_batch_axis(value: object) -> bool:
    return bool(_plain(value) != 0)


def _plain(value: object) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    return list(value) if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class OperatorRule:
    """One operator of an allow-list: the methods and norms it is bounded soundly under, and its attributes.

    ``attributes`` maps every ONNX attribute the operator may carry to the test its value must
    pass; an attribute not listed is refused. ``checks`` is a list of (test of the node, what the
    refusal names) for properties that are not attributes (e.g. a product of two perturbed tensors).
    """

    label: str
    methods: frozenset[str] = ALL_METHODS
    norms: frozenset[float] = ANY_NORM
    attributes: Mapping[str, Accept] = field(default_factory=dict)


@dataclass(frozen=True)
class AllowList:
    """The operators one auto_LiRPA backend bounds soundly, keyed by node class name (``BoundConv``)."""

    backend: str
    operators: Mapping[str, OperatorRule]
    ignored_attributes: frozenset[str] = frozenset({"device"})  # added by auto_LiRPA itself


def _rule(label: str, methods: frozenset[str] = ALL_METHODS, **attributes: Accept) -> OperatorRule:
    return OperatorRule(label, methods, ANY_NORM, attributes)


# auto_LiRPA 0.3: what the hazard suite and the fuzzing suite (tests/test_hazards.py,
# tests/test_fuzz_soundness.py) check. Grows only with tests. What the verification view
# rewrites (grouped, dilated and unequally padded convolutions, Hardtanh/clamp, normalization)
# never reaches this table in the refused form.
ALLOW_03 = AllowList("0.3", {
    "BoundLinear": _rule("Linear", alpha=_equals(1.0), beta=_equals(1.0), transB=_equals(1)),
    "BoundConv": _rule("convolution", dilations=_equals([1, 1]), group=_equals(1), pads=_all_equal,
                       kernel_shape=_any, strides=_any),
    "BoundRelu": _rule("ReLU"),
    "BoundFlatten": _rule("flatten", axis=_equals(1)),
    "BoundReshape": _rule("reshape"),
    "BoundAdd": _rule("addition", NO_ALPHA),
    "BoundSub": _rule("subtraction", NO_ALPHA),
    "BoundMul": _rule("multiplication", NO_ALPHA),
    "BoundNeg": _rule("negation", NO_ALPHA),
    "BoundUnsqueeze": _rule("unsqueeze", NO_ALPHA, axes=_any),
    "BoundSqueeze": _rule("squeeze", NO_ALPHA, axes=_any),
    "BoundConcat": _rule("concatenation", NO_ALPHA, axis=_not_batch_axis),
    "BoundGlobalAveragePool": _rule("global average pooling", NO_ALPHA),
    "BoundReduceMean": _rule("mean", NO_ALPHA, axes=_any, keepdims=_any),
    "BoundAveragePool": _rule("average pooling", NO_ALPHA, kernel_shape=_any, strides=_any, pads=_all_zero,
                              ceil_mode=_equals(0), count_include_pad=_any),
    "BoundMaxPool": _rule("max-pooling", NO_ALPHA, kernel_shape=_any, strides=_any, pads=_all_zero,
                          dilations=_equals([1, 1]), ceil_mode=_equals(0)),
})
# a BoundMul whose two inputs are both perturbed is looked up under this key as well
PERTURBED_PRODUCT = "BoundMul:perturbed"
# backend family -> allow-list; bounds.backends adds "0.7" and chooses by capability
ALLOW_LISTS: dict[str, AllowList] = {"0.3": ALLOW_03}
_UNBOUNDED_KINDS = frozenset({"BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant",
                              "BoundShape"})
# friendly names for nodes outside every allow-list
_NODE_LABELS = {
    "BoundSoftmax": "softmax", "BoundExp": "exp", "BoundLog": "log", "BoundMatMul": "a matrix product (MatMul)",
    "BoundDiv": "division", "BoundPow": "power", "BoundSqrt": "sqrt", "BoundReduceMax": "max-reduction",
    "BoundBatchNormalization": "BatchNorm", "BoundPad": "padding (Pad)", "BoundClip": "clamp (Clip)",
    "BoundLogSoftmax": "log-softmax", "BoundPRelu": "PReLU", "BoundLeakyRelu": "LeakyReLU",
}


def allow_list() -> AllowList:
    """The installed backend's allow-list, chosen by what it can do, not by its version (``bounds.backends``)."""
    from bounds.backends import current_backend

    return ALLOW_LISTS[current_backend().family]


def node_kind(node: object) -> str:
    """auto_LiRPA's operator class name (certkd's subclasses name the class they extend)."""
    return str(getattr(node, "lirpa_kind", type(node).__name__))


def node_label(kind: str, allowed: AllowList | None = None) -> str:
    if allowed is not None and kind in allowed.operators:
        return allowed.operators[kind].label
    return _NODE_LABELS.get(kind, kind.removeprefix("Bound"))


def _operator_text(kind: str, label: str, attr: str = "") -> str:
    """``max-pooling, MaxPool, kernel_shape=[2,2]``: a node's label, its operator (once where the label is that
    name) and its attributes, as refusals name a node."""
    operator = kind.removeprefix("Bound")
    return ", ".join([label, *([operator] if operator != label else []), *([attr] if attr else [])])


def perturbed_names(bounded: object) -> set[str]:
    """Names of the nodes whose values depend on the input (edges out of a Shape node carry no values)."""
    nodes = bounded._modules  # type: ignore[attr-defined]
    frontier = [n for n in nodes.values() if node_kind(n) == "BoundInput"]
    seen = {n.name for n in frontier}
    while frontier:
        node = frontier.pop()
        if node_kind(node) == "BoundShape":
            continue
        for name in getattr(node, "output_name", []):
            if name not in seen:
                seen.add(name)
                frontier.append(bounded[name])  # type: ignore[index]
    return seen


def _format(value: object) -> str:
    value = _plain(value)
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def node_problem(node: object, method: str, norm: float, allowed: AllowList, perturbed: set[str]) -> str | None:
    """Why one perturbed node is outside ``allowed`` for ``method`` and ``norm`` (a phrase), or None."""
    kind = node_kind(node)
    rule = allowed.operators.get(kind)
    if rule is None:
        return node_label(kind)
    if method not in rule.methods:
        return f"{rule.label} with {method}"
    if norm not in rule.norms:
        return f"{rule.label} under L{norm_name(norm)}"
    attributes = getattr(node, "attr", {}) or {}
    for name in sorted(attributes):
        if name in allowed.ignored_attributes:
            continue
        accept = rule.attributes.get(name)
        if accept is None or not accept(attributes[name]):
            return f"{rule.label} with {name}={_format(attributes[name])}"
    inputs = [getattr(i, "name", None) for i in getattr(node, "inputs", [])]
    if kind == "BoundMul" and sum(name in perturbed for name in inputs) > 1:
        product = allowed.operators.get(PERTURBED_PRODUCT)
        if product is None or method not in product.methods or norm not in product.norms:
            return "a product of two perturbed tensors"
    if kind == "BoundMaxPool" and _plain(attributes.get("kernel_shape")) != _plain(attributes.get("strides")):
        return "max-pooling with a stride other than its kernel size"
    if kind == "BoundAveragePool" and method != "ibp" \
            and _plain(attributes.get("kernel_shape")) != _plain(attributes.get("strides")):
        # auto_LiRPA's backward pass through average pooling holds only for windows that do not overlap or skip
        return f"average pooling with a stride other than its kernel size under {method}"
    return None


def _join(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def refuse(operators: Sequence[str], version: str | None, hint: str = ESTIMATE_HINT) -> UnsupportedModelError:
    """The one-sentence refusal naming the operator(s) and pointing to the other methods."""
    return UnsupportedModelError(f"auto_LiRPA {version or ''} cannot bound {_join(operators)} soundly; "
                                 f"{hint}.".replace("  ", " "))


def input_readers(bounded: object) -> list[object]:
    """The nodes that read the (perturbed) input directly."""
    nodes = list(bounded._modules.values())  # type: ignore[attr-defined]
    names = {n.name for n in nodes if node_kind(n) == "BoundInput"}
    return [n for n in nodes if any(getattr(i, "name", None) in names for i in getattr(n, "inputs", []))]


def check_graph_supported(bounded: object, method: str, norm: str | float, version: str | None,
                          allowed: AllowList | None = None) -> None:
    """Refuse a built ``BoundedModule`` whose graph leaves the allow-list for ``method`` and ``norm``.

    Besides the per-operator, per-attribute allow-list: under L2 every node reading the
    perturbed input must be a Linear or Conv (auto_LiRPA 0.3 applies the ball only there;
    the verification view puts an identity layer first where needed).
    """
    p = parse_norm(norm)
    allowed = allowed or allow_list()
    perturbed = perturbed_names(bounded)
    nodes = [n for n in bounded._modules.values()  # type: ignore[attr-defined]
             if n.name in perturbed and node_kind(n) not in _UNBOUNDED_KINDS]
    kinds = {node_kind(n) for n in nodes}
    problems: list[str] = []
    if ("BoundSoftmax" in kinds and "BoundSoftmax" not in allowed.operators) or {"BoundExp", "BoundDiv"} <= kinds:
        problems.append("softmax")
    if "BoundMaxPool" in kinds and getattr(bounded, "bound_opts", {}).get("conv_mode") == "matrix":
        # the slow fuzzing run: CROWN bounds above PGD margins (15 configurations of 450 networks)
        problems.append("max-pooling in its matrix mode (used after a dilated or unequally padded convolution)")
    for node in nodes:
        problem = node_problem(node, method, p, allowed, perturbed)
        if problem is not None and problem not in problems:
            problems.append(problem)
    if not math.isinf(p):
        for node in input_readers(bounded):
            if node_kind(node) not in ("BoundLinear", "BoundConv"):
                problems.append(f"a first layer that is not Linear or Conv ({node_label(node_kind(node))}) under "
                                f"L{norm_name(p)}")
                break
    if problems:
        only_alpha = method == "alpha-crown" and all(" with alpha-crown" in q for q in problems)
        raise refuse(problems, version, ALPHA_HINT if only_alpha else ESTIMATE_HINT)


# --------------------------------------------------------------------------- foreign output and errors

@contextlib.contextmanager
def lirpa_call(what: str, version: str | None) -> Iterator[None]:
    """Run auto_LiRPA code with its stdout captured and dropped, its warnings and log lines silenced.

    Any exception it raises (other than a ``BoundsError``) becomes one ``UnsupportedModelError``
    sentence naming the operator it failed at where one can be found (``failing_operator``):
    ``auto_LiRPA 0.3 failed to <what> at <operator> (<type>: <first line>); <hint>.``
    """
    from bounds.lirpa import LOG_RECORDS, silence_logging

    silence_logging()
    LOG_RECORDS.records.clear()
    logger = logging.getLogger("auto_LiRPA")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BoundsError:
        raise
    except Exception as exc:  # auto_LiRPA raises anything: one sentence for the user
        detail = str(exc).splitlines()[0][:120] if str(exc).strip() else ""
        operator = failing_operator(exc, [r.getMessage() for r in LOG_RECORDS.records])
        where = f" at {operator}" if operator else ""
        raise UnsupportedModelError(
            f"auto_LiRPA {version or ''} failed to {what}{where} ({type(exc).__name__}"
            f"{': ' + detail if detail else ''}); "
            f"{ESTIMATE_HINT} (or a smaller batch size if memory ran out).".replace("  ", " ")) from exc
    finally:
        logger.setLevel(level)


_LOGGED_OPERATOR = re.compile(r"Name: onnx::(\w+), Attr: (\{.*\})")
_BOUND_CLASS = re.compile(r"\b(Bound[A-Z]\w*)")
_NOT_OPERATORS = frozenset({"BoundedModule", "BoundedTensor", "BoundDataParallel"})


def _attributes(attr: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={_format(v)}" for k, v in sorted(attr.items()) if k != "device")


def failing_operator(exc: BaseException, log_lines: Sequence[str] = ()) -> str | None:
    """The operator an auto_LiRPA failure happened at, with its attributes, e.g. ``log-softmax (LogSoftmax, axis=1)``.

    Looked up, in order, in auto_LiRPA's own log lines (``Name: onnx::LogSoftmax, Attr: {...}``,
    its list of unsupported operations), the innermost traceback frame that runs a method of
    an operator node (``self`` a ``Bound*`` node: its name and attributes), and an operator
    class named in the message (``BoundPad.forward() missing ...``). None when none names one.
    """
    names = []
    for line in log_lines:
        found = _LOGGED_OPERATOR.search(line)
        if found:
            label = node_label(f"Bound{found.group(1)}")
            attr = found.group(2).replace("'", "").replace(" ", "").replace(":", "=").strip("{}")
            text = f"{label} ({found.group(1)}{', ' + attr if attr else ''})"
            if text not in names:
                names.append(text)
    if names:
        return _join(names)
    node = None
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        kind = type(candidate).__name__
        if kind.startswith("Bound") and kind not in _NOT_OPERATORS and hasattr(candidate, "name"):
            node = candidate
        tb = tb.tb_next
    if node is not None:
        kind = node_kind(node)
        attr = _attributes(getattr(node, "attr", {}) or {})
        name = f"node {node.name} " if node.name else ""
        return f"{name}({_operator_text(kind, node_label(kind), attr)})"
    found = _BOUND_CLASS.search(str(exc))
    if found and found.group(1) not in _NOT_OPERATORS:
        return node_label(found.group(1))
    return None


# --------------------------------------------------------------------------- graph equals model

def _pads4(value: object, default: int = 0) -> list[int]:
    pads = _plain(value) if value is not None else [default] * 4
    return [int(p) for p in pads]


def _onnx_reference(node: object, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """The node's output by the ONNX definition of its operator, with every attribute (None: not modelled).

    Used only to name the first diverging node: the operators whose attributes auto_LiRPA 0.3
    is known to drop (padding, dilation, ceil_mode, count_include_pad).
    """
    kind, attr = node_kind(node), dict(getattr(node, "attr", {}) or {})
    attr = {k: _plain(v) for k, v in attr.items()}
    if kind == "BoundConv":
        top, left, bottom, right = _pads4(attr.get("pads"))
        x = F.pad(inputs[0], (left, right, top, bottom))
        bias = inputs[2] if len(inputs) > 2 else None
        return F.conv2d(x, inputs[1], bias, _plain(attr["strides"]), 0, _plain(attr["dilations"]),
                        int(attr.get("group", 1)))
    if kind == "BoundMaxPool":
        top, left, bottom, right = _pads4(attr.get("pads"))
        x = F.pad(inputs[0], (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(x, _plain(attr["kernel_shape"]), _plain(attr["strides"]), 0,
                            _plain(attr.get("dilations", [1, 1])), bool(attr.get("ceil_mode", 0)))
    if kind == "BoundAveragePool":
        top, left, bottom, right = _pads4(attr.get("pads"))
        if (top, left) != (bottom, right):
            return None
        return F.avg_pool2d(inputs[0], _plain(attr["kernel_shape"]), _plain(attr["strides"]), [top, left],
                            bool(attr.get("ceil_mode", 0)), bool(attr.get("count_include_pad", 0)))
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= GRAPH_RTOL * scale


def first_diverging_node(bounded: object) -> str:
    """``node /11 (max-pooling, MaxPool)``: the first node (in auto_LiRPA's order) whose value differs from its
    operator's definition on the values auto_LiRPA computed last, or the output node when none is found."""
    nodes = list(bounded._modules.values())  # type: ignore[attr-defined]
    for node in nodes:
        raw = [getattr(i, "forward_value", None) for i in getattr(node, "inputs", [])]
        out = getattr(node, "forward_value", None)
        values = [v for v in raw if torch.is_tensor(v)]
        if out is None or len(values) != len(raw):
            continue
        with torch.no_grad():
            try:
                expected = _onnx_reference(node, values)
            except (RuntimeError, ValueError, TypeError, KeyError):
                expected = None
        if expected is not None and not _close(out, expected):
            return describe_node(node)
    final = bounded[bounded.final_name]  # type: ignore[attr-defined,index]
    return describe_node(final)


def describe_node(node: object) -> str:
    """``node /11 (max-pooling, MaxPool)``: a node of auto_LiRPA's graph as refusals name it."""
    kind = node_kind(node)
    return f"node {node.name} ({_operator_text(kind, node_label(kind, ALLOW_03))})"  # type: ignore[attr-defined]


def box_points(x: torch.Tensor, eps: torch.Tensor, norm: float, generator: torch.Generator) -> torch.Tensor:
    """Per example: one random corner of its box (L-inf, clipped to [0, 1]) or a point of its L2 sphere,
    and one random point inside; shape (2 B, ...)."""
    e = eps.view(-1, *([1] * (x.dim() - 1))).to(x)
    u = torch.rand(x.shape, generator=generator).to(x)
    if math.isinf(norm):
        low, high = (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0)
        corner = torch.where(u < 0.5, low, high)
        inside = low + (high - low) * torch.rand(x.shape, generator=generator).to(x)
    else:
        direction = torch.randn(x.shape, generator=generator).to(x)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(e)
        corner = x + e * direction
        inside = x + e * u.flatten(1)[:, :1].view_as(e) * direction
    return torch.cat([corner, inside])


def unit_box_points(input_shape: Sequence[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """The corners 0 and 1 of [0, 1]^d, ``n`` random corners and ``n`` random interior points: (2 n + 2, ...)."""
    shape = (n, *input_shape)
    corners = (torch.rand(shape, generator=generator) < 0.5).float()
    return torch.cat([torch.zeros(1, *input_shape), torch.ones(1, *input_shape), corners,
                      torch.rand(shape, generator=generator)])


class GraphCheck:
    """Checks that a ``BoundedModule`` computes its reference module's function (issue 16).

    ``reference`` is the module the graph was built from (the verification view, or a composite
    around it); ``extra`` builds the unperturbed extra inputs for a batch of points (None when
    the graph has one input). ``check`` raises ``UnsupportedModelError`` naming the first
    diverging node. The input-independent part (points of the unit box) runs once per graph
    (``check_unit_box``); the batch itself and points of its box are checked on every call.
    """

    def __init__(self, bounded: object, reference: nn.Module, version: str | None,
                 extra: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None, seed: int = 0):
        self.bounded = bounded
        self.reference = reference
        self.version = version
        self.extra = extra
        self.generator = torch.Generator().manual_seed(seed)
        self.unit_box_checked = False

    def _compare(self, points: torch.Tensor) -> torch.Tensor:
        """The reference's outputs at ``points``, after checking the graph's agree with them."""
        inputs = (points, *(self.extra(points) if self.extra is not None else ()))
        with torch.no_grad():
            expected = self.reference(*inputs)
            with lirpa_call("evaluate its graph of this model", self.version):
                got = self.bounded(*inputs)  # type: ignore[operator]
        if not _close(got, expected):
            where = first_diverging_node(self.bounded)
            raise UnsupportedModelError(
                f"auto_LiRPA {self.version or ''} computes a different function than this model (first at "
                f"{where}), so its bounds would not hold; {ESTIMATE_HINT}.".replace("  ", " "))
        result: torch.Tensor = expected
        return result

    def check_unit_box(self, input_shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
        """Points of [0, 1]^d, once per graph (they do not depend on the batch)."""
        if not self.unit_box_checked:
            self._compare(unit_box_points(input_shape, 3, self.generator).to(device, dtype))
            self.unit_box_checked = True

    def check(self, x: torch.Tensor, eps: torch.Tensor, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch ``x`` itself, one corner and one inner point of each example's ball (and, for a
        one-input graph, once, points of the unit box).

        Returns the checked points (3, B, ...) (``x`` first) and the reference's outputs there (3, B, ...),
        evidence for ``bounds.evidence``.
        """
        if self.extra is None:
            self.check_unit_box(x.shape[1:], x.device, x.dtype)
        points = torch.cat([x, box_points(x, eps, norm, self.generator)])
        outputs = self._compare(points)
        return points.view(3, *x.shape), outputs.view(3, len(x), *outputs.shape[1:])
