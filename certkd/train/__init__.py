"""Trainers for teachers and students (theory.md §4): ``train(TrainConfig) -> Path``."""

from certkd.train.losses import LossBatch, LossSpec, MethodParams, get_loss, list_methods
from certkd.train.trainer import TrainConfig, TrainingDiverged, evaluate, train

__all__ = ["LossBatch", "LossSpec", "MethodParams", "TrainConfig", "TrainingDiverged", "evaluate", "get_loss",
           "list_methods", "train"]
