"""Imports every command module so that its commands register on ``certkd.cli.main``."""
