"""The CLI starts without the service: ``intake --help`` and ``intake --version`` import neither the
database layer nor any command module, and the command registry tells the truth about the commands."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from intake.cli.app import COMMANDS, main

# What ``intake --help`` may import of intake: the root group, its helpers and the display module.
LIGHT = {"intake", "intake.cli", "intake.cli.app", "intake.cli.common", "intake.display",
         "intake.vocabulary"}  # constants only: the milestone commands are declared there
HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "jinja2", "pydantic", "aiosmtpd")

_PROBE = """
import json, sys
from intake.cli import main
try:
    main({arguments!r})
except SystemExit:
    pass
sys.stderr.write(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("arguments", [["--help"], ["--version"]])
def test_help_and_version_import_no_database_layer(arguments):
    done = subprocess.run([sys.executable, "-c", _PROBE.format(arguments=arguments)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parent)
    loaded = json.loads(done.stderr)
    assert [name for name in loaded if name.split(".")[0] in HEAVY] == []
    assert {name for name in loaded if name.split(".")[0] == "intake"} <= LIGHT
    assert done.stdout.startswith("Usage:" if arguments == ["--help"] else "intake ")


def test_the_registry_names_every_command_and_its_short_help():
    """``intake --help`` shows COMMANDS' short help without importing the commands: it must say
    what each command's own help would, at any width."""
    for name, registered in COMMANDS.items():
        command = main.get_command(click.Context(main), name)
        assert command is not None and command.name == name, name
        for limit in (30, 45, 60, 200):
            assert click.Command(name, help=registered.short_help).get_short_help_str(limit) == \
                command.get_short_help_str(limit), name


def test_every_command_in_the_cli_modules_is_registered():
    registered = {id(main.get_command(click.Context(main), name)) for name in COMMANDS}
    grouped = {id(sub) for name in COMMANDS
               for sub in getattr(main.get_command(click.Context(main), name), "commands", {}).values()}
    folder = Path(__file__).resolve().parent.parent / "src" / "intake" / "cli"
    for path in sorted(folder.glob("*.py")):
        module = importlib.import_module(f"intake.cli.{path.stem}")
        for attribute, value in vars(module).items():
            if isinstance(value, click.Command) and value is not main:
                assert id(value) in registered | grouped, f"{path.name}: {attribute} is not in COMMANDS"


def test_unknown_command_is_a_usage_error(cli):
    assert "No such command 'bogus'" in cli("bogus", code=2).output
