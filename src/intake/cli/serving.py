"""``intake serve``, alone in its module: the listener process imports only what the listener
runs (the other admin commands' modules, the processing stack, would stay in its memory for ever)."""

from __future__ import annotations

import sys

import click

from intake.cli.common import Context
from intake.run import service
from intake.run.logs import configure_logging


@click.command()
@click.pass_obj
def serve(obj: Context) -> None:
    """Run the SMTP listener, processor and outbox until SIGTERM."""
    configure_logging(obj.settings.logging)
    sys.exit(service.serve(obj.settings))
