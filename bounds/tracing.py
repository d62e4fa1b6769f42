"""Data-dependent control flow: a model whose Python code reads its input's values is refused (theory.md §2.1).

Bound propagation (auto_LiRPA traces one run of ``forward``) and the Lipschitz walk
(``torch.fx``) see one path through a model's Python code. A branch on the input's values
(``if x.mean() < 0.26: x = 2.5 * x``) or a value turned into a Python number
(``float(x.max())``) makes that path, or that number, hold for the traced inputs only, so a
bound over a ball that reaches the other branch would be of another function. Tracing once
with ``torch.jit.trace`` reports each such conversion as a ``TracerWarning`` at the user's
line; ``check_no_value_dependence`` turns the first into a refusal naming it.

Example
-------
>>> from torch import nn
>>> value_dependent_lines(nn.Linear(3, 2), torch.zeros(1, 3))
[]
"""

from __future__ import annotations

import linecache
import warnings

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from bounds.errors import UnsupportedModelError

__all__ = ["check_no_value_dependence", "value_dependent_lines"]

# what torch.jit.trace says when a tensor's value becomes a Python value
_CONVERSIONS = ("Python boolean", "Python float", "Python integer", "Python number", "Python index")
NO_TRACE_HINT = "use the smoothing or clever methods for this model instead"


def value_dependent_lines(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> list[str]:
    """``file:line: source`` of each place where ``module``'s forward turns its input's values into Python values."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            torch.jit.trace(module, example, check_trace=False, strict=False)  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001 - untraceable code is the bound path's own refusal; nothing to report here
            return []
    lines: list[str] = []
    for w in caught:
        if issubclass(w.category, TracerWarning) and any(c in str(w.message) for c in _CONVERSIONS):
            source = linecache.getline(w.filename, w.lineno).strip()
            where = f"{w.filename}:{w.lineno}" + (f": {source}" if source else "")
            if where not in lines:
                lines.append(where)
    return lines


def check_no_value_dependence(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], what: str) -> None:
    """Raise ``UnsupportedModelError`` naming the first line where ``module`` reads its input's values.

    ``what`` names the method refused (``bound propagation``, ``the Lipschitz bound``).
    """
    lines = value_dependent_lines(module, example)
    if lines:
        raise UnsupportedModelError(
            f"this model's code depends on its input's values ({lines[0]}), so {what} would follow one branch "
            f"and its bound would not cover inputs that take another; {NO_TRACE_HINT}.")
