"""Per-example certification records for every method, and their summary (theory.md §2).

A *method* turns a batch ``(x, y)`` and a list of radii into per-example verdicts.
Each method is registered once in ``METHODS`` with its kind:

- ``certified``: a proof (bound propagation, global Lipschitz, or randomized
  smoothing, which certifies the *smoothed* classifier, theory.md §2.2);
- ``estimate``: sampled or attack-based (PGD, CLEVER); never called certified.

One generic loop (``run_certification``) runs the methods over batches and
emits one JSON record per ``(index, method, eps)``; ``summarize`` turns records
into accuracies and radius statistics, so a single run, a resumed run and merged
shards give the same summary from the same records.
"""

from __future__ import annotations

import hashlib
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bounds.attack import pgd
from bounds.gradients import other_classes
from bounds.norms import check_eps, norm_name, parse_norm
from certkd.errors import CertkdError
from certkd.io import read_jsonl

CERTIFIED = "certified"
ESTIMATE = "estimate"
MODEL = "model"
SMOOTHED = "smoothed classifier"
PGD = "pgd"

#: one line per kind, for ``--help`` texts and printed tables
LEGEND = (
    "certified: a proof; an attack can never contradict it (bound propagation, global Lipschitz; "
    "smoothing certifies the smoothed classifier, not the model itself). "
    "estimate: sampled or attack-based (PGD accuracy is an empirical upper bound of robust accuracy; "
    "CLEVER is an estimated radius, not a guarantee)."
)


@dataclass
class MethodParams:
    """Parameters of the estimate, smoothing and attack methods (CLI options of the same names)."""

    pgd_steps: int = 20
    pgd_restarts: int = 1
    clever_batches: int = 50
    clever_samples: int = 128
    clever_radius: float | None = None  # None: a default by norm (``Context.clever_radius``)
    sigma: float = 0.25
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    smoothing_batch: int = 500
    radius_tol: float = 1e-3

    def check(self) -> None:
        """Raise ``CertkdError`` with one sentence for an impossible value."""
        positive_ints = {"pgd_restarts": self.pgd_restarts, "clever_batches": self.clever_batches,
                         "clever_samples": self.clever_samples, "n0": self.n0, "n": self.n,
                         "smoothing_batch": self.smoothing_batch}
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
    def from_dict(cls, values: dict[str, Any]) -> MethodParams:
        known = set(cls.__dataclass_fields__)
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
    params: MethodParams
    device: torch.device
    _engine: Any = None
    _lipschitz: Any = None

    def bound_engine(self) -> Any:
        """The ``bounds.certify.BoundEngine`` of the model, built once and reused."""
        if self._engine is None:
            from bounds.certify import BoundEngine

            self._engine = BoundEngine(self.model, self.input_shape, device=self.device)
        return self._engine

    def lipschitz_bound(self) -> Any:
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


METHODS: dict[str, Method] = {}


def register_method(name: str, kind: str, target: str, description: str,
                    prepare: Callable[[Context], None] | None = None) -> Callable[[Evaluate], Evaluate]:
    def deco(fn: Evaluate) -> Evaluate:
        METHODS[name] = Method(name, kind, target, description, fn, prepare or (lambda ctx: None))
        return fn
    return deco


def certify_methods() -> list[str]:
    """The methods a user may ask for (PGD runs alongside every certification)."""
    return [name for name in METHODS if name != PGD]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CertkdError(f"unknown method {name!r}; available: {', '.join(certify_methods())}")
    return METHODS[name]


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
            res = engine.certified_radius(x, y, ctx.norm, method, tol=ctx.params.radius_tol,
                                          attack_steps=ctx.params.pgd_steps or 20,
                                          attack_restarts=ctx.params.pgd_restarts, generator=generator)
            out.radius, out.radius_upper = res.radius, res.upper
        return out

    return evaluate, prepare


for _name, _description in (
    ("ibp", "interval bound propagation (Gowal et al. 2018): fast, loose"),
    ("crown-ibp", "CROWN-IBP (Zhang et al. 2020)"),
    ("crown", "CROWN linear relaxation (Zhang et al. 2018): the default"),
    ("alpha-crown", "alpha-CROWN, optimized relaxation (Xu et al. 2021): tightest, ~400x slower on CPU"),
):
    _evaluate, _prepare = _bound_method(_name)
    register_method(_name, CERTIFIED, MODEL, _description, _prepare)(_evaluate)


