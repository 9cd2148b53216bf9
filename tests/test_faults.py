"""Faults the listener must ride out: a database locked or gone, a full disk. Each time the client
hears ``451`` (and keeps the message), nothing answered ``250`` is lost, nothing is stored twice,
and mail is accepted again, by the same running listener, once the database is back."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg
import pytest

from conftest import _throwaway_postgres
from test_listener import message_bytes, stored_rows


def _send(client: smtplib.SMTP, marker: str) -> int:
    """The reply code to one message on an open session (451 is an answer, not an error)."""
    try:
        client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes(marker))
    except smtplib.SMTPDataError as refused:
        assert refused.smtp_error.startswith(b"4.3.0"), refused
        return refused.smtp_code
    return 250


def _markers(engine) -> list[str]:  # type: ignore[no-untyped-def]
    return [bytes(row["raw"]).split(b"marker ")[1].split(b"\r\n")[0].decode() for row in stored_rows(engine)]


# -- locked ------------------------------------------------------------------------------------


@contextmanager
def holding_the_lock(url: str) -> Iterator[None]:
    """Another program holds the database's write lock until the block ends."""
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            yield
            holder.execute("COMMIT")
        return
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as holder:
        holder.execute("LOCK TABLE inbound_message IN ACCESS EXCLUSIVE MODE")  # until the commit on exit
        yield


def test_a_lock_held_longer_than_the_busy_timeout_gets_451_and_the_retry_250(make_settings, start_intake_listener,
                                                                            database_url):
    running = start_intake_listener(make_settings(INTAKE_DATABASE__BUSY_TIMEOUT="1"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
        assert _send(client, "before") == 250
        with holding_the_lock(database_url):
            started = time.monotonic()
            assert _send(client, "during") == 451
            assert time.monotonic() - started < 10  # the busy timeout, not forever
        assert _send(client, "during") == 250  # the client's retry, same session, same running listener
    assert _markers(running.engine) == ["before", "during"]


@pytest.mark.parametrize("database_url", ["(SQLite's own lock file)"], ids=["sqlite"])  # the flock is SQLite's
def test_a_writer_frozen_while_holding_intakes_writer_lock_gets_451_not_a_hang(make_settings, start_intake_listener,
                                                                               sqlite_url):
    """Another intake process stopped (SIGSTOP, a debugger) inside a write: it holds the writer
    flock, which SQLite's busy timeout knows nothing about."""
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=sqlite_url, INTAKE_DATABASE__BUSY_TIMEOUT="1"))
    lock_file = sqlite_url.removeprefix("sqlite:///") + ".writer"
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
        with open(lock_file, "a+b") as frozen_writer:
            fcntl.flock(frozen_writer, fcntl.LOCK_EX)
            started = time.monotonic()
            assert _send(client, "while frozen") == 451
            assert time.monotonic() - started < 10
        assert _send(client, "while frozen") == 250
    assert _markers(running.engine) == ["while frozen"]


# -- unreachable -------------------------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path):
    """A PostgreSQL server of this test's own, which it may stop and start again."""
    server = _throwaway_postgres(tmp_path / "pg")
    if server is None:
        pytest.skip("PostgreSQL-down test skipped: no initdb/pg_ctl to start a server the test may stop")
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


# These two bring their own database: the usual fresh one of each kind would go unused.
_OWN_DATABASE = pytest.mark.parametrize("database_url", ["(the test's own)"], ids=["own"])


@pytest.mark.postgres
@_OWN_DATABASE
def test_postgresql_down_gets_451_and_the_listener_recovers_by_itself(make_settings, start_intake_listener,
                                                                     own_postgres):
    stop, start = own_postgres.stop, own_postgres.start
    url = own_postgres.url.replace("postgresql://", "postgresql+psycopg://", 1)
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=url, INTAKE_DATABASE__BUSY_TIMEOUT="2"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
        assert _send(client, "before") == 250
    stop()  # immediate: as a crash of the database server
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
        assert _send(client, "while-down") == 451
        assert _send(client, "while-down") == 451  # and again: nothing is stuck, nothing half-stored
        start()
        assert _send(client, "while-down") == 250  # no restart of intake: the pool reconnects
    assert _markers(running.engine) == ["before", "while-down"]


# -- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs: a real filesystem that really fills up (mounting needs root)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"disk-full test skipped: cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    yield mountpoint
    subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def _fill(path: Path, most: int = 64 * 1024 * 1024) -> None:
    """Write to *path* until the filesystem is full (ENOSPC), at most *most* bytes: big blocks,
    then small ones for the last partial block."""
    written = 0
    for block in (b"\0" * 65536, b"\0" * 512):
        with open(path, "ab", buffering=0) as filler, contextlib.suppress(OSError):
            while written < most:
                written += filler.write(block)
    assert written < most, "the filesystem never filled up"


@_OWN_DATABASE
def test_a_full_disk_gets_451_corrupts_nothing_and_mail_is_accepted_once_space_frees(
        small_disk, make_settings, start_intake_listener, sqlite_template):
    database = small_disk / "intake.db"
    shutil.copy(sqlite_template, database)
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=f"sqlite:///{database}"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
        assert _send(client, "before") == 250
        _fill(small_disk / "filler")
        assert _send(client, "disk-full") == 451
        assert _send(client, "disk-full") == 451
        (small_disk / "filler").unlink()
        assert _send(client, "disk-full") == 250
    assert _markers(running.engine) == ["before", "disk-full"]
    with sqlite3.connect(database) as check:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
