"""`intake backup` and `intake restore`: an online SQLite backup taken while mail arrives,
restored, and used; PostgreSQL is pg_dump's."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import _fresh_postgres_database, process, report, smtp_send
from intake.store.db import make_engine


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def _messages(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT id, sha256 FROM inbound_message ORDER BY id").fetchall()


def _wait_until(condition, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_online_backup_while_mail_arrives_then_restore(make_settings, start_intake_listener, cli, tmp_path):
    settings = make_settings()
    live = Path(settings.database_url.removeprefix("sqlite:///"))
    running = start_intake_listener(settings)
    for n in range(3):
        smtp_send(running.port, report(subject=f"report {n}", message_id=f"<r{n}@researcher.test>"))
    process(settings, running.engine)
    tickets_before = json.loads(cli("tickets", "--json").output)
    assert len(tickets_before) == 3

    accepted: list[int] = []
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            smtp_send(running.port, report(subject="later", message_id=f"<l{len(accepted)}@researcher.test>"))
            accepted.append(len(accepted))

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        _wait_until(lambda: len(accepted) >= 5)
        acknowledged_before_backup = 3 + len(accepted)
        backup = tmp_path / "backups" / "intake-backup.db"
        backup.parent.mkdir()
        output = cli("backup", str(backup)).output
        at_backup = 3 + len(accepted)
        _wait_until(lambda: 3 + len(accepted) >= at_backup + 5)  # mail kept arriving
    finally:
        stop.set()
        sender.join()
    assert f"backed up to {backup}" in output and "3 ticket(s)" in output

    # One consistent snapshot: a prefix of what is stored, with everything answered 250 before it began.
    copied, stored = _messages(backup), _messages(live)
    assert copied == stored[:len(copied)]
    assert acknowledged_before_backup <= len(copied) < len(stored)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o660  # reports: no other user, the group restores
    assert sorted(p.name for p in backup.parent.iterdir()) == ["intake-backup.db"]  # no -wal, no temporary
    with sqlite3.connect(backup) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)

    assert "exists (use --force to overwrite)" in cli("backup", str(backup), code=1).output
    assert _messages(backup) == copied
    latest = tmp_path / "backups" / "latest.db"
    latest.write_bytes(b"an older backup")
    cli("backup", "--force", str(latest))
    assert _messages(latest) == _messages(live)

    # Restore: refused while the listener has the database open.
    assert "in use (stop intake first, or use --force)" in cli("restore", str(backup), code=1).output
    assert _messages(live) == stored
    running.stop()
    running.engine.dispose()
    gc.collect()  # the CLI calls above left their engines' connections to the garbage collector
    output = cli("restore", str(backup)).output
    assert f"restored {live}" in output and f"3 ticket(s), {len(copied)} stored message(s)" in output

    assert _messages(live) == copied
    assert json.loads(cli("tickets", "--json").output) == tickets_before
    assert "report 1" in cli("show", tickets_before[1]["reference"]).output
    cli("db", "check")
    assert "already at" in cli("db", "upgrade").output
    # intake carries on from the restored state: the copied pending mail becomes tickets.
    engine = make_engine(settings.database_url)
    result = process(settings, engine)
    engine.dispose()
    assert len(result.tickets_opened) == len(copied) - 3
    assert len(json.loads(cli("tickets", "--json").output)) == len(copied)


def test_restore_refuses_a_file_that_is_not_an_intake_database(make_settings, cli, tmp_path):
    settings = make_settings()
    live = Path(settings.database_url.removeprefix("sqlite:///"))
    before = live.read_bytes()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE notes (body TEXT)")
    assert "is not an intake database" in cli("restore", str(other), code=1).output
    damaged = tmp_path / "damaged.db"
    shutil.copy(live, damaged)
    with open(damaged, "r+b") as handle:  # overwrite the middle of the file: pages of the schema's tables
        handle.seek(len(before) // 2)
        handle.write(b"\xff" * 4096)
    assert "damaged.db" in cli("restore", str(damaged), code=1).output
    assert live.read_bytes() == before


@pytest.mark.postgres
def test_postgresql_backup_is_pg_dump(cli, monkeypatch, tmp_path, postgres_server, postgres_template):
    url, drop = _fresh_postgres_database(postgres_server, postgres_template)
    try:
        monkeypatch.setenv("INTAKE_DATABASE__URL", url)
        guidance = cli("backup", str(tmp_path / "intake.dump"), code=1).output
        assert "pg_dump --format=custom" in guidance and "--dbname=postgresql://" in guidance
        assert "pg_restore" in cli("restore", str(tmp_path / "intake.dump"), code=1).output
        if shutil.which("pg_dump") is None:
            pytest.skip("pg_dump is not installed: only the guidance was tested")
        cli("backup", "--pg-dump", str(tmp_path / "intake.dump"))
        assert (tmp_path / "intake.dump").read_bytes().startswith(b"PGDMP")  # pg_restore's custom format
        assert stat.S_IMODE((tmp_path / "intake.dump").stat().st_mode) == 0o660
        assert "exists" in cli("backup", "--pg-dump", str(tmp_path / "intake.dump"), code=1).output
        assert os.listdir(tmp_path).count("intake.dump") == 1
    finally:
        drop()
