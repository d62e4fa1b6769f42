"""Imports every command module so that its commands register on ``certkd.cli.main``."""

from certkd.cli import ablate, bounds, certify, compare, demo, info, merge, train, verify  # noqa: F401
