"""Imports every command module so that its commands register on ``certkd.cli.main``."""

from certkd.cli import ablate, certify, demo, info, theory, train, verify  # noqa: F401
