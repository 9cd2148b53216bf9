"""Engine and sessions: durable SQLite (WAL, synchronous=FULL) or PostgreSQL.

Writers use :func:`write_session` (or :func:`write_connection` for Core-only hot paths). On
SQLite each write transaction

* first takes an exclusive ``flock`` on ``<database>.writer``: SQLite's own busy handler
  sleep-polls with growing sleeps (up to 100 ms) and no turn order, so under load the listener's
  commits and the worker's waited on each other's sleeps; a kernel lock wakes the next writer
  the moment the previous one is done;
* then opens the transaction with ``BEGIN IMMEDIATE``, so the write lock is held from the first
  statement and a read never has to upgrade half-way ("database is locked");
* runs with ``synchronous=FULL`` (commit returns after the WAL is fsync'd) unless the caller
  says ``durable=False``: then ``NORMAL``, which in WAL mode still survives a crash of the
  process and loses only the last commits on power loss. That is for bookkeeping whose loss
  can only repeat work (an outbox "sent" mark), never for accepting mail;
* appends what it queued for the audit chain (events, reads) just before it commits
  (:func:`intake.store.audit.sealing`), under that same lock.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlmodel import Session

from intake.store import audit
from intake.store.private_files import create_shared_file, shared_directory

# The most WAL the listener lets pile up before it checkpoints itself (see GroupCommitter), and
# the size the WAL file is cut back to when it starts over after a checkpoint.
WAL_LIMIT = 64 * 1024 * 1024
_BEGIN_OPTION = "intake_sqlite_begin"
_SYNC_OPTION = "intake_sqlite_synchronous"
_writer_locks: dict[str, threading.Lock] = {}
# How long a writer waits for the writer lock, by lock file: the busy_timeout its engine was made with.
_lock_timeouts: dict[str, float] = {}
_DEFAULT_LOCK_TIMEOUT = 10.0
_writer_locks_guard = threading.Lock()


def make_engine(url: str, busy_timeout: float = 10.0, checkpoint_on_commit: bool = True) -> Engine:
    """An engine with intake's durability settings applied to every connection.

    On SQLite, ``checkpoint_on_commit=False`` leaves copying the WAL into the database file to
    :func:`checkpoint`: otherwise the commit that finds the WAL past 1000 pages does it before it
    returns, and under load that is mostly one of the listener's, holding up its 250s."""
    parsed = make_url(url)
    database = sqlite_file(url)
    # hide_parameters: a database error's text (logged, and kept on a failed message) must not
    # carry the statement's values, which are message bodies and raw mail.
    if parsed.get_backend_name() == "sqlite":
        if database:
            shared_directory(database.parent)
        engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False},
                               hide_parameters=True)
        _make_sqlite_durable(engine, busy_timeout, checkpoint_on_commit)
        if database:
            _lock_timeouts[f"{parsed.database}.writer"] = busy_timeout
            _create_shared(engine, database)
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={"options": f"-c lock_timeout={int(busy_timeout * 1000)}"},
    )
    return engine


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL (None for PostgreSQL and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _create_shared(engine: Engine, database: Path) -> None:
    @event.listens_for(engine, "do_connect")
    def _before_connect(dialect, record, cargs, cparams) -> None:  # type: ignore[no-untyped-def]
        # Made 0660 (maintainers in the group write events too) before SQLite opens it, which would
        # make it 0644 under umask 022; its -wal and -shm files get the database file's mode.
        create_shared_file(database)


def _make_sqlite_durable(engine: Engine, busy_timeout: float, checkpoint_on_commit: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        # We issue BEGIN ourselves (below); pysqlite's implicit transactions would defer locking.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (fsync of the WAL) before it returns; 250 means durable.
        cursor.execute("PRAGMA synchronous=FULL")
        record.info[_SYNC_OPTION] = "FULL"
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Freed space (a row deleted or rewritten, an overflow page let go) is zeroed, so no stale
        # copy of a message outlives its row: what makes `intake purge` erase rather than unlink.
        cursor.execute("PRAGMA secure_delete=ON")
        if not checkpoint_on_commit:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        options = connection.get_execution_options()
        synchronous = options.get(_SYNC_OPTION, "FULL")
        # Per transaction, as the connection may have served a non-durable one before; but only
        # when it changes: every statement here is one more the listener's commits wait for.
        if connection.info.get(_SYNC_OPTION) != synchronous:
            connection.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
            connection.info[_SYNC_OPTION] = synchronous
        connection.exec_driver_sql(f"BEGIN {options.get(_BEGIN_OPTION, 'DEFERRED')}")


@contextmanager
def sqlite_writer_lock(engine: Engine, wait_forever: bool = False) -> Iterator[None]:
    """Serialise writers across threads and processes, first come first served.

    Waits at most the engine's ``busy_timeout``, like SQLite's own locks, then raises
    ``sqlite3.OperationalError``: a writer stuck while holding the lock (a frozen process) must
    turn into a 451 for the sender, not a listener that waits forever. Migrations
    (*wait_forever*) wait as long as another migration takes."""
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    path = f"{database}.writer"
    deadline = time.monotonic() + _lock_timeouts.get(path, _DEFAULT_LOCK_TIMEOUT)
    with _writer_locks_guard:
        # flock is per open file description: threads of one process share one lock file, so
        # they need a thread lock in front of it.
        thread_lock = _writer_locks.setdefault(path, threading.Lock())
    if not thread_lock.acquire(timeout=-1 if wait_forever else max(0.0, deadline - time.monotonic())):
        raise sqlite3.OperationalError(f"database is locked: no turn at the writer lock {path}")
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # the first writer: made 0660 whatever its umask, for the group
            create_shared_file(Path(path))
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if wait_forever:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                _flock_until(fd, deadline, path)
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        thread_lock.release()


def _flock_until(fd: int, deadline: float, path: str) -> None:
    """Take the exclusive flock on *fd*, polling (flock has no timeout of its own) until *deadline*:
    every millisecond at first, as the usual holder is a transaction of a few milliseconds and the
    listener's 250s wait on it, then less often once the wait is clearly a long one."""
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                raise sqlite3.OperationalError(f"database is locked: another process holds {path}") from None
            time.sleep(0.001 if now - started < 0.5 else 0.02)


def write_bind(engine: Engine, durable: bool = True) -> Engine:
    """*engine* with its transactions opened by ``BEGIN IMMEDIATE`` (SQLite)."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE", _SYNC_OPTION: "FULL" if durable else "NORMAL"})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def write_session(engine: Engine, durable: bool = True) -> Iterator[Session]:
    """A session whose transaction holds the write lock from its first statement; commits on exit."""
    if not is_sqlite(engine):
        with Session(engine, expire_on_commit=False) as session, session.begin(), audit.sealing(session):
            yield session
        return
    with sqlite_writer_lock(engine), Session(write_bind(engine, durable), expire_on_commit=False) as session:
        with session.begin(), audit.sealing(session):
            yield session


@contextmanager
def write_connection(engine: Engine, durable: bool = True) -> Iterator[Connection]:
    """A Core connection in a write transaction (no ORM session: cheaper on hot paths)."""
    if not is_sqlite(engine):
        with engine.begin() as connection, audit.sealing(connection):
            yield connection
        return
    with sqlite_writer_lock(engine), write_bind(engine, durable).begin() as connection, audit.sealing(connection):
        yield connection


@contextmanager
def sqlite_write_transaction(engine: Engine) -> Iterator[sqlite3.Connection]:
    """The driver's own connection in a durable write transaction, committed on exit (SQLite only).

    For the listener's inbound insert, the one write in front of every 250: there SQLAlchemy's
    per-transaction and per-statement work cost more than the insert itself, and it ran on the
    commit thread, holding the interpreter lock the event loop needs. Same lock, same ``BEGIN
    IMMEDIATE``, same ``synchronous=FULL`` as :func:`write_connection`."""
    with sqlite_writer_lock(engine):
        pooled = engine.raw_connection()
        try:
            connection = pooled.driver_connection
            if pooled.info.get(_SYNC_OPTION) != "FULL":  # see _on_begin: it may have served NORMAL
                connection.execute("PRAGMA synchronous=FULL")
                pooled.info[_SYNC_OPTION] = "FULL"
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            pooled.close()  # back to the pool


def wal_size(engine: Engine) -> int:
    """Bytes in the SQLite database's WAL file (0 when there is none)."""
    try:
        return os.path.getsize(f"{engine.url.database}-wal")
    except OSError:
        return 0


def checkpoint(engine: Engine) -> None:
    """Copy the SQLite WAL into the database file as far as it can without waiting for readers or
    writers, and without blocking them (a PASSIVE checkpoint); nothing to do on PostgreSQL."""
    if not is_sqlite(engine):
        return
    connection = engine.raw_connection()  # autocommit: a checkpoint cannot run inside a transaction
    try:
        connection.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        connection.close()


def insert_new(session: Session, table: Table, key: str, rows: list[dict]) -> set:
    """Insert *rows* into *table* except those whose unique *key* column is taken (``ON CONFLICT DO
    NOTHING``), in one statement; returns the keys inserted now. What makes a notification or an
    outbox mail exactly-once: a second insert of the same key, from any process, is a no-op."""
    if not rows:
        return set()
    return set(session.scalars(_insert_new(session.get_bind().dialect.name == "postgresql", table, key), rows))


@functools.lru_cache(maxsize=64)
def _insert_new(postgresql: bool, table: Table, key: str) -> Any:
    """The statement of :func:`insert_new`, built once per table (it runs for every chunk)."""
    insert = pg_insert if postgresql else sqlite_insert
    # RETURNING, as rowcount is not reliable here on every driver.
    return insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session
