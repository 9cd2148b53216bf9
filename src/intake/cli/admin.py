"""Commands for the operator: check-config, the database (db upgrade/check/current/history/
revision, backup, restore), the reply-address secret and the SLA policies (sla explain/recompute)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import click

from intake.cli.common import INSTANT, JSON_OPTION, Context, emit_json, fail, iso, local_and_utc, record_read
from intake import openpgp
from intake.config import production, security_txt
from intake.config.settings import EXIT_CONFIG, ConfigError
from intake.display import echo
from intake.language_tags import ENGLISH
from intake.run import service
from intake.sla import deadlines
from intake.store import audit, audit_verify, backup as backups, private_files, schema
from intake.store.db import is_sqlite, sqlite_file
from intake.tickets import promises
from intake.understand import reply_tokens
from intake.vocabulary import SEVERITIES, AuditAction, Milestone


@click.command("check-config")
@click.pass_obj
def check_config(obj: Context) -> None:
    """Validate the configuration: exit 0, or 78 naming the bad key. Warnings (`warning: ...` on
    stderr) leave the status at 0."""
    settings = obj.settings
    keyring = obj.keyring  # a storage key that cannot be read is a configuration error (78)
    passed = service.passed_socket_addresses()
    listening = (f"listens on {', '.join(passed)} (sockets passed by systemd)" if passed else
                 f"listens on smtp.listen {settings.smtp.listen} (unless systemd passes sockets)")
    try:
        pgp = openpgp.check(settings)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_CONFIG)
    echo(f"{settings.config_path}: OK ({len(settings.policies)} policies, {listening}, "
         f"outbound via {settings.outbound.transport}, "
         f"{f'content encrypted with storage key {keyring.current.id}' if keyring.enabled else 'content unencrypted'})")
    if pgp:
        echo(pgp)
    found = [security_txt.expiry_warning(settings, datetime.now(timezone.utc)), audit.key_warning(settings),
             security_txt.languages_warning(settings)]
    database = sqlite_file(settings.database_url)
    for text in list(filter(None, found)) + production.warnings(settings) + private_files.exposed(
            [Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm")] if database else []):
        echo(f"intake: warning: {text}", err=True)


# -- the database: schema migrations, backup, restore ----------------------------------------


@click.group("db")
def db_group() -> None:
    """The database schema: upgrade (migrate), check against the models, current, history."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
def db_upgrade(obj: Context, revision: str) -> None:
    """Migrate the database to REVISION (default: the newest). Safe to run any number of times,
    and while intake runs: migrations take the write lock."""
    database = sqlite_file(obj.settings.database_url)
    if database is not None and not database.exists():
        echo(f"creating a new database at {database} (from {obj.settings.database_source})")
    engine = obj.engine(at_head=False, create=True)
    try:
        brought_up = deadlines.upgrade_and_backfill(engine, obj.settings, datetime.now(timezone.utc), revision)
    except schema.SchemaRefused as exc:
        fail(str(exc))
    upgraded, filled = brought_up.upgraded, brought_up.filled
    if upgraded.stamped:
        echo(f"adopted a database from before migrations as revision {upgraded.before}")
    if upgraded.before == upgraded.after:
        echo(f"database already at {upgraded.after}")
    else:
        echo(f"database upgraded from {upgraded.before or 'empty'} to {upgraded.after}")
    if filled and filled.tickets:
        echo(f"deadlines computed for {filled.tickets} ticket(s) opened before they were stored")
    if upgraded.after == schema.head():
        now = datetime.now(timezone.utc)
        sealed = audit_verify.start(engine, now)
        if sealed:
            echo(f"audit chain started: the {sealed} event(s) stored before it sealed as of {now.isoformat()}")
    for reference, error in (filled.errors if filled else {}).items():
        echo(f"  {reference}: no deadlines: {error}", err=True)


@db_group.command("check")
@click.pass_obj
def db_check(obj: Context) -> None:
    """Exit 1 listing the differences when the database at head differs from the models (a model
    changed without a migration, or the database was changed by hand)."""
    engine = obj.engine()
    found = schema.differences(engine)
    if found:
        echo(f"the database (at {schema.current(engine)}) and the models differ:", err=True)
        for line in found:
            echo(f"  {line}", err=True)
        fail("a model change needs a migration (`intake db revision MESSAGE`), or the database was altered")
    echo(f"database at {schema.head()} matches the models")


