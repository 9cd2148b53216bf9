"""The operator and maintainer command line: ``intake ...`` (the console script is :func:`main`)."""

from intake.cli.app import main

__all__ = ["main"]
