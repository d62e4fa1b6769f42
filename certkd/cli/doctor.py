"""``certkd doctor``: the bound-propagation backend in use and what it may bound."""

from __future__ import annotations

import json
from typing import Any

import click

from certkd.cli import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object (machine output).")
def doctor(as_json: bool) -> None:
    """Show the bound-propagation backend: auto_LiRPA version, shims applied, rewrites, what it may bound.

    The capability table is chosen by what the installed auto_LiRPA can do, not by its
    version string; every entry names the CI tests that prove it against that backend.
    """
    from bounds.backends import describe

    info = describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in format_doctor(info):
        click.echo(line)


def format_doctor(info: dict[str, Any]) -> list[str]:
    """The lines ``certkd doctor`` prints for ``bounds.backends.describe()``."""
    if info["backend"] is None:
        return [f"{'backend':<13}none: {info['reason']}", f"{'torch':<13}{info['torch']}",
                f"{'may bound':<13}nothing by bound propagation (clever, lipschitz and smoothing still work)"]
    tested = ", ".join(info["tested_with"])
    note = f" (UNTESTED version: the table was proven with {tested})" if info["untested_version"] else ""
    lines = [
        f"{'backend':<13}auto_LiRPA {info['version']} at {info['location']}",
        f"{'torch':<13}{info['torch']}",
        f"{'table':<13}capability set {info['family']}, tested with auto_LiRPA {tested}{note}",
        f"{'capabilities':<13}{', '.join(info['capabilities']) or 'none beyond the basic operators'}",
        f"{'shims':<13}{', '.join(info['shims_applied']) or 'none needed'}",
        f"{'ViTs':<13}" + ("bounded (GELU and attention rewritten)" if info["bounds_vits"]
                           else f"refused; to bound them: {info['vit_install']}"),
        f"{'rewrites':<13}{info['rewrites'][0]}",
        *(f"{'':<13}{line}" for line in info["rewrites"][1:]),
        f"{'refused':<13}{', '.join(info['refused_modules'])} (modules, by name)",
        "may bound:",
        f"  {'operator':<18}{'methods':<36}norms",
    ]
    lines += [f"  {row['operator']:<18}{', '.join(row['methods']):<36}{', '.join(row['norms'])}"
              for row in info["may_bound"]]
    return lines
