"""Trainers for teachers and students (theory.md §4): ``train(TrainConfig) -> Path``, or ``Trainer(cfg).run()``."""

from certkd.train.losses import LOSSES, LossBatch, LossSpec, ObjectiveParams, get_loss, list_methods
from certkd.train.recipes import RECIPES, Recipe, apply_recipe
from certkd.train.trainer import (
    TrainConfig,
    Trainer,
    TrainingCollapsed,
    TrainingDiverged,
    evaluate,
    train,
    validation_split,
)

__all__ = ["LOSSES", "RECIPES", "LossBatch", "LossSpec", "ObjectiveParams", "Recipe", "TrainConfig", "Trainer",
           "TrainingCollapsed", "TrainingDiverged", "apply_recipe", "evaluate", "get_loss", "list_methods", "train",
           "validation_split"]
