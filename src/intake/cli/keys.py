"""CLI command for OpenPGP keys: the organisation's public key, and reporters' keys
(:mod:`intake.tickets.reporter_keys`)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import click

from intake import openpgp
from intake.cli.common import Context, actor, fail
from intake.display import echo
from intake.tickets import reads, reporter_keys


@click.command("key")
@click.argument("target")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.pass_obj
def key_command(obj: Context, target: str, file: Path | None) -> None:
    """Show the reporter's OpenPGP key of ticket TARGET, or keep the one in FILE for them; `intake
    key export` prints the organisation's public key (armored).

    Mail to a reporter with a key on file is encrypted to the newest one (and signed with the
    organisation's key). Keys attached to reports are kept without asking.
    """
    if target == "export":
        if file is not None:
            fail("usage: intake key export (prints the organisation's public key)", 2)
        key = openpgp.org_key(obj.settings)
        if key is None:
            fail("no organisation key: set [openpgp] key_file or the openpgp-key credential")
        echo(key.public_armored(), nl=False)
        return
    if file is not None:
        _give(obj, target, file)
        return
    try:
        ticket, keys = reporter_keys.for_ticket(obj.engine(), target)
    except reads.TicketNotFound:
        fail(f"no ticket {target}")
    if not keys:
        fail(f"no OpenPGP key on file for {ticket.reporter} (reporter of {ticket.reference}): mail to them is not "
             "encrypted")
    for row in keys:
        echo(f"{row.fingerprint}  {row.address}  {row.source} {row.created_at:%Y-%m-%d %H:%M} UTC"
             f"{'  (used)' if row is keys[-1] else ''}")
    echo(keys[-1].armored, nl=False)


def _give(obj: Context, reference: str, file: Path) -> None:
    try:
        data = file.read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror}")
    try:
        ticket, key, added = reporter_keys.give(obj.engine(), reference, data, datetime.now(timezone.utc),
                                                actor(obj.settings))
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    except openpgp.OpenPgpError as exc:
        fail(f"{file}: {exc}")
    state = "kept" if added else "already on file"
    echo(f"{key.fingerprint} {state} for {ticket.reporter}: mail to them is encrypted to it from now on")
