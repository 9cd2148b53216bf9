"""Backups and restores.

SQLite: :func:`backup_sqlite` uses SQLite's online backup API in a single step, which reads one
consistent snapshot while the service keeps writing (in WAL mode a reader blocks no writer).
The copy is written beside its destination under a temporary name, checked with
``PRAGMA integrity_check``, fsync'd and renamed into place, so a crash leaves either no backup
or a whole one. :func:`restore_sqlite` copies a backup into the configured database with the
same API, which rewrites it in place and leaves no stale WAL of the old contents behind.

PostgreSQL is backed up with ``pg_dump`` (:func:`pg_dump_command`); intake does not reinvent it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from intake.store import db
from intake.store.private_files import create_shared_file, shared_directory


class BackupError(Exception):
    """The backup or restore was refused or failed; the message says why and what to do."""


@dataclass(frozen=True)
class Copied:
    path: Path
    bytes: int
    # What is in the copy, where intake can tell (not for a pg_dump archive).
    revision: str | None = None
    tickets: int | None = None
    messages: int | None = None


def _sqlite_path(engine: Engine) -> Path:
    database = engine.url.database
    if not db.is_sqlite(engine) or not database or database == ":memory:":
        raise BackupError("not a SQLite database file")
    return Path(database)


def _describe(connection: sqlite3.Connection, path: Path) -> Copied:
    """Check *connection*'s database is whole and intake's, and say what is in it."""
    try:
        problems = [row[0] for row in connection.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.DatabaseError as exc:  # too damaged to check ("file is not a database", ...)
        raise BackupError(f"{path} fails PRAGMA integrity_check: {exc}") from None
    if problems != ["ok"]:
        raise BackupError(f"{path} fails PRAGMA integrity_check: {'; '.join(problems[:5])}")
    try:
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        tickets = connection.execute("SELECT count(*) FROM ticket").fetchone()[0]
        messages = connection.execute("SELECT count(*) FROM inbound_message").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not an intake database ({exc})") from None
    return Copied(path, path.stat().st_size, revision[0] if revision else None, tickets, messages)


def _shared_temporary(destination: Path) -> Path:
    """An empty file beside *destination*, 0660 like the database (backups hold reports; group
    ``intake`` restores them)."""
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    create_shared_file(temporary)
    return temporary


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_sqlite(engine: Engine, destination: Path, force: bool = False) -> Copied:
    """Copy the live SQLite database to *destination*, which must not exist unless *force*."""
    source = _sqlite_path(engine)
    if not source.exists():
        raise BackupError(f"{source} does not exist")
    if destination.is_dir():
        raise BackupError(f"{destination} is a directory; give the backup's file name")
    if destination.exists() and not force:
        raise BackupError(f"{destination} exists (use --force to overwrite)")
    temporary = _shared_temporary(destination)
    try:
        with closing(sqlite3.connect(source, timeout=30)) as live, \
                closing(sqlite3.connect(temporary, isolation_level=None)) as copy:
            live.backup(copy)  # pages=-1: one step, one snapshot; writers are not held up
            # A rollback-journal file: the backup is this one file, no -wal beside it.
            copy.execute("PRAGMA journal_mode=DELETE")
            copied = _describe(copy, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        if force:
            os.replace(temporary, destination)
        else:
            os.link(temporary, destination)  # fails if it appeared meanwhile: never clobber
            temporary.unlink()
        _fsync_directory(destination.resolve().parent)
    except FileExistsError:
        raise BackupError(f"{destination} exists (use --force to overwrite)") from None
    finally:
        temporary.unlink(missing_ok=True)
    return Copied(destination, copied.bytes, copied.revision, copied.tickets, copied.messages)


def restore_sqlite(engine: Engine, backup: Path, force: bool = False) -> Copied:
    """Replace the contents of the configured SQLite database with *backup*.

    Refused while any process has the database open (a running ``intake serve``), found by
    taking SQLite's own exclusive lock, unless *force*: then the contents are replaced under
    intake's writer lock, and running processes see the restored data from their next
    transaction. The backup is checked before, and the database after."""
    target = _sqlite_path(engine)
    if not backup.is_file():
        raise BackupError(f"{backup} is not a file")
    with closing(sqlite3.connect(f"{backup.resolve().as_uri()}?mode=ro", uri=True)) as source:
        _describe(source, backup)
        shared_directory(target.parent)
        create_shared_file(target)  # not SQLite's 0644: see private_files
        with db.sqlite_writer_lock(engine), closing(sqlite3.connect(target, timeout=0, isolation_level=None)) as live:
            if not force:
                try:
                    # Exclusive locking mode keeps the lock until close; in WAL mode it cannot be
                    # had while another connection is open, busy or idle.
                    live.execute("PRAGMA locking_mode=EXCLUSIVE")
                    live.execute("BEGIN EXCLUSIVE")
                    live.execute("COMMIT")
                except sqlite3.OperationalError:
                    raise BackupError(f"{target} is in use (stop intake first, or use --force)") from None
            else:
                live.execute("PRAGMA busy_timeout=30000")  # readers of the running service
            source.backup(live)
            live.execute("PRAGMA journal_mode=WAL")  # as intake runs it
            return _describe(live, target)


# -- PostgreSQL --------------------------------------------------------------------------------


def pg_dump_command(engine: Engine, destination: Path) -> tuple[list[str], dict[str, str]]:
    """The ``pg_dump`` command line (custom format, restorable with ``pg_restore``) and the
    environment it needs: the password goes in ``PGPASSWORD``, never on a command line."""
    url = make_url(str(engine.url.render_as_string(hide_password=False)))
    env = {"PGPASSWORD": url.password} if url.password else {}
    libpq = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return ["pg_dump", "--format=custom", f"--file={destination}", f"--dbname={libpq}"], env


def run_pg_dump(engine: Engine, destination: Path, force: bool = False) -> Copied:
    """Run ``pg_dump`` into a temporary file beside *destination*, then rename it into place."""
    if shutil.which("pg_dump") is None:
        raise BackupError("pg_dump is not on PATH (install the PostgreSQL client of the server's version)")
    if destination.exists() and not force:
        raise BackupError(f"{destination} exists (use --force to overwrite)")
    temporary = _shared_temporary(destination)
    command, env = pg_dump_command(engine, temporary)
    try:
        finished = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        if finished.returncode != 0:
            raise BackupError(f"pg_dump failed ({finished.returncode}): {finished.stderr.strip()}")
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
        _fsync_directory(destination.resolve().parent)
    finally:
        temporary.unlink(missing_ok=True)
    return Copied(destination, destination.stat().st_size)
