"""Certify methods: how each one judges a batch (theory.md §2), registered in ``METHODS``.

A *method* turns a batch ``(x, y)`` and a list of radii into per-example verdicts
(:class:`MethodOutput`). Each is registered once in ``METHODS`` (a
:class:`certkd.registry.Registry`; installed packages add methods through the
``certkd.certify_methods`` entry-point group) with its kind:

- ``certified``: a proof (bound propagation, global Lipschitz, or randomized
  smoothing, which certifies the *smoothed* classifier, theory.md §2.2);
- ``estimate``: sampled or attack-based (PGD, CLEVER); never called certified.

A new method is one function decorated with :func:`register_method`; its options
are fields of :class:`CertifyOptions` (which study files and ``--param`` read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bounds.certify import BoundEngine
    from bounds.lipschitz import LipschitzBound

from bounds.attack import pgd
from bounds.bound_methods import BOUND_METHOD_TABLE
from bounds.gradients import other_classes
from bounds.norms import norm_name, parse_norm
from certkd.errors import CertkdError
from certkd.registry import Registry

CERTIFIED = "certified"
ESTIMATE = "estimate"
MODEL = "model"
SMOOTHED = "smoothed classifier"
PGD = "pgd"
#: the threat models certify supports (theory.md §1)
NORMS = ("inf", "2")

#: one line per kind, for ``--help`` texts and printed tables
LEGEND = (
    "certified: a proof; an attack can never contradict it (bound propagation, global Lipschitz; "
    "smoothing certifies the smoothed classifier, not the model itself). "
    "estimate: sampled or attack-based (PGD accuracy is an empirical upper bound of robust accuracy; "
    "CLEVER is an estimated radius, not a guarantee)."
)


@dataclass
class CertifyOptions:
    """Options of the certify methods: attacks, CLEVER, smoothing, radius bisection.

    The CLI options, ``--param KEY=VALUE`` and a study's ``params`` all read these
    field names (``-`` for ``_`` on the command line).

    Example
    -------
    >>> CertifyOptions.from_dict({"sigma": 0.5}).sigma
    0.5
    """

    pgd_steps: int = field(default=20, metadata={"help": "PGD steps (0: no PGD accuracy, and radius searches start from eps_max, not an attack)."})
    pgd_restarts: int = field(default=1, metadata={"help": "PGD restarts."})
    clever_batches: int = field(default=50, metadata={"help": "CLEVER: batches of samples."})
    clever_samples: int = field(default=128, metadata={"help": "CLEVER: samples per batch."})
    clever_radius: float | None = field(default=None, metadata={
        "help": "CLEVER: sampling radius R (default 0.5 for inf, 2 for L2).", "type": float})
    sigma: float = field(default=0.25, metadata={"help": "Smoothing: noise level."})
    n0: int = field(default=100, metadata={"help": "Smoothing: selection samples."})
    n: int = field(default=1000, metadata={"help": "Smoothing: estimation samples."})
    alpha: float = field(default=0.001, metadata={"help": "Smoothing: failure probability."})
    smoothing_batch: int = field(default=500, metadata={"help": "Smoothing: noisy samples per forward pass."})
    radius_tol: float = field(default=1e-3, metadata={"help": "Bisection tolerance of --radius."})
    apgd_steps: int = field(default=20, metadata={"help": "APGD: iterations per run (method apgd, compare's "
                                                          "empirical part)."})
    apgd_restarts: int = field(default=1, metadata={"help": "APGD: random restarts per loss and target."})
    apgd_targets: int = field(default=3, metadata={"help": "APGD: target classes of the targeted DLR loss."})

    def check(self) -> None:
        """Raise ``CertkdError`` with one sentence for an impossible value."""
        positive_ints = {"pgd_restarts": self.pgd_restarts, "clever_batches": self.clever_batches,
                         "clever_samples": self.clever_samples, "n0": self.n0, "n": self.n,
                         "smoothing_batch": self.smoothing_batch, "apgd_steps": self.apgd_steps,
                         "apgd_restarts": self.apgd_restarts, "apgd_targets": self.apgd_targets}
        for name, value in positive_ints.items():
            if int(value) < 1:
                raise CertkdError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.clever_batches < 2:
            raise CertkdError(f"clever-batches must be at least 2 (a Weibull fit needs several maxima), "
                              f"got {self.clever_batches}")
        if self.pgd_steps < 0:
            raise CertkdError(f"pgd-steps must be >= 0, got {self.pgd_steps}")
        for name in ("sigma", "radius_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CertkdError(f"{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if self.clever_radius is not None and not (math.isfinite(self.clever_radius) and self.clever_radius > 0):
            raise CertkdError(f"clever-radius must be a finite number > 0, got {self.clever_radius}")
        if not 0 < self.alpha < 1:
            raise CertkdError(f"alpha must lie in (0, 1), got {self.alpha}")

    @classmethod
    def names(cls) -> list[str]:
        """The option names (the keys a study's ``params`` and ``--param`` accept)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CertifyOptions:
        """Options from a mapping of field names; unknown names raise ``CertkdError`` listing the known ones."""
        known = set(cls.names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise CertkdError(f"unknown method parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class MethodOutput:
    """What a method says about a batch of B examples at E radii."""

    robust: torch.Tensor  # (B, E) bool: the method's verdict at each eps (certified or estimated)
    margin_lb: torch.Tensor | None = None  # (B, E): lower bound of min_j m_j over the ball (method's kind)
    margin_ub: torch.Tensor | None = None  # (B, E): attack margin, an upper bound of min_j m_j
    radius: torch.Tensor | None = None  # (B,): the method's radius in the run's norm
    radius_upper: torch.Tensor | None = None  # (B,): attack upper end of the radius (estimate)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) per-example fields


@dataclass
class Context:
    """What the methods share within one run: the model, the norm, parameters, cached bound engines."""

    model: nn.Module
    input_shape: tuple[int, ...]
    norm: str
    params: CertifyOptions
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what the figures hold for, when not the model itself
    _engine: BoundEngine | None = None
    _lipschitz: LipschitzBound | None = None

    def bound_engine(self) -> BoundEngine:
        """The ``bounds.certify.BoundEngine`` of the model, built once and reused."""
        if self._engine is None:
            from bounds.certify import BoundEngine

            self._engine = BoundEngine(self.model, self.input_shape, device=self.device)
        return self._engine

    def lipschitz_bound(self) -> LipschitzBound:
        """The certified global bound of ``bounds.lipschitz`` (computed once; refuses unsupported layers)."""
        if self._lipschitz is None:
            from bounds.lipschitz import lipschitz_bound

            self._lipschitz = lipschitz_bound(self.model, self.input_shape)
        return self._lipschitz

    def clever_radius(self) -> float:
        """CLEVER's sampling radius R: ``--clever-radius`` or a default by norm."""
        if self.params.clever_radius is not None:
            return float(self.params.clever_radius)
        return 2.0 if self.norm == "2" else 0.5


Evaluate = Callable[[Context, torch.Tensor, torch.Tensor, list[float], bool, torch.Generator], MethodOutput]


@dataclass(frozen=True)
class Method:
    """A registered way of judging robustness."""

    name: str
    kind: str  # CERTIFIED or ESTIMATE
    target: str  # MODEL or SMOOTHED
    description: str
    evaluate: Evaluate
    prepare: Callable[[Context], None] = lambda ctx: None  # fail early (unsupported model, missing library)


METHODS: Registry[Method] = Registry("certify method", group="certkd.certify_methods")


def register_method(name: str, kind: str, target: str, description: str,
                    prepare: Callable[[Context], None] | None = None) -> Callable[[Evaluate], Evaluate]:
    """Decorator: register ``fn(ctx, x, y, eps, radius, generator) -> MethodOutput`` as method ``name``.

    Parameters
    ----------
    name : str
        What ``--method`` and study files call it.
    kind : str
        ``CERTIFIED`` (a proof) or ``ESTIMATE``.
    target : str
        ``MODEL`` or ``SMOOTHED`` (what the verdict is about).
    description : str
        One line for ``--help``.
    prepare : callable, optional
        ``prepare(ctx)`` runs once before any batch and fails early (unsupported model).

    Returns
    -------
    callable
        The decorator (it returns ``fn`` unchanged).

    Example
    -------
    >>> @register_method("always-no", ESTIMATE, MODEL, "a test method")
    ... def _no(ctx, x, y, eps, radius, generator):
    ...     return MethodOutput(robust=torch.zeros(len(y), len(eps), dtype=torch.bool))
    >>> get_method("always-no").kind
    'estimate'
    >>> _ = METHODS._entries.pop("always-no")
    """
    def deco(fn: Evaluate) -> Evaluate:
        METHODS.add(name, Method(name, kind, target, description, fn, **({"prepare": prepare} if prepare else {})))
        return fn
    return deco


def certify_methods() -> list[str]:
    """The methods a user may ask for (PGD runs alongside every certification).

    Example
    -------
    >>> "crown" in certify_methods() and "pgd" not in certify_methods()
    True
    """
    return [name for name in METHODS.names() if name != PGD]


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ``CertkdError`` listing the available ones.

    Example
    -------
    >>> m = get_method("smoothing")
    >>> m.kind, m.target
    ('certified', 'smoothed classifier')
    """
    if name not in METHODS:
        raise CertkdError(f"unknown method {name!r}; available: {', '.join(certify_methods())}")
    return METHODS.get(name)


# --------------------------------------------------------------------------- methods

def _stack(columns: Sequence[torch.Tensor], batch: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(list(columns), dim=1) if columns else torch.zeros(batch, 0, dtype=dtype)


def _eps_tensor(eps: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(eps), dtype=like.dtype, device=like.device).view(1, -1)


def _bound_method(method: str) -> tuple[Evaluate, Callable[[Context], None]]:
    """IBP / CROWN-IBP / CROWN / alpha-CROWN through ``bounds.certify`` (theory.md §2.1)."""

    def prepare(ctx: Context) -> None:
        engine = ctx.bound_engine()
        engine.check(method, ctx.norm)

    def evaluate(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
                 generator: torch.Generator) -> MethodOutput:
        engine = ctx.bound_engine()
        robust, lower = [], []
        for e in eps:
            bounds = engine.margin_bounds(x, y, e, ctx.norm, method)
            robust.append(bounds.certified)
            lower.append(bounds.min_lower)
        out = MethodOutput(robust=_stack(robust, len(y), torch.bool), margin_lb=_stack(lower, len(y), x.dtype))
        if radius:
            # --pgd-steps 0: no attack, the bracket's upper end is eps_max
            steps = ctx.params.pgd_steps
            res = engine.certified_radius(x, y, ctx.norm, method, tol=ctx.params.radius_tol, attack_steps=steps,
                                          attack_restarts=ctx.params.pgd_restarts, attack_rounds=3 if steps else 0,
                                          generator=generator)
            out.radius, out.radius_upper = res.radius, res.upper
        return out

    return evaluate, prepare


for _row in BOUND_METHOD_TABLE:  # bounds.bound_methods: one row per method
    _evaluate, _prepare = _bound_method(_row.name)
    register_method(_row.name, _row.kind, MODEL, _row.description, _prepare)(_evaluate)


def _radius_robust(radius: torch.Tensor, eps: list[float]) -> torch.Tensor:
    """Verdict at each eps from a radius: ``radius >= eps``, a certified radius being an eps that was certified
    (theory.md §2.1; the same tie rule as ``bounds.paired.certified_accuracy``)."""
    return radius.view(-1, 1) >= _eps_tensor(eps, radius)


def _prepare_lipschitz(ctx: Context) -> None:
    ctx.lipschitz_bound()


@register_method("lipschitz", CERTIFIED, MODEL,
                 "global Lipschitz bound from layer operator norms: sequential/residual ReLU networks, loose",
                 _prepare_lipschitz)
def _lipschitz(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
               generator: torch.Generator) -> MethodOutput:
    """``m_j(x + delta) >= m_j(x) - L_yj ||delta||_2`` (theory.md §2.2), the bound computed once per run.

    Under L-inf, ``||delta||_2 <= sqrt(d) ||delta||_inf``.
    """
    from bounds.lipschitz import lipschitz_radius

    bound = ctx.lipschitz_bound()
    res = lipschitz_radius(ctx.model, x, y, ctx.norm, bound=bound)
    with torch.no_grad():
        logits = ctx.model(x).double()
    others = other_classes(y, logits.shape[1])
    margin = logits.gather(1, y.view(-1, 1)) - logits.gather(1, others)  # (B, K-1)
    scale = math.sqrt(math.prod(ctx.input_shape)) if ctx.norm == "inf" else 1.0
    slope = bound.margin.to(logits.device)[y.view(-1, 1), others] * scale  # (B, K-1)
    eps_t = _eps_tensor(eps, logits).unsqueeze(-1)  # (1, E, 1)
    margin_lb = (margin.unsqueeze(1) - eps_t * slope.unsqueeze(1)).amin(dim=2).to(x.dtype)
    out = MethodOutput(robust=_radius_robust(res.radius, eps), margin_lb=margin_lb)
    if radius:
        out.radius = res.radius
    return out


@register_method("clever", ESTIMATE, MODEL,
                 "CLEVER (Weng et al. 2018): sampled gradient norms + reverse-Weibull fit; an estimate")
def _clever(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
            generator: torch.Generator) -> MethodOutput:
    """Estimated radius ``min(min_j m_j / L_j, R)`` and margin ``min_j m_j - eps L_j`` (theory.md §2.2)."""
    from bounds.clever import clever

    res = clever(ctx.model, x, y, ctx.norm, radius=ctx.clever_radius(), n_batches=ctx.params.clever_batches,
                 batch_size=ctx.params.clever_samples, generator=generator)
    eps_t = _eps_tensor(eps, res.margin).unsqueeze(-1)  # (1, E, 1)
    margin_lb = (res.margin.unsqueeze(1) - eps_t * res.lipschitz.unsqueeze(1)).amin(dim=2)  # (B, E)
    out = MethodOutput(robust=_radius_robust(res.score, eps), margin_lb=margin_lb,
                       extra={"clever_fallback": res.fallback.any(dim=1)})
    if radius:
        out.radius = res.score
    return out


def _smoothing_radius_in_norm(radius_l2: torch.Tensor, norm: str, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The L2 certificate as a radius in the run's norm: ``||delta||_2 <= sqrt(d) ||delta||_inf``."""
    if norm == "2":
        return radius_l2
    return radius_l2 / math.sqrt(math.prod(input_shape))


@register_method("smoothing", CERTIFIED, SMOOTHED,
                 "randomized smoothing (Cohen et al. 2019): certifies the smoothed classifier g, not the model")
def _smoothing(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
               generator: torch.Generator) -> MethodOutput:
    """CERTIFY of Cohen et al.: L2 radius ``sigma Phi^-1(pA_lower)`` or abstain (theory.md §2.2)."""
    from bounds.smoothing import smoothing_certify

    p = ctx.params
    res = smoothing_certify(ctx.model, x, sigma=p.sigma, n0=p.n0, n=p.n, alpha=p.alpha,
                            batch_size=p.smoothing_batch, generator=generator)
    correct = res.prediction == y
    r = torch.where(correct, _smoothing_radius_in_norm(res.radius, ctx.norm, ctx.input_shape),
                    torch.zeros_like(res.radius))
    # eps = 0: the smoothed classifier predicts y (``& correct``: an abstention has radius 0)
    out = MethodOutput(robust=_radius_robust(r, eps) & correct.view(-1, 1),
                       extra={"smoothed_pred": res.prediction, "p_lower": res.p_lower})
    if radius:
        out.radius = r
    return out


@register_method(PGD, ESTIMATE, MODEL, "PGD attack: robust accuracy estimate, an empirical upper bound")
def _pgd(ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: list[float], radius: bool,
         generator: torch.Generator) -> MethodOutput:
    """``bounds.attack.pgd`` on the margin at every eps; robust while the smallest margin found stays > 0."""
    margin = []
    for e in eps:
        res = pgd(ctx.model, x, y, e, ctx.norm, steps=ctx.params.pgd_steps, restarts=ctx.params.pgd_restarts,
                  generator=generator)
        margin.append(res.margin)
    ub = _stack(margin, len(y), x.dtype)
    return MethodOutput(robust=ub > 0, margin_ub=ub)




# --------------------------------------------------------------------------- preparing and evaluating

def check_norm(norm: str | float) -> str:
    """``"inf"`` or ``"2"`` (the norms certify supports), else one sentence.

    Example
    -------
    >>> check_norm(2.0)
    '2'
    """
    name = norm_name(parse_norm(norm))
    if name not in NORMS:
        raise CertkdError(f"norm {norm!r} is not supported by certify: use inf or 2")
    return name


def prepare_methods(model: nn.Module, input_shape: Sequence[int], methods: Sequence[str], norm: str | float,
                    params: CertifyOptions, device: str | torch.device = "cpu") -> Context:
    """Build what ``methods`` need (bound engine, Lipschitz bound) once, failing early with one sentence.

    Parameters
    ----------
    model : nn.Module
        The classifier (put in eval mode).
    input_shape : sequence of int
        One input's shape, e.g. ``(1, 8, 8)``.
    methods : sequence of str
        Registered method names.
    norm : str or float
        ``inf`` or ``2``.
    params : CertifyOptions
        The methods' options.
    device : str or torch.device
        Where the model runs.

    Returns
    -------
    Context
        Shared by every batch of the run: each engine is built once per run.

    A model a bound method cannot handle (e.g. a ViT under auto_LiRPA 0.3) raises
    ``UnsupportedModelError``; a missing auto_LiRPA raises ``AutoLirpaMissing``.

    Example
    -------
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> prepare_methods(net, (1, 2, 2), ["lipschitz"], "2", CertifyOptions()).norm
    '2'
    """
    from bounds.inputs import check_model, float32_model

    params.check()
    model, note = float32_model(model)  # bfloat16 refused; float64 run as its float32 copy, with a note
    shape = tuple(int(s) for s in input_shape)
    check_model(model, shape, torch.device(device))  # output, shape: one sentence before any method starts
    ctx = Context(model=model.eval(), input_shape=shape, norm=check_norm(norm), params=params,
                  device=torch.device(device), notes=[note] if note else [])
    for name in methods:
        get_method(name).prepare(ctx)
    return ctx


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def evaluate_batch(ctx: Context, method: Method, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                   radius: bool, generator: torch.Generator) -> tuple[torch.Tensor, MethodOutput]:
    """Clean predictions and ``method``'s output for one batch, on the CPU.

    Parameters
    ----------
    ctx : Context
        From :func:`prepare_methods`.
    method : Method
        The registered method.
    x, y : torch.Tensor
        The batch, shape (B, ...) and (B,).
    eps : sequence of float
        Radii of the verdicts.
    radius : bool
        Also compute per-example radii.
    generator : torch.Generator
        The batch's random stream (``certkd.runs.seed_stream``).

    Returns
    -------
    (torch.Tensor, MethodOutput)
        Predictions (B,) and the method's output. For methods about the model itself,
        a wrong clean prediction is never robust and has radius 0.
    """
    x, y = x.to(ctx.device), y.to(ctx.device)
    with torch.no_grad():
        logits = ctx.model(x)
    num_classes = logits.shape[1]
    if len(y) and (int(y.max()) >= num_classes or int(y.min()) < 0):
        raise CertkdError(f"labels up to {int(y.max())} but the model has {num_classes} classes")
    pred = logits.argmax(dim=1)
    out = method.evaluate(ctx, x, y, list(eps), radius, generator)
    if method.target == MODEL:
        correct = pred == y
        out.robust = out.robust & correct.view(-1, 1)
        if out.radius is not None:
            out.radius = torch.where(correct, out.radius, torch.zeros_like(out.radius))
    robust = _cpu(out.robust)
    assert robust is not None
    return pred.cpu(), MethodOutput(robust=robust, margin_lb=_cpu(out.margin_lb), margin_ub=_cpu(out.margin_ub),
                                    radius=_cpu(out.radius), radius_upper=_cpu(out.radius_upper),
                                    extra={k: v.detach().cpu() for k, v in out.extra.items()})
