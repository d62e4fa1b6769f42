"""Bound-propagation backends by capability, not by version string (docs/auto_lirpa.md).

The installed auto_LiRPA is probed for what it can do (``probe``): a GELU relaxation
registered for ``custom::Gelu``, a LayerNorm operator, the log-sum-exp softmax relaxation
(the softmax hazard of 0.3 is gone there) and products of two perturbed tensors. The
capabilities select one **capability table**: the ``bounds.graph.AllowList`` of that backend
(``ALLOW_03``, ``ALLOW_07``: what it may bound, per auto_LiRPA operator and attribute, under
which methods and norms) and the modules refused by name. Every operator names the CI tests
that prove its hazard absent (or the rewrite exact) against that backend (``EVIDENCE``); an
entry grows only with such a test, and CI runs the bound-propagation tests once per backend
(``.ci/run``).

- ``"0.3"``: PyPI's auto_LiRPA 0.3 (needs the shims of ``bounds.lirpa``); CNNs, MLPs,
  ResNets; no transformer operator (softmax is unsound there, GELU/LayerNorm are missing),
  so ViTs are refused with one sentence naming 0.7.x as the way.
- ``"0.7"``: auto_LiRPA 0.7.x (git releases; tested with 0.7.1): no shim; the same CNN
  entries plus the operators of a ViT once ``bounds.vit_rewrite`` has written GELU and
  attention in supported operators: IBP and CROWN (CROWN-IBP and alpha-CROWN are refused
  on them: NaN bounds under L2, and failures, measured on 0.7.1).

``current_backend()`` imports auto_LiRPA (``bounds.lirpa.import_auto_lirpa``) and returns
the ``Backend`` in use; ``describe()`` is what ``certkd doctor`` prints.

Example
-------
>>> backend = current_backend()          # doctest: +SKIP
>>> backend.family, backend.allows("BoundSoftmax", "crown", float("inf"))  # doctest: +SKIP
('0.7', True)
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bounds.bound_methods import BOUND_METHODS
from bounds.graph import ALLOW_03, ALLOW_LISTS, ESTIMATE_HINT, PERTURBED_PRODUCT, AllowList, OperatorRule

IBP_CROWN = frozenset({"ibp", "crown"})
INSTALL_07 = "pip install --no-deps git+https://github.com/Verified-Intelligence/auto_LiRPA graphviz appdirs"

# the CI tests behind the entries (run against every backend by .ci/run)
_SWEEP = "tests/test_hazards.py::test_soundness_sweep"
_WITNESS = "tests/test_backends.py::test_every_entry_is_sound_on_its_witness"
_VIT = "tests/test_vit_lirpa.py::test_vit_crown_below_pgd"

def _equals(expected: object) -> Any:
    return lambda value: _plain(value) == expected


def _not_batch_axis(value: object) -> bool:
    return _plain(value) != 0


def _keeps_batch_first(value: object) -> bool:
    perm = _plain(value)
    return isinstance(perm, list) and len(perm) > 0 and perm[0] == 0


def _plain(value: object) -> object:
    if torch.is_tensor(value):
        return value.tolist()
    return list(value) if isinstance(value, (tuple, list)) else value


def _vit_rule(label: str, **attributes: Any) -> OperatorRule:
    return OperatorRule(label, IBP_CROWN, frozenset({math.inf, 2.0}), attributes)


# auto_LiRPA 0.7.x: 0.3's operators (0.7.x exports at torch's default opset, where Reshape
# carries allowzero and ReduceMean/Squeeze/Unsqueeze take their axes as inputs), plus the
# operators of a ViT after bounds.vit_rewrite, as 0.7.x traces it: LayerNorm as mean / sub /
# sqr / sqrt / reciprocal / mul, attention as MatMul / Softmax / Transpose, the class token as
# Concat and Gather. The transformer operators are proven with IBP and CROWN only.
ALLOW_07 = AllowList("0.7", {
    **ALLOW_03.operators,
    "BoundReshape": replace(ALLOW_03.operators["BoundReshape"], attributes={"allowzero": _equals(0)}),
    "BoundGelu": _vit_rule("GELU"),
    "BoundSoftmax": _vit_rule("softmax", axis=_not_batch_axis),
    "BoundMatMul": _vit_rule("a matrix product (MatMul)"),
    "BoundTranspose": _vit_rule("transpose", perm=_keeps_batch_first),
    "BoundGather": _vit_rule("indexing (Gather)", axis=_not_batch_axis),
    "BoundSqr": _vit_rule("square"),
    "BoundSqrt": _vit_rule("sqrt"),
    "BoundReciprocal": _vit_rule("reciprocal"),
    PERTURBED_PRODUCT: _vit_rule("a product of two perturbed tensors"),
})
ALLOW_LISTS["0.7"] = ALLOW_07
_VIT_KINDS = frozenset(ALLOW_07.operators) - frozenset(ALLOW_03.operators)
# what proves each operator (kind -> tests): every operator has a witness, 0.3's also the sweep
EVIDENCE: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    kind: (_WITNESS, _VIT if kind in _VIT_KINDS else _SWEEP) for kind in ALLOW_07.operators})
_UNBOUNDED = frozenset({"BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant",
                        "BoundShape"})

# module types refused by name before any graph is built: the label the refusal gives them
_REFUSED_03: Mapping[type, str] = types.MappingProxyType({
    nn.MultiheadAttention: "attention (nn.MultiheadAttention)",
    nn.Softmax: "softmax", nn.LogSoftmax: "log-softmax", nn.Softmin: "softmin",
    nn.LayerNorm: "LayerNorm", nn.GroupNorm: "GroupNorm",
    nn.InstanceNorm1d: "InstanceNorm", nn.InstanceNorm2d: "InstanceNorm",
    nn.GELU: "GELU", nn.SiLU: "SiLU", nn.Mish: "Mish", nn.ELU: "ELU", nn.Hardswish: "Hardswish",
    nn.BatchNorm3d: "BatchNorm3d", nn.Conv1d: "Conv1d", nn.Conv3d: "Conv3d",
    nn.ConvTranspose2d: "ConvTranspose2d", nn.Upsample: "Upsample",
})
# rewritten by bounds.vit_rewrite (attention, GELU) or bounded as traced (softmax, LayerNorm)
_TRANSFORMER = (nn.MultiheadAttention, nn.Softmax, nn.LayerNorm, nn.GELU)
_REFUSED_07: Mapping[type, str] = types.MappingProxyType(
    {cls: label for cls, label in _REFUSED_03.items() if cls not in _TRANSFORMER})
VIT_HINT = f"install auto_LiRPA 0.7.x from git (README: auto_LiRPA 0.7.x), which bounds them with CROWN, or {ESTIMATE_HINT}"

# the capabilities that select each table (``probe``)
VIT_CAPABILITIES = frozenset({"gelu", "layernorm", "softmax_lse", "mul_perturbed"})


@dataclass(frozen=True)
class Backend:
    """One installed bound-propagation backend: its capability table and what certkd does to it.

    ``family`` names the capability table (``"0.3"`` or ``"0.7"``), ``tested`` the
    auto_LiRPA versions CI proved it with; ``shims`` the runtime patches applied at import
    (``bounds.lirpa.APPLIED_SHIMS``, name -> applied); ``rewrites`` the view rewrites used.
    """

    family: str
    version: str | None
    capabilities: frozenset[str]
    allow: AllowList
    refused_modules: Mapping[type, str]
    rewrites: tuple[str, ...]
    tested: tuple[str, ...]
    shims: Mapping[str, bool] = field(default_factory=dict)
    location: str | None = None

    @property
    def bounds_vits(self) -> bool:
        """True when ``bounds.vit_rewrite`` is applied and the transformer operators are in the table."""
        return "vit" in self.rewrites

    def allows(self, kind: str, method: str, norm: float) -> bool:
        """True when operator ``kind`` (e.g. ``"BoundSoftmax"``) may be bounded with ``method`` under ``norm``."""
        rule = self.allow.operators.get(kind)
        return rule is not None and method in rule.methods and norm in rule.norms

    def module_hint(self, labels: list[str]) -> str | None:
        """The second half of a module refusal: 0.7.x for transformer modules where it is not installed, else None."""
        transformer = {_REFUSED_03[c] for c in _TRANSFORMER}
        if not VIT_CAPABILITIES <= self.capabilities and any(label in transformer for label in labels):
            return VIT_HINT
        return None

    def baseline(self) -> Backend:
        """This backend restricted to the 0.3 table (for composites proven only there, e.g. local linearity)."""
        allow, refused, rewrites, _ = _table("0.3")
        return replace(self, allow=allow, refused_modules=refused, rewrites=rewrites)


def _table(family: str) -> tuple[AllowList, Mapping[type, str], tuple[str, ...], tuple[str, ...]]:
    if family == "0.7":
        return ALLOW_LISTS["0.7"], _REFUSED_07, ("vit",), ("0.7.1",)
    return ALLOW_LISTS["0.3"], _REFUSED_03, (), ("0.3",)


def probe(lirpa: Any) -> frozenset[str]:
    """The capabilities of an imported auto_LiRPA module (pure function of its attributes).

    - ``gelu``: an operator registered for ``custom::Gelu`` (``bounds.vit_rewrite.ExactGELU``);
    - ``layernorm``: a LayerNorm operator (``BoundLayerNormalization``);
    - ``softmax_lse``: the log-sum-exp softmax relaxation (0.3's softmax hazard is gone there);
    - ``mul_perturbed``: products whose two inputs are both perturbed (``BoundMul`` decides per node).
    """
    ops = getattr(lirpa, "operators", None)
    caps: set[str] = set()
    try:
        op_map = importlib.import_module(f"{lirpa.__name__}.bound_op_map").bound_op_map
    except (ImportError, AttributeError):
        op_map = {}
    if "custom::Gelu" in op_map:
        caps.add("gelu")
    if hasattr(ops, "BoundLayerNormalization"):
        caps.add("layernorm")
    if hasattr(getattr(ops, "BoundSoftmax", None), "_softmax_lse_lower"):
        caps.add("softmax_lse")
    if hasattr(getattr(ops, "BoundMul", None), "update_requires_input_bounds"):
        caps.add("mul_perturbed")
    return frozenset(caps)


def family_of(capabilities: frozenset[str]) -> str:
    """The capability table for a set of capabilities.

    Parameters
    ----------
    capabilities : frozenset of str
        What ``probe`` found.

    Returns
    -------
    str
        ``"0.7"`` when every capability a ViT needs (``VIT_CAPABILITIES``) is there, else the
        conservative ``"0.3"``.

    Examples
    --------
    >>> family_of(VIT_CAPABILITIES), family_of(frozenset({"gelu"}))
    ('0.7', '0.3')
    """
    return "0.7" if VIT_CAPABILITIES <= capabilities else "0.3"


def make_backend(lirpa: Any, version: str | None, shims: Mapping[str, bool] | None = None) -> Backend:
    """The ``Backend`` of an imported auto_LiRPA module (``probe`` -> ``family_of`` -> its table).

    Parameters
    ----------
    lirpa : module
        The imported ``auto_LiRPA`` package.
    version : str or None
        Its version (package metadata), reported, never used to choose the table.
    shims : mapping of str to bool, optional
        The runtime patches ``bounds.lirpa`` applied (name -> applied).

    Returns
    -------
    Backend
    """
    caps = probe(lirpa)
    family = family_of(caps)
    allow, refused, rewrites, tested = _table(family)
    return Backend(family=family, version=version, capabilities=caps, allow=allow, refused_modules=refused,
                   rewrites=rewrites, tested=tested, shims=dict(shims or {}),
                   location=getattr(lirpa, "__file__", None))


_CURRENT: Backend | None = None


def current_backend() -> Backend:
    """The installed backend, built once per process.

    Returns
    -------
    Backend
        ``make_backend`` of the auto_LiRPA ``bounds.lirpa.import_auto_lirpa`` imports (with its shims).

    Raises
    ------
    AutoLirpaMissing
        When auto_LiRPA is not installed or does not import (one sentence).
    """
    global _CURRENT
    if _CURRENT is None:
        from bounds.lirpa import APPLIED_SHIMS, auto_lirpa_version, import_auto_lirpa

        lirpa = import_auto_lirpa()
        _CURRENT = make_backend(lirpa, auto_lirpa_version(), APPLIED_SHIMS)
    return _CURRENT


def _norm_label(norm: float) -> str:
    return "inf" if math.isinf(norm) else f"{norm:g}"


def capability_rows(backend: Backend) -> list[dict[str, Any]]:
    """One row per operator the backend may bound: operator, label, methods, norms, evidence (sorted)."""
    return [{"operator": "Mul (2 perturbed)" if kind == PERTURBED_PRODUCT else kind.removeprefix("Bound"),
             "label": rule.label,
             "methods": [m for m in BOUND_METHODS if m in rule.methods],
             "norms": [_norm_label(p) for p in sorted(rule.norms, reverse=True)],
             "attributes": sorted(rule.attributes),
             "evidence": list(EVIDENCE.get(kind, ()))}
            for kind, rule in sorted(backend.allow.operators.items()) if kind not in _UNBOUNDED]


def describe(backend: Backend | None = None) -> dict[str, Any]:
    """Everything ``certkd doctor`` prints: backend, version, shims applied, rewrites, what it may bound.

    Without auto_LiRPA the dict says so (``"backend": None`` and the reason) instead of raising.
    """
    import torch

    from bounds.errors import AutoLirpaMissing

    if backend is None:
        try:
            backend = current_backend()
        except AutoLirpaMissing as exc:
            return {"backend": None, "reason": str(exc), "torch": torch.__version__}
    untested = backend.version not in backend.tested
    return {
        "backend": "auto_LiRPA", "version": backend.version, "location": backend.location,
        "torch": torch.__version__, "family": backend.family, "tested_with": list(backend.tested),
        "untested_version": untested, "capabilities": sorted(backend.capabilities),
        "shims_applied": sorted(name for name, applied in backend.shims.items() if applied),
        "rewrites": _rewrite_lines(backend),
        "bounds_vits": backend.bounds_vits,
        "vit_install": None if backend.bounds_vits else INSTALL_07,
        "may_bound": capability_rows(backend),
        "refused_modules": sorted(set(backend.refused_modules.values())),
    }


def _rewrite_lines(backend: Backend) -> list[str]:
    lines = ["Normalize and BatchNorm -> dense affine layers (also constant arithmetic on the input)",
             "grouped, dilated, unequally padded convolutions -> ordinary ones; Hardtanh/clamp -> ReLUs"]
    if backend.bounds_vits:
        lines += ["nn.GELU -> custom::Gelu (the same function, auto_LiRPA's GELU relaxation)",
                  "nn.MultiheadAttention -> linear projections, MatMul, softmax (the same function)"]
    return lines
