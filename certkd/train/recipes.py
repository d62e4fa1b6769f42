"""Named training recipes: the settings a paper's authors actually use, resolved in one place.

A recipe fills every setting the user did not give explicitly (flags given on the command line,
keys given to :func:`apply_recipe`, always win). ``certkd info`` shows the resolved values a
checkpoint was trained with; ``certkd train --help`` lists the recipes.

Example
-------
>>> apply_recipe({"recipe": "shao2021", "method": "kdiga", "iga_weight": 0.5})["iga_scale"]
'batch-mean'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from certkd.errors import CertkdError
from certkd.registry import Registry


@dataclass(frozen=True)
class Recipe:
    """A method and the settings it fixes (keys are ``TrainConfig`` / ``ObjectiveParams`` fields)."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    notes: str = ""

    def describe(self) -> str:
        """One line: the method and every setting, for ``--help`` and ``certkd info``."""
        values = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.name} ({self.source}): --method {self.method}, {values}. {self.notes}".strip()


RECIPES: Registry[Recipe] = Registry("training recipe", group="certkd.recipes")
"""Every recipe, by name (installed packages add theirs through the ``certkd.recipes`` entry points)."""

RECIPES.add("shao2021", Recipe(
    name="shao2021", method="kdiga",
    settings={"iga_on": "adversarial", "teacher_mask": True, "iga_scale": "batch-mean", "iga_weight": 1.0,
              "alpha": 0.5, "tau": 1.0, "schedule": "cyclic", "optimizer": "sgd", "lr": 0.2,
              "weight_decay": 5e-4},
    source="Shao et al. 2021, KDIGA, the authors' public code; theory.md §4",
    notes="Every term at the student's fast-AT point (iga_step 1.25 eps), KD and IGA masked to examples the "
          "teacher gets right there, gradients of the batch-mean CE (gamma 1 at B=126 is 0.0079 per sample). "
          "Their F.kl_div averages over the K classes too; certkd's KL is always batchmean (theory.md §4), "
          "so its KL term weighs K times theirs at the same alpha."))


def apply_recipe(values: dict[str, Any], explicit: set[str] | None = None) -> dict[str, Any]:
    """``values`` with the settings of ``values["recipe"]`` filled into every key not in ``explicit``.

    Parameters
    ----------
    values : dict
        Flat settings (``TrainConfig`` and ``ObjectiveParams`` field names); ``recipe`` may be None.
    explicit : set of str, optional
        The keys the user gave; default: every key of ``values`` (what a Python caller passes).

    Returns
    -------
    dict
        The resolved settings; raises ``CertkdError`` when the recipe is for another method.
    """
    name = values.get("recipe")
    if not name:
        return dict(values)
    recipe = RECIPES.get(name)
    method = values.get("method")
    if method is not None and method != recipe.method:
        raise CertkdError(f"--recipe {name} trains --method {recipe.method}, not {method}")
    given = set(values) if explicit is None else explicit
    resolved = dict(values)
    resolved["method"] = recipe.method
    for key, value in recipe.settings.items():
        if key not in given:
            resolved[key] = value
    return resolved


def recipe_summary(config: dict[str, Any]) -> str | None:
    """The recipe a checkpoint's ``config`` was resolved from and the values it trained with (None: no recipe).

    Shows every setting the recipe fixes as resolved (explicit flags included), the step and mask
    that follow from them, and the batch-mean weight converted to the sample scale.

    Example
    -------
    >>> recipe_summary({"recipe": "shao2021", "iga_on": "adversarial", "iga_weight": 1.0})[:29]
    'shao2021: iga_on=adversarial,'
    """
    name = config.get("recipe")
    if not name:
        return None
    recipe = RECIPES.get(name)
    keys = list(recipe.settings) + [k for k in ("iga_step", "eps") if k not in recipe.settings]
    parts = []
    for key in keys:
        if key not in config:
            continue
        value = config[key]
        text = f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        if key == "iga_weight" and "iga_weight_per_sample" in config:
            text += f" (per sample {config['iga_weight_per_sample']:.3g})"
        parts.append(text)
    return f"{name}: " + ", ".join(parts)
