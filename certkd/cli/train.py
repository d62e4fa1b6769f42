"""``certkd train``: teachers and students with any objective of theory.md §4."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from certkd.checkpoint import load_checkpoint
from certkd.cli import main
from certkd.cli.options import device_option, norm_option, parse_eps_list, seed_option
from certkd.errors import CertkdError
from certkd.train import MethodParams, TrainConfig, list_methods, train
from certkd.train.losses import get_loss


def _one_number(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    values = parse_eps_list(value)
    if len(values) != 1:
        raise click.BadParameter(f"give one number, got {value!r}")
    return values[0]


def _json_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> dict:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object like '{{\"width\": 8}}', got {value!r}")
    return parsed


_METHODS_HELP = "; ".join(f"{name}: {get_loss(name).summary}" for name in list_methods())


@main.command("train", epilog=f"Methods (theory.md §4): {_METHODS_HELP}.")
@click.option("--method", required=True, type=click.Choice(list_methods()), help="Training objective.")
@click.option("--arch", required=True, help="Student (or teacher) architecture from the model registry.")
@click.option("--arch-kwargs", callback=_json_kwargs, help="JSON keyword arguments of the architecture, "
              "e.g. '{\"width\": 8}'.")
@click.option("--dataset", default="digits", show_default=True, help="Dataset name (see the data registry).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the dataset files live.")
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher checkpoint (kd, kdiga, ard, rslad); "
              "any architecture with the dataset's input shape and class count; frozen, eval mode.")
@click.option("--init", type=click.Path(path_type=Path), help="Start the student from this checkpoint: every "
              "tensor whose name and shape match is copied (another family is allowed).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Global batch (split over torchrun "
              "processes).")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Initial learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="SGD with momentum 0.9, or Adam.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True,
              help="Per-epoch cosine annealing, or x0.1 at 50% and 75% of the epochs.")
@seed_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint path (ckpt.pt); beside "
              "it: ckpt.best.pt, ckpt.metrics.jsonl (one line per epoch), ckpt.resume.pt.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run writing --out (same settings); on "
              "CPU it ends with the same weights as an uninterrupted run.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (float16 with loss scaling on CUDA, bfloat16 on CPU).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="KD/KDIGA/ARD weight of the KL term.")
@click.option("--tau", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--beta", type=float, default=6.0, show_default=True, help="TRADES weight of the robust KL term.")
@click.option("--iga-weight", type=float, default=1.0, show_default=True,
              help="KDIGA weight of the input-gradient alignment term (the authors swept 1, 10, 100).")
@click.option("--iga-norm", type=click.Choice(["2", "1", "inf"]), default="2", show_default=True,
              help="Norm of the per-sample gradient difference in KDIGA.")
@click.option("--iga-on", type=click.Choice(["clean", "noisy"]), default="clean", show_default=True,
              help="Align gradients at x, or at x plus uniform noise in the --eps ball.")
@click.option("--eps", callback=_one_number, help="Attack radius for pgd-at, trades, ard, rslad (and "
              "kdiga --iga-on noisy); also the validation PGD radius. Fractions allowed: 8/255.")
@norm_option
@click.option("--attack-steps", type=int, default=10, show_default=True, help="PGD steps of the training attack.")
@click.option("--attack-step-size", callback=_one_number, help="PGD step size [default: 2.5 * eps / steps].")
@click.option("--noise-sd", type=float, default=0.0, show_default=True,
              help="Gaussian noise augmentation (any method), for randomized-smoothing comparisons.")
@click.option("--val-size", type=int, default=500, show_default=True,
              help="Size of the fixed validation subset of the test split.")
@click.option("--val-eps", callback=_one_number, help="Radius of the validation PGD accuracy [default: --eps].")
@click.option("--val-attack-steps", type=int, default=20, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bars on stderr.")
def train_command(method: str, arch: str, arch_kwargs: dict, dataset: str, data_dir: Path | None,
                  teacher: Path | None, init: Path | None, epochs: int, batch_size: int, lr: float, optimizer: str,
                  weight_decay: float, schedule: str, seed: int, out: Path, resume: bool, device: str, amp: bool,
                  alpha: float, tau: float, beta: float, iga_weight: float, iga_norm: str, iga_on: str,
                  eps: float | None, norm: str, attack_steps: int, attack_step_size: float | None, noise_sd: float,
                  val_size: int, val_eps: float | None, val_attack_steps: int, progress: bool) -> None:
    """Train a teacher or a student; one checkpoint per epoch, metrics as JSON lines, resumable.

    Runs the same under torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 2 -m certkd train ...
    """
    if val_size < 1 or val_attack_steps < 1:
        raise CertkdError("--val-size and --val-attack-steps must be >= 1")
    params = MethodParams(alpha=alpha, tau=tau, beta=beta, iga_weight=iga_weight, iga_norm=iga_norm, iga_on=iga_on,
                          eps=eps, norm=norm, attack_steps=attack_steps, attack_step_size=attack_step_size)
    cfg = TrainConfig(method=method, arch=arch, arch_kwargs=arch_kwargs, dataset=dataset, data_dir=data_dir,
                      teacher=teacher, init=init, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      weight_decay=weight_decay, schedule=schedule, seed=seed, out=out, resume=resume,
                      device=device, amp=amp, noise_sd=noise_sd, params=params, val_size=val_size, val_eps=val_eps,
                      val_attack_steps=val_attack_steps, progress=progress)
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        m = load_checkpoint(path).metrics
        pgd = "" if m.get("pgd_acc") is None else f", PGD accuracy {m['pgd_acc']:.4f} at eps {m['val_eps']:g} " \
            f"L{m['norm']} (estimate)"
        click.echo(f"wrote {path} (epoch {m['epoch']}: clean accuracy {m['clean_acc']:.4f}{pgd}); "
                   f"metrics in {cfg.paths()['metrics']}")
