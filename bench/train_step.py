"""Time per training step of every distillation / robust objective, relative to KD (theory.md §4).

All methods run side by side on the same student, teacher and batch, interleaved round by round
(so a busy machine slows all of them alike); the median step time of each is reported.
KDIGA's target: at most 2.5x KD (one teacher backward plus a student double backward).
``kdiga-adv`` is KDIGA as the authors train it (``--recipe shao2021``: every term at the student's
one-step point); its target: at most 1.6x a fast-AT step (FGSM with a random start, Wong et al.
2020, ``fast-at`` below) on the same model and batch, and it is reported against KD and ARD too.
``kdiga-fd`` is the same step with ``--iga-grad finite-difference`` (the IGA term's parameter
gradient by a finite difference along the gradient gap, Finlay and Oberman 2019), same target.
``kdiga-frac`` is the same step with ``--iga-fraction`` (default 0.25: the IGA term estimated on a
quarter of the batch, KD and CE on all of it), same target. ``kdiga-pgd`` is KDIGA at the student's
PGD point (``--iga-on pgd``, the point of the MNIST record), against PGD-AT with the same steps.

    python bench/train_step.py                      # cnn4, CIFAR-shaped batch of 128, CPU
    python bench/train_step.py --arch resnet_small --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from certkd.models import create_model
from certkd.train import apply_recipe
from certkd.train.losses import LossBatch, LossSpec, ObjectiveParams, get_loss
from certkd.train.losses.common import eval_mode, one_step_point
from certkd.train.losses.distill import iga_fd_surrogate, iga_term, input_gradient
from certkd.train.trainer import compute_loss, optimizer_step

METHODS = ("kd", "kdiga", "kdiga-adv", "kdiga-fd", "kdiga-frac", "fast-at", "kdiga-pgd", "pgd-at", "ard", "rslad",
           "trades", "natural")
TARGETS = {"kdiga": ("kd", 2.5), "kdiga-adv": ("fast-at", 1.6), "kdiga-fd": ("fast-at", 1.6),
           "kdiga-frac": ("fast-at", 1.6), "kdiga-pgd": ("pgd-at", 1.6)}
"""method -> (reference method, largest allowed ratio of median step times)."""


def fast_at_loss(batch: LossBatch, params: ObjectiveParams) -> dict[str, torch.Tensor]:
    """FGSM-RS (fast AT): ``CE(S(x'), y)`` at the same one-step point the adversarial KDIGA uses."""
    assert params.eps is not None and params.iga_step is not None
    with eval_mode(batch.student_bare):
        x_adv = one_step_point(batch.student_bare, batch.x, batch.y, params.eps, params.norm, params.iga_step,
                               batch.generator)
    ce = F.cross_entropy(batch.student(x_adv), batch.y)
    return {"ce_adv": ce.detach(), "loss": ce}


def method_specs(base: ObjectiveParams, iga_fraction: float) -> dict[str, tuple[LossSpec, ObjectiveParams]]:
    """Each timed method's objective and resolved params (``kdiga-adv``: the shao2021 recipe's objective)."""
    recipe = apply_recipe({"recipe": "shao2021", "method": "kdiga"})
    own = {f.name for f in fields(ObjectiveParams)}
    adv = replace(base, **{k: v for k, v in recipe.items() if k in own}).resolved()
    fast = LossSpec("fast-at", fast_at_loss, needs_teacher=False, uses_attack=True, select="pgd_acc",
                    summary="CE(S(x'), y), x' = FGSM with a random start")
    variants = {"kdiga-adv": adv, "kdiga-fd": replace(adv, iga_grad="finite-difference"),
                "kdiga-frac": replace(adv, iga_fraction=iga_fraction), "kdiga-pgd": replace(adv, iga_on="pgd")}
    specs = {m: (get_loss(m), base.resolved()) for m in METHODS if m not in (*variants, "fast-at")}
    specs.update({m: (get_loss("kdiga"), params) for m, params in variants.items()})
    specs["fast-at"] = (fast, adv)
    return specs


def time_steps(arch: str, arch_kwargs: dict, input_shape: tuple[int, ...], batch_size: int, rounds: int,
               attack_steps: int, device: str, amp: bool, iga_fraction: float, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per training step of each method, ``rounds`` interleaved measurements each."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    teacher = create_model(arch, 10, input_shape, **arch_kwargs).to(dev).eval().requires_grad_(False)
    x = torch.rand(batch_size, *input_shape, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    specs = method_specs(ObjectiveParams(eps=8 / 255, attack_steps=attack_steps, iga_weight=1.0), iga_fraction)
    students, optimizers = {}, {}
    for method in METHODS:
        torch.manual_seed(seed + 1)
        students[method] = create_model(arch, 10, input_shape, **arch_kwargs).to(dev).train()
        optimizers[method] = torch.optim.SGD(students[method].parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds + 1):  # round 0 warms up
        for method in METHODS:
            batch = LossBatch(x=x, y=y, student=students[method], student_bare=students[method], teacher=teacher,
                              generator=torch.Generator(device=dev).manual_seed(seed))
            _sync(dev)
            t0 = time.perf_counter()
            spec, params = specs[method]
            out = compute_loss(spec, params, batch, amp)
            optimizer_step(out["loss"], optimizers[method], scaler)
            _sync(dev)
            if r:
                times[method].append(time.perf_counter() - t0)
    return times


def fd_agreement(arch: str, arch_kwargs: dict, input_shape: tuple[int, ...], batch_size: int, device: str,
                 steps: tuple[float, ...] = (0.1, 0.01, 1e-3), seed: int = 0) -> dict[float, tuple[float, float]]:
    """``h -> (relative L2 error, cosine)`` of the finite-difference IGA parameter gradient against double backprop."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    teacher = create_model(arch, 10, input_shape, **arch_kwargs).to(dev).eval().requires_grad_(False)
    student = create_model(arch, 10, input_shape, **arch_kwargs).to(dev).train()
    x = torch.rand(batch_size, *input_shape, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    _, g_t = input_gradient(teacher, x, y, create_graph=False)

    def grad(loss: torch.Tensor) -> torch.Tensor:
        student.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    _, g_s = input_gradient(student, x, y, create_graph=True)
    exact = grad(iga_term(g_s, g_t, "2", None, "batch-mean"))
    out = {}
    for h in steps:
        logits, g_s = input_gradient(student, x, y, create_graph=False, retain_graph=True)
        fd = grad(iga_fd_surrogate(student, x, y, logits, g_s, g_t, "2", None, "batch-mean", h=h))
        out[h] = (float((fd - exact).norm() / exact.norm()), float(F.cosine_similarity(fd, exact, dim=0)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cnn4")
    ap.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments of the architecture")
    ap.add_argument("--input-shape", default="3,32,32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--attack-steps", type=int, default=10, help="PGD steps of ARD, RSLAD, PGD-AT, TRADES")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--iga-fraction", type=float, default=0.25, help="the share of the batch of kdiga-frac's IGA term")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    times = time_steps(args.arch, json.loads(args.arch_kwargs), shape, args.batch_size, args.rounds,
                       args.attack_steps, args.device, args.amp, args.iga_fraction)
    kd = statistics.median(times["kd"])
    print(f"training step time relative to KD: {args.arch} {args.arch_kwargs}, batch {args.batch_size} x {shape}, "
          f"{args.attack_steps} PGD steps, kdiga-frac on {args.iga_fraction:g} of the batch, device {args.device}, "
          f"median of {args.rounds} interleaved rounds")
    medians = {m: statistics.median(times[m]) for m in METHODS}
    print(f"{'method':<10} {'ms/step':>9} {'x KD':>6} {'x ARD':>6} {'x fast-at':>9}")
    for method in METHODS:
        med = medians[method]
        note = ""
        if method in TARGETS:
            ref, target = TARGETS[method]
            ratio = med / medians[ref]
            note = f"  ({ratio:.2f}x {ref}, target <= {target}: {'met' if ratio <= target else 'MISSED'})"
        print(f"{method:<10} {1e3 * med:>9.2f} {med / kd:>6.2f} {med / medians['ard']:>6.2f} "
              f"{med / medians['fast-at']:>9.2f}{note}")
    agreement = fd_agreement(args.arch, json.loads(args.arch_kwargs), shape, args.batch_size, args.device)
    print("finite-difference IGA gradient against double backprop (the same untrained student and teacher): "
          + "; ".join(f"h={h:g}: relative error {err:.3g}, cosine {cos:.3f}" for h, (err, cos) in agreement.items()))


if __name__ == "__main__":
    main()
