"""What the command modules share: the :class:`Context` every command gets (settings and database,
loaded when first asked for), failing with an exit status, output helpers, option types and
decorators, and :func:`change_ticket`, the one transaction a command that changes a ticket runs.

Light to import: ``intake --help`` imports this module and nothing of the service; the settings and
the database modules are imported by the first command that asks for them.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

import click

from intake import display
from intake.display import echo

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlmodel import Session

    from intake.config.settings import Settings
    from intake.store.sealing import Keyring
    from intake.store.models import Ticket


class Context:
    """What ``intake --config`` names, for the command that runs."""

    def __init__(self, config_path: Path | None):
        self.config_path = config_path
        self._settings: Settings | None = None
        self._keyring: Keyring | None = None

    @property
    def settings(self) -> Settings:
        from intake.config.settings import EXIT_CONFIG, ConfigError, default_config_path, load_settings

        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                echo(f"intake: configuration error in {self.config_path or default_config_path()}:\n{exc}",
                     err=True)
                sys.exit(EXIT_CONFIG)
        return self._settings

    def engine(self, *, at_head: bool = True, create: bool = False, check_keys: bool = True) -> Engine:
        """The database; unless *at_head* is False, one whose schema this intake can use.
        Only `intake serve` and `intake db upgrade` migrate. A SQLite file that does not exist is
        made only with *create* (`db upgrade`, `restore`); any other command exits 78 naming it:
        a second, empty database beside the wrong config file helps nobody. Unless *check_keys* is
        False, one whose data keys the configured storage keys open (else exit 78)."""
        from intake.config.settings import EXIT_CONFIG
        from intake.store import audit, key_rotation, schema, sealing
        from intake.store.db import make_engine, sqlite_file

        settings = self.settings
        database = sqlite_file(settings.database_url)
        if database is not None:
            _check_sqlite_file(database, settings.database_source, create)
        engine = sealing.attach(make_engine(settings.database_url, settings.database.busy_timeout), self.keyring)
        audit.configure(settings)
        if at_head:
            try:
                schema.require_current(engine)
            except schema.SchemaRefused as exc:
                fail(str(exc))
        if at_head and check_keys:
            try:
                key_rotation.check(engine, self.keyring)
            except sealing.SealingError as exc:
                fail(str(exc), EXIT_CONFIG)
        return engine

    @property
    def keyring(self) -> Keyring:
        """The storage keys of the configuration (exit 78 when one cannot be read)."""
        from intake.config.settings import EXIT_CONFIG, ConfigError
        from intake.store.key_rotation import storage_keyring

        if self._keyring is None:
            try:
                self._keyring = storage_keyring(self.settings)
            except ConfigError as exc:
                fail(str(exc), EXIT_CONFIG)
        return self._keyring


def _check_sqlite_file(database: Path, source: str, create: bool) -> None:
    """Exit 78 saying why unless *database* exists (or may be made: *create*) and this account may
    read and write it: a maintainer outside the service's group learns which group to join."""
    from intake.config.settings import EXIT_CONFIG

    try:
        present = database.exists()
    except PermissionError:
        fail(f"cannot reach the database at {database} (from {source}): permission denied on "
             f"{database.parent}; maintainers run intake as members of its group", EXIT_CONFIG)
    if not present:
        if not create:
            fail(f"no database at {database} (from {source}): is this the service's configuration?", EXIT_CONFIG)
    elif not os.access(database, os.R_OK | os.W_OK):
        group = database.stat().st_gid
        try:
            group_name = grp.getgrgid(group).gr_name
        except KeyError:
            group_name = str(group)
        fail(f"cannot read and write the database at {database} (from {source}): run intake as a member of "
             f"group {group_name}", EXIT_CONFIG)