@db_group.command("current")
@click.pass_obj
def db_current(obj: Context) -> None:
    """The database's schema revision, and the newest this intake has."""
    at = schema.current(obj.engine(at_head=False))
    newest = schema.head()
    echo(f"{at or 'none'} (newest: {newest}{'' if at == newest else '; run `intake db upgrade`'})")


@db_group.command("history")
def db_history() -> None:
    """The migrations, oldest first."""
    for script in reversed(list(schema.scripts().walk_revisions())):
        echo(f"{script.revision}  {script.doc}")


@db_group.command("revision")
@click.argument("message")
def db_revision(message: str) -> None:
    """For developers: write the migration the models need into a source checkout."""
    echo(f"wrote {schema.new_revision(message)}: read it, test it, commit it")


@click.command("backup")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@click.option("--pg-dump", "pg_dump", is_flag=True, help="PostgreSQL: run pg_dump (custom format) into PATH.")
@click.pass_obj
def backup_command(obj: Context, path: Path, force: bool, pg_dump: bool) -> None:
    """Back up the database to PATH, consistently, while intake runs.

    SQLite: an online backup, checked and renamed into place. PostgreSQL: use pg_dump
    (printed, or run with --pg-dump). Any schema revision: back up before `intake db upgrade`."""
    engine = obj.engine(at_head=False)
    if is_sqlite(engine) or pg_dump:
        if schema.current(engine) == schema.head():  # an older schema has no chain yet
            # Before the copy, so the backup holds the record of its own making.
            record_read(obj, engine, AuditAction.BACKUP, path=str(path))
    try:
        if is_sqlite(engine):
            copied = backups.backup_sqlite(engine, path, force)
        elif pg_dump:
            copied = backups.run_pg_dump(engine, path, force)
        else:
            command, _ = backups.pg_dump_command(engine, path)
            fail("intake backs up SQLite itself; a PostgreSQL database is backed up with pg_dump:\n  "
                 + " ".join(command) + "\n(password from PGPASSWORD or ~/.pgpass; or run `intake backup --pg-dump "
                 f"{path}`; restore with pg_restore)")
    except backups.BackupError as exc:
        fail(str(exc))
    _report_copy("backed up to", copied)


