"""Option parsers shared by the commands."""

from __future__ import annotations

import math
from fractions import Fraction

import click


def parse_eps_list(values: tuple[str, ...] | list[str] | str) -> list[float]:
    """``("2/255", "0.1,0.3")`` -> ``[2/255, 0.1, 0.3]``; every value finite and >= 0."""
    if isinstance(values, str):
        values = (values,)
    out: list[float] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                eps = float(Fraction(part)) if "/" in part else float(part)
            except (ValueError, ZeroDivisionError):
                raise click.BadParameter(f"eps {part!r} is not a number (examples: 0.1, 2/255)") from None
            if not math.isfinite(eps) or eps < 0:
                raise click.BadParameter(f"eps must be a finite number >= 0, got {part!r}")
            out.append(eps)
    return out


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"k/n"`` with 0 <= k < n -> ``(k, n)``."""
    if value is None:
        return None
    try:
        k, n = (int(s) for s in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"shard {value!r} must look like k/n, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise click.BadParameter(f"shard {value!r} needs 0 <= k < n")
    return k, n


norm_option = click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True,
                           help="Threat model: L-inf or L2 ball, intersected with [0, 1]^d.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed: fixes every run on CPU.")
device_option = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
