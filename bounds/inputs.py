"""What a user can pass, checked before any work starts: one sentence per problem.

Every entry point of ``bounds`` that runs a model (``BoundEngine``, ``pgd``,
``lipschitz_bound``) checks the model's output and the inputs here, so that a model
returning a tuple, a dict, a list or one score per example, a model in bfloat16, an
input shape the model does not take, a batch size of 0 or NaN pixels gets one sentence
(a ``BoundsError``) instead of a traceback from deep inside torch or auto_LiRPA.

- ``logits_of``: the output must be one (B, K) floating tensor, K >= 2;
- ``check_model``: runs the model once on two points of [0, 1]^d of ``input_shape``;
- ``float32_model``: a float64 model is bounded as its float32 copy, with a note;
  bfloat16 and float16 models are refused (their own rounding is far larger than any
  float32 certificate allows for);
- ``check_finite``, ``check_batch_size``: NaN or infinite pixels, a batch size below 1.

Example
-------
>>> import torch
>>> from torch import nn
>>> check_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (1, 2, 2)).num_classes
3
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bounds.errors import BoundsError

__all__ = ["ModelCheck", "check_batch_size", "check_finite", "check_input_shape", "check_model", "float32_model", "logits_of",
           "model_dtype"]

_SELECT = ("certkd needs a module whose forward returns the (B, K) logits alone: wrap it, e.g. "
           "nn.Module with forward(x) returning {select}")


@dataclass(frozen=True)
class ModelCheck:
    """What one forward pass on ``input_shape`` showed: the number of classes and the model's dtype."""

    num_classes: int
    dtype: torch.dtype


def _shape(value: object) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _first_logits(out: tuple[object, ...] | list[object]) -> int | None:
    return next((i for i, v in enumerate(out) if torch.is_tensor(v) and v.dim() == 2 and v.is_floating_point()),
                None)


def logits_of(out: object, batch: int, min_classes: int = 2) -> torch.Tensor:
    """``out`` itself when it is one (``batch``, K) floating tensor with K >= ``min_classes``, else one sentence.

    A tuple, list or dict output is named with its parts and the selection to write;
    a (B,) output (one score per example) is told how to give two logits.
    """
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        parts = ", ".join(f"[{i}]: {_shape(v)}" for i, v in enumerate(out[:4]))
        i = _first_logits(out)
        select = f"model(x)[{i if i is not None else 0}]"
        raise BoundsError(f"the model returns a {kind} of {len(out)} ({parts}), not one logits tensor; "
                          + _SELECT.format(select=select))
    if isinstance(out, dict):
        parts = ", ".join(f"{k!r}: {_shape(v)}" for k, v in list(out.items())[:4])
        key = next((k for k, v in out.items() if torch.is_tensor(v) and v.dim() == 2), next(iter(out), "logits"))
        raise BoundsError(f"the model returns a dict ({parts}), not one logits tensor; "
                          + _SELECT.format(select=f"model(x)[{key!r}]"))
    if not torch.is_tensor(out):
        raise BoundsError(f"the model returns a {type(out).__name__}, not a logits tensor of shape (B, K)")
    if out.dim() == 1 and out.shape[0] == batch:
        raise BoundsError(f"the model returns shape ({batch},), one score per example; margins need (B, K) logits "
                          "with K >= 2 classes: for a binary score s return torch.stack([-s, s], dim=1)")
    if out.dim() != 2 or out.shape[0] != batch:
        raise BoundsError(f"the model returns shape {tuple(out.shape)} for a batch of {batch}; certkd needs "
                          "(B, K) logits: flatten or select them inside the model")
    if not out.is_floating_point():
        raise BoundsError(f"the model returns {out.dtype} values; certkd needs floating-point logits")
    if out.shape[1] < min_classes:
        raise BoundsError(f"margins need a model with at least {min_classes} outputs")
    return out


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters and buffers (float32 when it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def check_model(model: nn.Module, input_shape: Sequence[int], device: torch.device | None = None,
                min_classes: int = 2) -> ModelCheck:
    """Run ``model`` once on two points of [0, 1]^d of ``input_shape``; one sentence if that fails.

    Parameters
    ----------
    model : nn.Module
        The classifier (its own dtype is used for the points).
    input_shape : sequence of int
        One example's shape, e.g. (C, H, W).
    device : torch.device, optional
        Where to run it (default: where its parameters are).
    min_classes : int
        The fewest outputs accepted (2 for margins; 1 for a Lipschitz constant of the logits).

    Returns
    -------
    ModelCheck
        ``num_classes`` (K of the (B, K) logits) and the model's dtype.
    """
    shape = check_input_shape(input_shape)
    dtype = model_dtype(model)
    points = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)).to(device or _device(model), dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(points)
    except BoundsError:
        raise
    except Exception as exc:  # the model's own code raises anything on a shape it does not take
        detail = " ".join(str(exc).split())[:160]
        raise BoundsError(f"the model does not run on inputs of shape {shape} ({type(exc).__name__}: {detail}); "
                          "check input_shape (one example's shape, without the batch)") from None
    finally:
        model.train(was_training)
    logits = logits_of(out, 2, min_classes)
    if not bool(torch.isfinite(logits).all()):
        raise BoundsError(f"the model returns NaN or infinite logits on inputs in [0, 1] of shape {shape}")
    return ModelCheck(int(logits.shape[1]), dtype)


def check_input_shape(input_shape: object) -> tuple[int, ...]:
    """One example's shape as a tuple of positive ints, or one sentence."""
    try:
        shape = tuple(int(s) for s in input_shape)  # type: ignore[attr-defined]  # any iterable of sizes
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s < 1 for s in shape) or isinstance(input_shape, (str, bytes)):
        raise BoundsError(f"input_shape must be one example's shape of positive sizes, e.g. (1, 28, 28); "
                          f"got {input_shape!r}")
    return shape


def float32_model(model: nn.Module) -> tuple[nn.Module, str | None]:
    """``model`` itself when it computes in float32; a float64 model's float32 copy and a note; else one sentence.

    bfloat16 and float16 models are refused: their own rounding (about 3 significant
    digits for bfloat16) is far above any allowance of a float32 certificate.
    """
    dtype = model_dtype(model)
    if dtype == torch.float32:
        return model, None
    if dtype == torch.float64:
        was_training = model.training
        copied = copy.deepcopy(model).float()
        model.train(was_training)
        return copied, ("the float64 model is bounded as its float32 copy (model.float()): the certificates hold "
                        "for that copy")
    name = str(dtype).removeprefix("torch.")
    raise BoundsError(f"the model computes in {name}; certkd bounds float32 models (a {name} forward pass rounds far "
                      f"more than any certificate allows for): certify model.float() instead")


def check_finite(x: torch.Tensor, what: str = "inputs") -> None:
    """One sentence when ``x`` holds NaN or infinite values (naming how many examples and the first)."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(len(x), -1))).any(dim=1) if x.dim() > 1 else ~torch.isfinite(x)
        first = int(bad.nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(x).any()) else "infinite"
        raise BoundsError(f"the {what} hold {kind} pixels ({int(bad.sum())} of {len(x)} examples, the first is "
                          f"example {first}); certificates need finite inputs in [0, 1]: clean or drop them")


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int >= 1, else one sentence."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BoundsError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size
