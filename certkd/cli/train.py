"""``certkd train``: teachers and students with any objective of theory.md §4 (parsing and printing only)."""

from __future__ import annotations

import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from certkd.checkpoint import load_checkpoint
from certkd.cli import main
from certkd.cli.options import (
    OUTPUT_FILE,
    device_option,
    json_object,
    norm_option,
    parse_eps_list,
    seed_option,
)
from certkd.train import RECIPES, ObjectiveParams, TrainConfig, list_methods, train
from certkd.train.losses import get_loss
from certkd.train.losses._registry import CERT_BOUNDS, IGA_GRADS, IGA_POINTS, IGA_SCALES
from certkd.train.schedules import EPS_SCHEDULES
from certkd.train.trainer import COLLAPSE_WINDOW, SCHEDULES

_DEFAULTS = {f.name: f.default for cls in (TrainConfig, ObjectiveParams) for f in fields(cls)
             if f.default is not MISSING}
"""Every option's default, read from the dataclasses (one place)."""


def _one_number(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    values = parse_eps_list(value)
    if len(values) != 1:
        raise click.BadParameter(f"give one number, got {value!r}")
    return values[0]


_METHODS_HELP = "; ".join(f"{name}: {get_loss(name).summary}" for name in list_methods())
_RECIPES_HELP = " ".join(RECIPES.get(name).describe() for name in RECIPES.names())


@main.command("train", epilog=f"Methods (theory.md §4): {_METHODS_HELP}. Recipes: {_RECIPES_HELP}")
@click.option("--method", type=click.Choice(list_methods()), help="Training objective (required unless --recipe).")
@click.option("--recipe", type=click.Choice(RECIPES.names()), help="Set the method and its settings as a paper's "
              "authors train (listed below); options given explicitly override it; `certkd info` shows the "
              "resolved values.")
@click.option("--arch", required=True, help="Student (or teacher) architecture from the model registry.")
@click.option("--arch-kwargs", callback=lambda ctx, param, value: json_object(value) if value else {},
              help="JSON keyword arguments of the architecture, e.g. '{\"width\": 8}'.")
@click.option("--dataset", default=_DEFAULTS["dataset"], show_default=True, help="Dataset name (see the data "
              "registry).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the dataset files live.")
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher checkpoint (kd, kdiga, ard, rslad, "
              "cert-kd, cert-kdiga, cert-advkd); "
              "any architecture with the dataset's input shape and class count; frozen, eval mode.")
@click.option("--init", type=click.Path(path_type=Path), help="Start the student from this checkpoint: every "
              "tensor whose name and shape match is copied (another family is allowed).")
@click.option("--epochs", type=int, default=_DEFAULTS["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS["batch_size"], show_default=True,
              help="Global batch (split over torchrun processes).")
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="Initial (cyclic: peak) "
              "learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=_DEFAULTS["optimizer"], show_default=True,
              help="SGD with momentum 0.9, or Adam.")
@click.option("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], show_default=True)
@click.option("--lr-schedule", "--schedule", "schedule", type=click.Choice(SCHEDULES), default=_DEFAULTS["schedule"],
              show_default=True, help="Cosine annealing per epoch; x0.1 at 50% and 75% of the epochs; or cyclic "
              "(linear up to --lr over the first 40% of the steps, then down to 0; Wong et al. 2020).")
@click.option("--clip-grad", type=float, help="Clip the L2 norm of the parameter gradient of every step to this.")
@click.option("--eps-warmup", type=float, default=_DEFAULTS["eps_warmup"], show_default=True, metavar="EPOCHS",
              help="Ramp the training radius (and its step sizes) from 0 to --eps over this many epochs (after "
              "--eps-start); kappa and beta of the certified methods follow the same ramp.")
@click.option("--eps-start", type=float, default=_DEFAULTS["eps_start"], show_default=True, metavar="EPOCHS",
              help="Epochs of training at radius 0 before the ramp (the warm-up of Shi et al. 2021).")
@click.option("--eps-schedule", type=click.Choice(EPS_SCHEDULES), default=_DEFAULTS["eps_schedule"],
              show_default=True, help="Shape of the ramp: linear, or smoothed (Shi et al. 2021: t^4 growth over "
              "the first quarter, then linear with the same slope).")
@click.option("--ibp-init/--no-ibp-init", default=_DEFAULTS["ibp_init"], show_default=True,
              help="IBP initialization (Shi et al. 2021): Linear/Conv weights N(0, 2 pi / fan_in^2), for models with "
              "BatchNorm after each layer (e.g. cnn7).")
@click.option("--kappa-start", type=float, default=_DEFAULTS["kappa_start"], show_default=True,
              help="Certified methods: weight of the clean CE at the start of the ramp (the bound CE gets 1 - kappa).")
@click.option("--kappa-end", type=float, default=_DEFAULTS["kappa_end"], show_default=True,
              help="Certified methods: weight of the clean CE after the ramp (Gowal et al. 0.5; Shi et al. 0).")
@click.option("--crown-beta-start", type=float, default=_DEFAULTS["crown_beta_start"], show_default=True,
              help="crown-ibp: weight of the CROWN-IBP bound (against IBP's) at the start of the ramp.")
@click.option("--crown-beta-end", type=float, default=_DEFAULTS["crown_beta_end"], show_default=True,
              help="crown-ibp: weight of the CROWN-IBP bound after the ramp (0: pure IBP, no CROWN pass).")
@click.option("--mtl-alpha", type=float, default=_DEFAULTS["mtl_alpha"], show_default=True,
              help="mtl-ibp: weight of the IBP loss against the adversarial loss.")
@click.option("--bound-reg", type=float, default=_DEFAULTS["bound_reg"], show_default=True,
              help="Certified methods: weight of the warm-up regularizers of Shi et al. 2021 (bound tightness and "
              "ReLU balance), times 1 - eps_t/eps, while the radius ramps; 0 turns them off (Shi et al.: 0.5).")
@click.option("--cert-bound", type=click.Choice(CERT_BOUNDS), default=_DEFAULTS["cert_bound"], show_default=True,
              help="cert-kd, cert-kdiga, cert-advkd: the certified loss of the student (the ibp or crown-ibp method's).")
@click.option("--collapse-floor", type=float, default=_DEFAULTS["collapse_floor"], show_default=True,
              help="Stop (keeping the last good and the best checkpoint) when the validation clean accuracy falls "
              "below this multiple of chance after being above it, or stays below it with no progress in loss or "
              f"accuracy over {COLLAPSE_WINDOW} epochs; 0 turns the check off.")
@seed_option
@click.option("--out", required=True, type=OUTPUT_FILE, help="Checkpoint path (ckpt.pt); beside "
              "it: ckpt.best.pt, ckpt.metrics.jsonl (one line per epoch), ckpt.resume.pt.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run writing --out (same settings); on "
              "CPU it ends with the same weights as an uninterrupted run.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (float16 with loss scaling on CUDA, bfloat16 on CPU).")
@click.option("--alpha", type=float, default=_DEFAULTS["alpha"], show_default=True,
              help="KD/KDIGA/ARD weight of the KL term.")
@click.option("--tau", type=float, default=_DEFAULTS["tau"], show_default=True, help="Distillation temperature.")
@click.option("--beta", type=float, default=_DEFAULTS["beta"], show_default=True,
              help="TRADES weight of the robust KL term.")
@click.option("--iga-weight", type=float, default=_DEFAULTS["iga_weight"], show_default=True,
              help="KDIGA weight of the input-gradient alignment term, on the --iga-scale scale.")
@click.option("--iga-scale", type=click.Choice(IGA_SCALES), default=_DEFAULTS["iga_scale"], show_default=True,
              help="sample: each aligned row is the gradient of its example's own CE (certkd's scale); batch-mean: "
              "of the batch-mean CE, 1/B of it, as in the authors' code. A batch-mean weight w equals w/B on the "
              "sample scale (B the per-process batch; the paper's gamma 1 at B=126 is 0.0079, at B=128 0.0078); "
              "the checkpoint records both.")
@click.option("--iga-norm", type=click.Choice(["2", "1", "inf"]), default=_DEFAULTS["iga_norm"], show_default=True,
              help="Norm of the per-sample gradient difference in KDIGA.")
@click.option("--iga-on", type=click.Choice(IGA_POINTS), default=_DEFAULTS["iga_on"], show_default=True,
              help="Where KDIGA works: at x; gradients at x plus uniform noise in the --eps ball (KD at x); or every "
              "term at the student's fast-AT point (random start, one signed step of --iga-step on its CE, "
              "projected to ball and box), the authors' recipe; at its PGD point (--attack-steps, "
              "--attack-step-size, as ARD); or at its N-FGSM point (noise 2 eps, a step of eps, not projected "
              "to the ball), which resists catastrophic overfitting (theory.md §8).")
@click.option("--iga-grad", type=click.Choice(IGA_GRADS), default=_DEFAULTS["iga_grad"], show_default=True,
              help="How the IGA term's parameter gradient is taken: exact double backprop, or a finite difference "
              "of the student's loss along the gradient gap (Finlay and Oberman 2019; one more forward instead "
              "of a double backward; on ReLU networks an approximation: docs/theory.md §4).")
@click.option("--iga-step", callback=_one_number, help="Step of the adversarial point [default: 1.25 * eps].")
@click.option("--teacher-mask/--no-teacher-mask", default=None, help="Average KD and IGA only over the examples "
              "the teacher classifies correctly at the point used [default: on with --iga-on adversarial].")
@click.option("--eps", callback=_one_number, help="Attack radius for pgd-at, trades, ard, rslad (and "
              "kdiga --iga-on noisy/adversarial), the L-inf radius bounded by the certified methods (ibp, crown-ibp, "
              "mtl-ibp, cert-*); also the validation PGD radius. Fractions allowed: 8/255.")
@norm_option
@click.option("--attack-steps", type=int, default=_DEFAULTS["attack_steps"], show_default=True,
              help="PGD steps of the training attack.")
@click.option("--attack-step-size", callback=_one_number, help="PGD step size [default: 2.5 * eps / steps].")
@click.option("--noise-sd", type=float, default=_DEFAULTS["noise_sd"], show_default=True,
              help="Gaussian noise augmentation (any method), for randomized-smoothing comparisons.")
@click.option("--val-size", type=int, help="Size of the validation set, carved from the training split (never "
              "the test points) [default: min(500, 10% of the training split)].")
@click.option("--val-eps", callback=_one_number, help="Radius of the validation PGD accuracy [default: --eps].")
@click.option("--val-attack-steps", type=int, default=_DEFAULTS["val_attack_steps"], show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bars and one line per "
              "epoch on stderr.")
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
