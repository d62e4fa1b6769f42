"""Named training recipes: the settings a paper's authors actually use, resolved in one place.

A recipe fills every setting the user did not give explicitly (flags given on the command line,
keys given to :func:`apply_recipe`, always win). A recipe may change some of its authors' values
for students without a normalization layer (``norm_free``, each with its reason): the authors'
settings are tuned for BatchNorm networks. ``certkd info`` shows the resolved values a checkpoint
was trained with and every value that differs from the authors', with the reason;
``certkd train --help`` lists the recipes.

Example
-------
>>> apply_recipe({"recipe": "shao2021", "method": "kdiga", "iga_weight": 0.5})["iga_scale"]
'batch-mean'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from certkd.errors import CertkdError
from certkd.registry import Registry

NORMALIZATION_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
"""Layers that make the loss invariant to the scale of the weights before them (so a large lr is stable)."""


@dataclass(frozen=True)
class EpochShare:
    """A number of epochs given as a share of ``--epochs`` (e.g. a warm-up over half of the run)."""

    share: float

    def of(self, epochs: int) -> float:
        return self.share * epochs

    def __str__(self) -> str:
        return f"{self.share:g} x epochs"


@dataclass(frozen=True)
class Recipe:
    """A method and the settings it fixes (keys are ``TrainConfig`` / ``ObjectiveParams`` fields).

    ``settings`` are the authors' values; ``norm_free`` replaces some of them for a student without
    a normalization layer, ``reasons`` says why for each.
    """

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    notes: str = ""
    norm_free: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the method and every setting, for ``--help`` and ``certkd info``."""
        values = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        changed = "; ".join(f"{k}={v} ({self.reasons[k]})" for k, v in self.norm_free.items())
        changes = f" Students without a normalization layer: {changed}." if changed else ""
        return f"{self.name} ({self.source}): --method {self.method}, {values}. {self.notes}{changes}".strip()


RECIPES: Registry[Recipe] = Registry("training recipe", group="certkd.recipes")
"""Every recipe, by name (installed packages add theirs through the ``certkd.recipes`` entry points)."""

RECIPES.add("shao2021", Recipe(
    name="shao2021", method="kdiga",
    settings={"iga_on": "adversarial", "teacher_mask": True, "iga_scale": "batch-mean", "iga_weight": 1.0,
              "iga_grad": "exact", "iga_fraction": 1.0, "alpha": 0.5, "tau": 1.0, "schedule": "cyclic",
              "optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4, "eps_warmup": 0.0},
    source="Shao et al. 2021, KDIGA, the authors' public code; theory.md §4",
    notes="Every term at the student's fast-AT point (iga_step 1.25 eps), KD and IGA masked to examples the "
          "teacher gets right there, gradients of the batch-mean CE (gamma 1 at B=126 is 0.0079 per sample). "
          "Their F.kl_div averages over the K classes too; certkd's KL is always batchmean (theory.md §4), "
          "so its KL term weighs K times theirs at the same alpha.",
    norm_free={"lr": 0.05, "eps_warmup": EpochShare(0.5)},
    reasons={"lr": "0.2 is tuned for BatchNorm students; without normalization SGD at 0.2 kills the ReLUs "
                   "(natural training of a cnn4 on MNIST reaches 47 %, then its input gradients vanish, and the "
                   "recipe with a warm-up dies the same way at eps 0.3)",
             "eps_warmup": "the one-step point of an untrained student without normalization at full eps keeps it "
                           "at chance (a cnn4 on MNIST stays at 9-13 % for 4 epochs at eps 0.1); the radius ramps "
                           "up over the first half of the epochs"}))


def has_normalization(values: dict[str, Any]) -> bool | None:
    """Whether the student of flat settings ``values`` (``arch``, ``arch_kwargs``, ``dataset``) has a
    normalization layer (:data:`NORMALIZATION_LAYERS`); None when it cannot be built from them.

    Example
    -------
    >>> has_normalization({"arch": "cnn4"}), has_normalization({"arch": "cnn7"}), has_normalization({})
    (False, True, None)
    """
    from certkd.data import dataset_info
    from certkd.models import create_model

    if not values.get("arch"):
        return None
    try:
        info = dataset_info(values.get("dataset") or "digits")
        model = create_model(values["arch"], num_classes=info.num_classes, input_shape=info.input_shape,
                             **(values.get("arch_kwargs") or {}))
    except (CertkdError, TypeError, ValueError):
        return None  # the trainer reports a bad architecture with its own line
    return any(isinstance(m, NORMALIZATION_LAYERS) for m in model.modules())


def apply_recipe(values: dict[str, Any], explicit: set[str] | None = None) -> dict[str, Any]:
    """``values`` with the settings of ``values["recipe"]`` filled into every key not in ``explicit``.

    For a student without a normalization layer (:func:`has_normalization` false), the recipe's
    ``norm_free`` values replace the authors' ones (an :class:`EpochShare` becomes epochs).

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
    settings = dict(recipe.settings)
    if recipe.norm_free and has_normalization(values) is False:
        settings.update(recipe.norm_free)
    epochs = int(values.get("epochs") or 10)
    for key, value in settings.items():
        if key not in given:
            resolved[key] = value.of(epochs) if isinstance(value, EpochShare) else value
    return resolved


def recipe_summary(config: dict[str, Any]) -> str | None:
    """The recipe a checkpoint's ``config`` was resolved from and the values it trained with (None: no recipe).

    Shows every setting the recipe fixes as resolved (explicit flags included), the step and mask
    that follow from them, and the batch-mean weight converted to the sample scale; then every
    value that differs from the authors', with the reason (the recipe's for a student without a
    normalization layer, else "given explicitly").

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
        parts.append(_setting(key, config[key]))
        if key == "iga_weight" and "iga_weight_per_sample" in config:
            parts[-1] += f" (per sample {config['iga_weight_per_sample']:.3g})"
    changed = []
    for key, authors in recipe.settings.items():
        if key in config and config[key] != authors:
            adapted = recipe.norm_free.get(key, authors)
            if isinstance(adapted, EpochShare):
                adapted = adapted.of(int(config.get("epochs") or 10))
            why = recipe.reasons[key] if key in recipe.norm_free and config[key] == adapted else "given explicitly"
            changed.append(f"{_setting(key, config[key])} (authors {authors}: {why})")
    differs = "; differs from the authors': " + "; ".join(changed) if changed else "; as the authors train"
    return f"{name}: " + ", ".join(parts) + differs


def _setting(key: str, value: Any) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
