"""``certkd train``: teachers and students with any objective of theory.md §4 (parsing and printing only).

Its options are the fields of ``TrainConfig`` and ``ObjectiveParams`` (``dataclass_options``): a new
training setting is a new field there, with its help, and nothing here.
"""

from __future__ import annotations

import os
from typing import Any

import click
from click.core import ParameterSource

from certkd.checkpoint import load_checkpoint
from certkd.cli import main
from certkd.cli.options import dataclass_options
from certkd.train import RECIPES, ObjectiveParams, TrainConfig, list_methods, train
from certkd.train.losses import get_loss

_METHODS_HELP = "; ".join(f"{name}: {get_loss(name).summary}" for name in list_methods())
_RECIPES_HELP = " ".join(RECIPES.get(name).describe() for name in RECIPES.names())


@main.command("train", epilog=f"Methods (theory.md §4): {_METHODS_HELP}. Recipes: {_RECIPES_HELP}")
@dataclass_options(TrainConfig)
@dataclass_options(ObjectiveParams)
@click.pass_context
def train_command(ctx: click.Context, /, **options: Any) -> None:
    """Train a teacher or a student; one checkpoint per epoch, metrics as JSON lines, resumable.

    Runs the same under torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 2 -m certkd train ...
    """
    if options["method"] is None and options["recipe"] is None:
        raise click.UsageError("give --method (or --recipe)")
    explicit = {name for name in options
                if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    cfg = TrainConfig.from_flat({k: v for k, v in options.items() if v is not None or k in explicit}, explicit)
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        m = load_checkpoint(path).metrics
        pgd = "" if m.get("pgd_acc") is None else f", PGD accuracy {m['pgd_acc']:.4f} at eps {m['val_eps']:g} " \
            f"L{m['norm']} (estimate)"
        click.echo(f"wrote {path} (epoch {m['epoch']}: clean accuracy {m['clean_acc']:.4f}{pgd}); "
                   f"metrics in {cfg.paths()['metrics']}")
