"""After content was erased: make the database files stop holding it, as far as each database can.

SQLite (every connection runs with ``secure_delete``, so the rows overwritten and the pages freed
are zeroes already): the WAL still holds the frames written before, content included, until it is
checkpointed into the database file and truncated: :func:`reclaim` does that (``TRUNCATE``), under
the writer lock, retrying while a reader still needs old frames, and says so if it never could.
``rewrite`` runs ``VACUUM`` first: the file is rebuilt, free pages are dropped and the file
shrinks; it holds the write lock for as long as rewriting the whole database takes (the listener's
commits wait, past ``busy_timeout`` they answer 451), so it is the operator's choice, never the
scheduler's. It matters for a database used before ``secure_delete`` was on.

PostgreSQL: an UPDATE leaves the old row version (and its TOAST chunks) in the table's files as a
dead tuple; plain ``VACUUM`` (run here, without blocking anyone) makes its space reusable but does
not zero it; ``VACUUM FULL`` (``rewrite``) copies the live rows into new files under an ACCESS
EXCLUSIVE lock, blocking every read and write of the table meanwhile, and unlinks the old files
(their blocks are free on the file system, not overwritten). The WAL segments, WAL archives,
replicas and backups keep the content whatever runs here: only crypto-shredding reaches those.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine

from intake.store.db import is_sqlite, sqlite_writer_lock, wal_size

# The tables whose rows hold message content.
CONTENT_TABLES = ("thread_entry", "inbound_message", "inbound_raw", "outbox", "ticket")
CHECKPOINT_ATTEMPTS = 5  # each waits up to busy_timeout for readers: under a minute in all
CHECKPOINT_PAUSE = 1.0  # seconds between attempts: a reader's transaction is short


@dataclass(frozen=True)
class Reclaimed:
    """What :func:`reclaim` ran, what it could not do (empty: everything), and what the database
    keeps whatever ran (told, not a failure)."""

    ran: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"ran": self.ran, "incomplete": self.incomplete, "notes": self.notes}


def reclaim(engine: Engine, rewrite: bool = False, attempts: int = CHECKPOINT_ATTEMPTS,
            pause: float = CHECKPOINT_PAUSE) -> Reclaimed:
    """Make erased content leave the database's files (see the module docstring); *rewrite*:
    VACUUM (SQLite) or VACUUM FULL (PostgreSQL) too."""
    if is_sqlite(engine):
        return _reclaim_sqlite(engine, rewrite, attempts, pause)
    return _reclaim_postgresql(engine, rewrite)


def _reclaim_sqlite(engine: Engine, rewrite: bool, attempts: int, pause: float) -> Reclaimed:
    ran: list[str] = []
    connection = engine.raw_connection()  # autocommit: neither VACUUM nor a checkpoint runs in a transaction
    try:
        cursor = connection.cursor()
        if rewrite:
            with sqlite_writer_lock(engine, wait_forever=True):
                cursor.execute("VACUUM")
            ran.append("VACUUM")
        for attempt in range(1, attempts + 1):
            if not _checkpoint_truncate(engine, cursor) and wal_size(engine) == 0:
                ran.append(f"wal_checkpoint(TRUNCATE), attempt {attempt}")
                return Reclaimed(ran)
            if attempt < attempts:
                time.sleep(pause)
    finally:
        connection.close()
    return Reclaimed(ran, [f"the WAL could not be checkpointed and truncated in {attempts} attempts: a reader "
                           "held old frames, or a writer the lock (the WAL holds erased content until the next "
                           "checkpoint); run `intake purge` again"])


def _checkpoint_truncate(engine: Engine, cursor: sqlite3.Cursor) -> bool:
    """One TRUNCATE checkpoint, under the writer lock (intake's writers wait their turn instead of
    keeping it busy); True when a reader, or a writer holding the lock past busy_timeout, kept it
    from finishing. Never waits longer than that: the scheduler's sweeps run after it."""
    try:
        with sqlite_writer_lock(engine):
            busy, _frames, _copied = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:  # the writer lock or the database stayed locked
        return True
    return bool(busy)


def _reclaim_postgresql(engine: Engine, rewrite: bool) -> Reclaimed:
    command = "VACUUM FULL" if rewrite else "VACUUM"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in CONTENT_TABLES:
            connection.exec_driver_sql(f"{command} {table}")
    kept = "WAL segments, archives, replicas and backups keep the content (only encryption at rest reaches them)"
    if not rewrite:
        kept = ("the old row versions' space is reusable but not overwritten until reused (`intake purge "
                "--rewrite` runs VACUUM FULL); " + kept)
    return Reclaimed([f"{command} {', '.join(CONTENT_TABLES)}"], notes=[f"PostgreSQL: {kept}"])
