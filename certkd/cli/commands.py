"""Imports every command module so that its commands register on ``certkd.cli.main``."""
from certkd.cli import certify  # noqa: F401
from certkd.cli import info  # noqa: F401
from certkd.cli import theory  # noqa: F401
from certkd.cli import train  # noqa: F401