@click.command("restore")
@click.argument("backup", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Restore even while the database is in use.")
@click.pass_obj
def restore_command(obj: Context, backup: Path, force: bool) -> None:
    """Replace the SQLite database's contents with BACKUP (made by `intake backup`).

    Stop intake first: a database in use is refused unless --force. The backup is checked with
    PRAGMA integrity_check before, the database after. Then `intake db upgrade` (or `intake
    serve`) brings an older backup's schema up to date."""
    engine = obj.engine(at_head=False, create=True)
    if not is_sqlite(engine):
        fail("intake restores SQLite only; restore a PostgreSQL dump with pg_restore")
    try:
        copied = backups.restore_sqlite(engine, backup, force)
    except backups.BackupError as exc:
        fail(str(exc))
    _report_copy("restored", copied)


def _report_copy(verb: str, copied: backups.Copied) -> None:
    contents = "" if copied.tickets is None else (
        f": {copied.tickets} ticket(s), {copied.messages} stored message(s), schema {copied.revision or 'none'}")
    echo(f"{verb} {copied.path} ({copied.bytes} bytes){contents}")


# -- the reply-address secret ------------------------------------------------------------------


@click.group("secret")
def secret_group() -> None:
    """The secret that signs maintainers' reply addresses."""


@secret_group.command("rotate")
@click.pass_obj
def secret_rotate(obj: Context) -> None:
    """Make a new reply-address signing secret: every reply address given out before stops working."""
    try:
        still_open = reply_tokens.rotate(obj.engine(), datetime.now(timezone.utc))
    except reply_tokens.SecretGiven as exc:
        fail(f"the reply secret comes from {exc}, not the database: replace it there with a new random "
             "value (e.g. `head -c 32 /dev/urandom | base64`) and restart intake on every node")
    echo("reply secret rotated: every reply address given out before stops working now (on other "
         f"nodes within {reply_tokens.CACHE_SECONDS:.0f} seconds)")
    echo(f"{still_open} open ticket(s): their maintainers get fresh reply addresses with their next notice")


# -- SLA: policies explained, deadlines recomputed ---------------------------------------------


@click.group()
def sla() -> None:
    """SLA deadlines: explain a policy, recompute the stored deadlines."""


@sla.command("explain")
@click.option("--policy", "policy_name", required=True, help="Policy name from the config.")
@click.option("--received", required=True, type=INSTANT, help="When the report was received (ISO 8601 with offset).")
@click.option("--severity", type=click.Choice(SEVERITIES), default=None,
              help="Severity, if known (else severity-dependent stages take their strictest duration).")
@click.option("--released", type=INSTANT, default=None, help="When the patched release came out.")
@click.option("--acknowledgement", is_flag=True,
              help="Print instead the acknowledgement a new report received then gets, as its reporter reads it.")
@click.option("--language", default=ENGLISH, show_default=True,
              help="With --acknowledgement: in this language of [intake] languages.")
@JSON_OPTION
@click.pass_obj
def sla_explain(obj: Context, policy_name: str, received: datetime, severity: str | None,
                released: datetime | None, acknowledgement: bool, language: str, as_json: bool) -> None:
    """Every stage's due instant for a report received at --received, and why."""
    settings = obj.settings
    if policy_name not in settings.policies:
        fail(f"no policy {policy_name!r} (known: {', '.join(sorted(settings.policies))})", 2)
    if acknowledgement:
        if severity or released or as_json:
            fail("--acknowledgement is a new report's: without --severity, --released or --json", 2)
        if language not in settings.intake.languages:
            fail(f"--language {language!r} is not offered (intake.languages: {', '.join(settings.intake.languages)})", 2)
        echo(promises.preview(settings, policy_name, received, language), nl=False)
        return
    explained = deadlines.explain(settings, policy_name, received, severity, released)
    stages = [{"stage": deadline.stage,
               "due": deadline.due.astimezone(calendar.zone).isoformat() if deadline.due else None,
               "due_utc": deadline.due.astimezone(timezone.utc).isoformat() if deadline.due else None,
               "timezone": calendar.zone.key, "basis": deadline.basis,
               "severity_assumed": deadline.severity_assumed}
              for deadline, calendar in explained]
    if as_json:
        emit_json({"policy": policy_name, "received": received.isoformat(), "severity": severity,
                   Milestone.RELEASED: iso(released), "stages": stages})
        return
    policy = settings.policies[policy_name]
    echo(f"policy {policy_name}{': ' + policy.description if policy.description else ''}")
    echo(f"received {local_and_utc(received, settings.all_calendars[policy.calendar].zone)}"
         f"{', severity ' + severity if severity else ', severity not known'}")
    width = max(len(stage["stage"]) for stage in stages)
    for stage, (deadline, _) in zip(stages, explained):
        when = local_and_utc(deadline.due, ZoneInfo(stage["timezone"])) if deadline.due else "not started"
        echo(f"  {stage['stage'].ljust(width)}  {when}")
        echo(f"  {''.ljust(width)}  {stage['basis']}")


@sla.command("recompute")
@JSON_OPTION
@click.pass_obj
def sla_recompute(obj: Context, as_json: bool) -> None:
    """Recompute every ticket's stored deadlines from the policies now in the config."""
    result = deadlines.recompute_all(obj.engine(), obj.settings, datetime.now(timezone.utc))
    changes = [{"reference": c.reference, "stage": c.stage, "due_before": iso(c.due_before),
                "due_after": iso(c.due_after), "met_before": iso(c.met_before), "met_after": iso(c.met_after)}
               for c in result.changes]
    if as_json:
        emit_json({"tickets": result.tickets, "changes": changes, "errors": result.errors})
    else:
        echo(f"recomputed {result.tickets} ticket(s): {len(changes)} deadline(s) changed")
        for change in changes:
            echo(f"  {change['reference']} {change['stage']}: due {change['due_before'] or '-'} -> "
                 f"{change['due_after'] or '-'}")
        for reference, error in result.errors.items():
            echo(f"  {reference}: not recomputed: {error}", err=True)
    if result.errors:
        sys.exit(1)