def fail(message: str, code: int = 1) -> NoReturn:
    echo(f"intake: {message}", err=True)
    sys.exit(code)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def emit_json(data: Any) -> None:
    display.echo_json(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    # One write: a listing can have thousands of lines.
    echo("\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                   for line in [headers, *rows]))


def local_and_utc(instant: datetime, zone: ZoneInfo) -> str:
    local = instant.astimezone(zone)
    offset = local.isoformat()[-6:]
    utc = instant.astimezone(timezone.utc)
    return f"{local:%a %d %b %Y %H:%M} {local.tzname()} ({offset}) = {utc:%Y-%m-%d %H:%M} UTC"


def actor(settings: Settings) -> str:
    """Who is at the keyboard, recorded with every change: the Unix account running this process,
    found from its uid ($USER and $LOGNAME are whatever the caller set), as
    :meth:`Settings.actor` maps it."""
    uid = os.getuid()
    try:
        login: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry (a container's, a deleted account's)
        login = None
    return settings.actor(login, uid)


class _Instant(click.ParamType):
    """An ISO 8601 instant with a UTC offset (``Z`` or ``+10:00``): a bare local time is ambiguous."""

    name = "ISO8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            instant = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date and time (e.g. 2026-12-24T15:00:00+10:00)", param, ctx)
        if instant.utcoffset() is None:
            self.fail(f"{value!r} has no UTC offset: add one, e.g. {value}Z or {value}+10:00", param, ctx)
        return instant


INSTANT = _Instant()

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
NOW_OPTION = click.option("--now", type=INSTANT, default=None,
                          help="Act as of this instant (ISO 8601 with offset; default: the current time).")
AT_OPTION = click.option("--at", type=INSTANT, default=None,
                         help="When it happened (ISO 8601 with offset; default now).")
FORCE_OPTION = click.option("--force", is_flag=True, help="Record it even out of order or a second time.")


def write_file_or_fail(output: str, data: bytes, force: bool) -> None:
    """Write *data* to the new file *output* with mode 0600 (replacing it with *force*, never
    through a symbolic link), or fail saying why."""
    from intake.store import private_files

    try:
        private_files.write_private(Path(output), data, replace=force)
    except FileExistsError:
        fail(f"{output} exists (use --force to overwrite)")
    except private_files.SymlinkRefused as exc:
        fail(f"{exc}: give another file name")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")


def record_read(obj: Context, engine: Engine, action: str, *, reference: str | None = None,
                ticket_id: int | None = None, **detail: Any) -> None:
    """Append to the audit chain that the maintainer running this read report content (see
    :func:`intake.store.audit_verify.record_read`)."""
    from intake.store import audit_verify

    audit_verify.record_read(engine, action, actor(obj.settings), datetime.now(timezone.utc),
                             reference=reference, ticket_id=ticket_id, **detail)


def change_ticket(obj: Context, reference: str, change: Callable[[Session, Settings, Ticket, datetime], Any]) -> None:
    """Run *change(session, settings, ticket, now)* on ticket *reference* in one transaction and
    report it: its state, then what *change* returned: the deadlines it moved, or ``(moved, notes)``
    with lines to show as well. A refused change fails with the reason."""
    from intake.sla import deadlines
    from intake.store.db import write_session
    from intake.tickets import correspondence, milestones, reads

    settings = obj.settings
    now = datetime.now(timezone.utc)
    try:
        with write_session(obj.engine()) as session:
            ticket = reads.find(session, reference)
            result = change(session, settings, ticket, now)
            summary = f"{ticket.reference}: state {ticket.state}"
    except reads.TicketNotFound as exc:
        fail(f"no ticket {exc.args[0]}")
    except (milestones.Refused, deadlines.PolicyMissing, correspondence.EmptyMessage) as exc:
        fail(f"{exc}")
    moved, notes = result if isinstance(result, tuple) else (result or [], [])
    echo(summary)
    for note_text in notes:
        echo(f"  {note_text}")
    for item in moved:
        if item.due_before != item.due_after:
            echo(f"  {item.stage} due {iso(item.due_before) or '-'} -> {iso(item.due_after) or '-'}")
        if item.met_before != item.met_after:
            echo(f"  {item.stage} met {iso(item.met_after) or '-'}")