def _radius_robust(radius: torch.Tensor, eps: list[float]) -> torch.Tensor:
    """Verdict at each eps from a radius: the ball of radius eps lies strictly inside (theory.md §2)."""
    return radius.view(-1, 1) > _eps_tensor(eps, radius)


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
    # eps = 0: the smoothed classifier predicts y (its certificate has radius > 0 exactly then)
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


# --------------------------------------------------------------------------- runs

@dataclass
class CertifyJob:
    """Everything that decides the records of a run (and must match to resume or merge)."""

    methods: list[str]
    eps: list[float]
    norm: str = "inf"
    radius: bool = False
    batch_size: int = 32
    seed: int = 0
    params: MethodParams = field(default_factory=MethodParams)
    shard: tuple[int, int] | None = None

    def check(self) -> None:
        """One sentence (``CertkdError``/``BoundsError``) for any bad value."""
        for name in self.methods:
            get_method(name)
        if not self.methods:
            raise CertkdError("no method given")
        self.norm = check_norm(self.norm)
        for e in self.eps:
            check_eps(e)
        if not self.eps:
            raise CertkdError("give at least one eps")
        if self.batch_size < 1:
            raise CertkdError(f"batch size must be at least 1, got {self.batch_size}")
        self.params.check()

    def all_methods(self) -> list[str]:
        """The requested methods, with PGD first when it is switched on."""
        return ([PGD] if self.params.pgd_steps > 0 else []) + [m for m in self.methods if m != PGD]

    def to_config(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard"] = list(self.shard) if self.shard else None
        return d

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CertifyJob:
        params = MethodParams.from_dict(config.get("params", {}))
        shard = tuple(config["shard"]) if config.get("shard") else None
        return cls(methods=list(config["methods"]), eps=[float(e) for e in config["eps"]], norm=config["norm"],
                   radius=bool(config["radius"]), batch_size=int(config["batch_size"]), seed=int(config["seed"]),
                   params=params, shard=shard)


def shard_batches(indices: Sequence[int], batch_size: int,
                  shard: tuple[int, int] | None = None) -> list[tuple[int, list[int]]]:
    """``(batch_number, indices)`` of the batches this shard owns: batch b goes to shard ``b mod n``.

    Batches are cut from the whole index list first, so a shard's batches are exactly those of a
    single run and per-batch random streams coincide (shard + merge = one run).
    """
    batches = [(b, list(indices[i:i + batch_size])) for b, i in enumerate(range(0, len(indices), batch_size))]
    if shard is None:
        return batches
    k, n = shard
    return [(b, idx) for b, idx in batches if b % n == k]


def batch_generator(seed: int, batch_number: int, method: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A random stream fixed by (seed, batch, method): independent of shards, resumes and other methods."""
    key = hashlib.sha256(f"{seed}:{batch_number}:{method}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return g


RecordKey = tuple[int, str, float]


def record_key(record: dict[str, Any]) -> RecordKey:
    return int(record["index"]), str(record["method"]), float(record["eps"])


def check_norm(norm: str | float) -> str:
    """``"inf"`` or ``"2"`` (the norms certify supports), else one sentence."""
    name = norm_name(parse_norm(norm))
    if name not in ("inf", "2"):
        raise CertkdError(f"norm {norm!r} is not supported by certify: use inf or 2")
    return name


def prepare_methods(model: nn.Module, input_shape: Sequence[int], methods: Sequence[str], norm: str | float,
                    params: MethodParams, device: str | torch.device = "cpu") -> Context:
    """Build what ``methods`` need (bound engine, Lipschitz bound), failing early with one sentence.

    A model a bound method cannot handle (e.g. a ViT under auto_LiRPA 0.3) raises
    ``UnsupportedModelError``; a missing auto_LiRPA raises ``AutoLirpaMissing``.
    """
    params.check()
    ctx = Context(model=model.eval(), input_shape=tuple(int(s) for s in input_shape), norm=check_norm(norm),
                  params=params, device=torch.device(device))
    for name in methods:
        get_method(name).prepare(ctx)
    return ctx


def _records(method: Method, norm: str, idx: list[int], y: torch.Tensor, pred: torch.Tensor, eps: list[float],
             out: MethodOutput, with_radius: bool) -> Iterable[dict[str, Any]]:
    def value(t: torch.Tensor | None, i: int, j: int | None = None) -> Any:
        if t is None:
            return None
        v = t[i] if j is None else t[i, j]
        return bool(v) if v.dtype == torch.bool else (int(v) if not v.is_floating_point() else float(v))

    for i, index in enumerate(idx):
        base = {"index": int(index), "label": int(y[i]), "pred": int(pred[i]), "method": method.name,
                "kind": method.kind, "target": method.target, "norm": norm}
        for j, e in enumerate(eps):
            robust = value(out.robust, i, j)
            rec = dict(base, eps=float(e), robust=robust, certified=bool(robust and method.kind == CERTIFIED),
                       margin_lb=value(out.margin_lb, i, j), margin_ub=value(out.margin_ub, i, j))
            if with_radius:
                rec.update(radius=value(out.radius, i), radius_upper=value(out.radius_upper, i))
            rec.update({k: value(v, i) for k, v in out.extra.items()})
            yield rec


def evaluate_batch(ctx: Context, method: Method, x: torch.Tensor, y: torch.Tensor, eps: list[float],
                   radius: bool, generator: torch.Generator) -> tuple[torch.Tensor, MethodOutput]:
    """Clean predictions and ``method``'s output for one batch, on the CPU.

    For methods about the model itself, a wrong clean prediction is never robust and has radius 0.
    """
    x, y = x.to(ctx.device), y.to(ctx.device)
    with torch.no_grad():
        pred = ctx.model(x).argmax(dim=1)
    out = method.evaluate(ctx, x, y, list(eps), radius, generator)
    if method.target == MODEL:
        correct = pred == y
        out.robust = out.robust & correct.view(-1, 1)
        if out.radius is not None:
            out.radius = torch.where(correct, out.radius, torch.zeros_like(out.radius))

    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu()

    return pred.cpu(), MethodOutput(robust=cpu(out.robust), margin_lb=cpu(out.margin_lb),
                                    margin_ub=cpu(out.margin_ub), radius=cpu(out.radius),
                                    radius_upper=cpu(out.radius_upper),
                                    extra={k: cpu(v) for k, v in out.extra.items()})


def run_certification(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int],
                      job: CertifyJob, done: Iterable[RecordKey] = (),
                      sink: Callable[[list[dict[str, Any]]], None] | None = None,
                      device: str | torch.device = "cpu", progress: bool = False,
                      context: Context | None = None) -> list[dict[str, Any]]:
    """Certify ``x[indices]`` with every method of ``job``; return the new records.

    ``x``, ``y``: the whole split (records carry the split's ``index``). Only this
    shard's batches run; records whose ``(index, method, eps)`` is in ``done`` are
    not produced again (a batch with a missing record is recomputed whole, with its
    own random stream, so a resumed run equals an uninterrupted one). ``sink``
    receives each (batch, method)'s new records as soon as they exist.
    """
    from tqdm.auto import tqdm

    job.check()
    ctx = context or prepare_methods(model, x.shape[1:], job.all_methods(), job.norm, job.params, device)
    done_keys = set(done)
    methods = [get_method(m) for m in job.all_methods()]
    work = [(b, idx, m) for b, idx in shard_batches(list(indices), job.batch_size, job.shard) for m in methods
            if any((i, m.name, float(e)) not in done_keys for i in idx for e in job.eps)]
    new: list[dict[str, Any]] = []
    with tqdm(total=len(work), desc="certify", unit="batch", disable=not progress, leave=False) as bar:
        for b, idx, method in work:
            bar.set_postfix_str(f"{method.name}, batch {b}")
            pred, out = evaluate_batch(ctx, method, x[idx], y[idx], list(job.eps), job.radius,
                                       batch_generator(job.seed, b, method.name, ctx.device))
            rows = [r for r in _records(method, job.norm, idx, y[idx], pred, list(job.eps), out, job.radius)
                    if record_key(r) not in done_keys]
            done_keys.update(record_key(r) for r in rows)
            new.extend(rows)
            if sink is not None:
                sink(rows)
            bar.update(1)
    return new


def per_example_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "crown",
                      norm: str = "inf", seed: int = 0, device: str | torch.device = "cpu",
                      **params: Any) -> torch.Tensor:
    """Per-example radius of ``method`` (certified or estimate, by the method's kind), shape (B,).

    Bound methods: the bisected certified radius (theory.md §2.1); lipschitz:
    ``margin / L``; clever: the CLEVER score; smoothing: the smoothed classifier's
    radius in ``norm`` (0 where it abstains or is wrong) (theory.md §2.2).
    Misclassified points get 0. ``params``: fields of ``MethodParams``. One batch,
    one random stream fixed by ``seed``.
    """
    if method == PGD:
        raise CertkdError("pgd gives no radius: use crown, lipschitz, clever or smoothing")
    ctx = prepare_methods(model, x.shape[1:], [method], norm, MethodParams.from_dict(params), device)
    _, out = evaluate_batch(ctx, get_method(method), x, y, [], True, batch_generator(seed, 0, method, ctx.device))
    return out.radius


def certify_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: Sequence[str],
                  eps: Sequence[float], norm: str = "inf", radius: bool = False, batch_size: int = 32,
                  seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                  **params: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """In-memory certification of all of ``(x, y)`` (notebooks, studies): ``(summary, records)``.

    The same records and summary as ``certkd certify`` on those points; ``params``
    are fields of ``MethodParams`` (``pgd_steps``, ``sigma``, ...).
    """
    job = CertifyJob(methods=list(methods), eps=[float(e) for e in eps], norm=norm, radius=radius,
                     batch_size=batch_size, seed=seed, params=MethodParams.from_dict(params))
    records = run_certification(model, x, y, range(len(y)), job, device=device, progress=progress)
    config = {"num_examples": len(y), **job.to_config()}
    return summarize(config, records), canonical_order(records, job)


# --------------------------------------------------------------------------- summaries

def expected_keys(indices: Sequence[int], job: CertifyJob) -> set[RecordKey]:
    """Every ``(index, method, eps)`` this job's shard must produce."""
    mine = [i for _, idx in shard_batches(list(indices), job.batch_size, job.shard) for i in idx]
    return {(int(i), m, float(e)) for i in mine for m in job.all_methods() for e in job.eps}


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"mean": float(t.mean()), "median": float(q[1]), "q1": float(q[0]), "q3": float(q[2]),
            "min": float(t.min()), "max": float(t.max())}


def canonical_order(records: Iterable[dict[str, Any]], job: CertifyJob) -> list[dict[str, Any]]:
    """Records sorted by (index, method as in the job, eps as in the job); duplicates keep the first."""
    method_rank = {m: r for r, m in enumerate(job.all_methods())}
    eps_rank = {float(e): r for r, e in enumerate(job.eps)}
    unique: dict[RecordKey, dict[str, Any]] = {}
    for rec in records:
        unique.setdefault(record_key(rec), rec)
    return sorted(unique.values(), key=lambda r: (int(r["index"]), method_rank.get(r["method"], 99),
                                                  eps_rank.get(float(r["eps"]), 99)))


def summarize(config: dict[str, Any], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies per (method, eps), radius statistics and a soundness cross-check, from records.

    Every figure carries its ``kind``. ``soundness`` counts certified-for-the-model
    records that the run's own PGD broke at the same eps: it must be 0.
    """
    job = CertifyJob.from_config(config)
    recs = canonical_order(records, job)
    labels: dict[int, tuple[int, int]] = {}
    for r in recs:
        labels.setdefault(int(r["index"]), (int(r["label"]), int(r["pred"])))
    n = len(labels)
    clean = sum(label == pred for label, pred in labels.values()) / n if n else None
    by_cell: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in recs:
        by_cell.setdefault((r["method"], float(r["eps"])), []).append(r)
    results = []
    for m in job.all_methods():
        method = get_method(m)
        for e in job.eps:
            cell = by_cell.get((m, float(e)), [])
            robust = sum(bool(r["robust"]) for r in cell)
            results.append({"method": m, "kind": method.kind, "target": method.target, "eps": float(e),
                            "robust": robust, "n": len(cell),
                            "accuracy": robust / len(cell) if cell else None})
    radii = []
    if job.radius:
        for m in (m for m in job.methods if m != PGD):
            method = get_method(m)
            first = {}
            for r in recs:
                if r["method"] == m:
                    first.setdefault(int(r["index"]), r)
            values = [float(r["radius"]) for r in first.values() if r.get("radius") is not None]
            uppers = [float(r["radius_upper"]) for r in first.values() if r.get("radius_upper") is not None]
            entry = {"method": m, "kind": method.kind, "target": method.target, "norm": job.norm,
                     "n": len(values), **(_quantiles(values) if values else {})}
            if uppers:
                entry["upper"] = {"kind": ESTIMATE, "n": len(uppers), **_quantiles(uppers)}
            radii.append(entry)
    attack = {(int(r["index"]), float(r["eps"])): r for r in recs if r["method"] == PGD}
    checked = broken = 0
    for r in recs:
        if r["certified"] and r["target"] == MODEL and (int(r["index"]), float(r["eps"])) in attack:
            checked += 1
            broken += not attack[(int(r["index"]), float(r["eps"]))]["robust"]
    return {
        "config": config,
        "num_examples": n,
        "clean_accuracy": {"accuracy": clean, "kind": CERTIFIED,
                           "note": "exact on the evaluated points (certified accuracy at eps = 0)"},
        "results": results,
        "radius": radii,
        "soundness": {"certified_checked_by_pgd": checked, "contradictions": broken, "kind": ESTIMATE},
        "legend": LEGEND,
    }


HEADER_KEY = "certkd_per_example"
#: config keys that may differ between shards of one run (where they ran, which part)
RUN_LOCAL_KEYS = ("shard",)


def header_record(config: dict[str, Any]) -> dict[str, Any]:
    """The first line of a per-example JSONL file: the configuration every record belongs to."""
    return {HEADER_KEY: 1, "config": config}


def read_per_example(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``(config, records)`` of a per-example JSONL file (a torn last line is ignored).

    ``(None, [])`` for a missing or empty file; ``CertkdError`` when it is not one of ours.
    """
    rows = read_jsonl(path)
    if not rows:
        return None, []
    head = rows[0]
    if not isinstance(head, dict) or head.get(HEADER_KEY) != 1 or not isinstance(head.get("config"), dict):
        raise CertkdError(f"{path}: not a certkd per-example file (its first line has no certify configuration)")
    return head["config"], rows[1:]


def config_differences(a: dict[str, Any], b: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Names of the top-level configuration entries that differ (``params`` entries by their own names)."""
    keys = sorted((set(a) | set(b)) - set(ignore))
    diff = [k for k in keys if k != "params" and a.get(k) != b.get(k)]
    pa, pb = a.get("params", {}), b.get("params", {})
    diff += [k for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    return diff


def merge_shards(parts: Sequence[tuple[str, dict[str, Any] | None, list[dict[str, Any]]]]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Combine the per-example files ``(name, config, records)`` of the shards of one run.

    Checks: same configuration (up to the shard), every shard ``k/n`` exactly once,
    disjoint indices, and each shard complete. Returns the configuration of the
    whole run (``shard`` None) and the records in canonical order, so the summary
    equals that of a single run.
    """
    if not parts:
        raise CertkdError("nothing to merge: give the per-example files of the shards")
    for name, config, _ in parts:
        if config is None:
            raise CertkdError(f"{name}: empty per-example file (no configuration line)")
    first_name, first, _ = parts[0]
    for name, config, _ in parts[1:]:
        diff = config_differences(first, config, RUN_LOCAL_KEYS)
        if diff:
            raise CertkdError(f"{name} and {first_name} come from different runs (they differ in "
                              f"{', '.join(diff)})")
    shards = [tuple(c["shard"]) if c.get("shard") else None for _, c, _ in parts]
    if None in shards and len(parts) > 1:
        raise CertkdError("an unsharded run cannot be merged with other files")
    if shards[0] is not None:
        total = shards[0][1]
        if len({s[1] for s in shards}) != 1:
            raise CertkdError("the files come from splits into different numbers of shards")
        seen: dict[int, str] = {}
        for (name, _, _), (k, _) in zip(parts, shards, strict=True):
            if k in seen:
                raise CertkdError(f"{name} and {seen[k]} are both shard {k}/{total}")
            seen[k] = name
        missing = [f"{k}/{total}" for k in range(total) if k not in seen]
        if missing:
            raise CertkdError(f"missing shard(s) {', '.join(missing)}")
    owner: dict[int, str] = {}
    merged: list[dict[str, Any]] = []
    indices = range(int(first["num_examples"]))
    for name, config, records in parts:
        job = CertifyJob.from_config(config)
        for i in {int(r["index"]) for r in records}:
            if owner.setdefault(i, name) != name:
                raise CertkdError(f"{name} and {owner[i]} both hold example {i}: the shards overlap")
        missing_keys = expected_keys(indices, job) - {record_key(r) for r in records}
        if missing_keys:
            raise CertkdError(f"{name} is incomplete ({len(missing_keys)} records missing): finish it with "
                              f"certkd certify ... --resume")
        merged.extend(records)
    config = dict(first, shard=None)
    return config, canonical_order(merged, CertifyJob.from_config(config))


def eps_label(eps: float) -> str:
    """``%g`` when that is exact (0.1), else ``k/255`` for multiples of 1/255 (2/255), else ``%g``."""
    short = f"{eps:.6g}"
    k = eps * 255
    if float(short) != eps and eps > 0 and abs(k - round(k)) < 1e-9 * max(1.0, k):
        return f"{round(k)}/255"
    return short


def _kind_label(kind: str, target: str) -> str:
    return kind if target == MODEL else f"{kind} ({target})"


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The plain-text table ``certkd certify`` prints; every figure with its kind."""
    cfg = summary["config"]
    job = CertifyJob.from_config(cfg)
    ball = "L-inf" if job.norm == "inf" else "L2"
    shard = f", shard {cfg['shard'][0]}/{cfg['shard'][1]}" if cfg.get("shard") else ""
    lines = [f"{cfg.get('model', 'model')} on {cfg.get('dataset', '?')} ({cfg.get('split', '?')}), "
             f"{summary['num_examples']} examples{shard}, {ball} ball within [0, 1]"]
    head = f"{'':<24}{'kind':<40}" + "".join(f"{'eps=' + eps_label(e):>12}" for e in job.eps)
    lines += ["", head]
    clean = summary["clean_accuracy"]
    lines.append(f"{'clean accuracy':<24}{'certified (exact, eps = 0)':<40}{_cell(clean['accuracy'], 12, 3)}")
    for m in job.all_methods():
        cells = {r["eps"]: r for r in summary["results"] if r["method"] == m}
        method = get_method(m)
        if m == PGD:
            name = f"pgd-{job.params.pgd_steps} accuracy"
            kind = "estimate: empirical upper bound"
        else:
            name, kind = f"{m} accuracy", _kind_label(method.kind, method.target)
        values = "".join(_cell(cells.get(float(e), {}).get("accuracy"), 12, 3) for e in job.eps)
        lines.append(f"{name:<24}{kind:<40}{values}")
    if summary["radius"]:
        lines += ["", f"{'radius (' + ball + ')':<24}{'kind':<40}" + "".join(
            f"{c:>10}" for c in ("mean", "median", "q1", "q3"))]
        for r in summary["radius"]:
            rows = [(r["method"], _kind_label(r["kind"], r["target"]), r)]
            if "upper" in r:
                rows.append((f"{r['method']} upper end", "estimate: attack", r["upper"]))
            for name, kind, stats in rows:
                values = "".join(_cell(stats.get(c), 10, 4) for c in ("mean", "median", "q1", "q3"))
                lines.append(f"{name:<24}{kind:<40}{values}")
    check = summary["soundness"]
    if check["certified_checked_by_pgd"]:
        lines += ["", f"soundness check: {check['contradictions']} of {check['certified_checked_by_pgd']} "
                      "certified (point, eps) pairs broken by this run's PGD (must be 0)"]
    lines += ["", textwrap.fill("legend: " + LEGEND, width=100, subsequent_indent="  ")]
    return "\n".join(lines)


def check_fits(model_input_shape: Sequence[int], num_classes: int, x: torch.Tensor, y: torch.Tensor,
               data_name: str = "data") -> None:
    """Raise ``CertkdError`` when the data cannot be fed to the model (shape or labels)."""
    if tuple(x.shape[1:]) != tuple(model_input_shape):
        raise CertkdError(f"{data_name} has inputs of shape {tuple(x.shape[1:])} but the model takes "
                          f"{tuple(model_input_shape)}")
    if len(y) and (int(y.max()) >= num_classes or int(y.min()) < 0):
        raise CertkdError(f"{data_name} has labels up to {int(y.max())} but the model has {num_classes} classes")


__all__ = ["CERTIFIED", "ESTIMATE", "LEGEND", "METHODS", "Method", "MethodOutput", "MethodParams", "CertifyJob",
           "Context", "register_method", "certify_methods", "get_method", "prepare_methods", "run_certification",
           "per_example_radii", "certify_model", "check_norm", "summarize", "shard_batches", "batch_generator", "expected_keys", "record_key",
           "evaluate_batch", "canonical_order", "check_fits",
           "header_record", "read_per_example", "merge_shards", "config_differences", "format_summary",
           "eps_label"]
