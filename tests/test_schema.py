"""Migrations: `intake db upgrade|check|current`, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, Table, Text, inspect, select, text
from sqlmodel import SQLModel

from intake.store import inbound, key_rotation, models, schema, sealing
from intake.store.db import make_engine, read_session
from intake.tickets import reads

INTAKE = Path(sys.executable).parent / "intake"
T0 = datetime(2026, 3, 2, 9, 30, 15, 123456, tzinfo=timezone.utc)
T1 = datetime(2026, 3, 3, 17, 0, tzinfo=timezone.utc)


@pytest.fixture
def db_cli(cli, monkeypatch: pytest.MonkeyPatch, empty_database_url: str):
    """The intake CLI on a database with no schema yet."""
    for key in [k for k in os.environ if k.startswith("INTAKE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INTAKE_DATABASE__URL", empty_database_url)
    return cli


@pytest.fixture
def engine(empty_database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(empty_database_url)
    yield engine
    engine.dispose()


def test_upgrade_is_idempotent_and_the_result_matches_the_models(db_cli, engine, empty_database_url):
    """What CI relies on: a database made by the migrations is what the models describe. A model
    changed without a migration fails here (`intake db check`), on SQLite and PostgreSQL."""
    # No schema: commands other than upgrade/serve/restore do not make one (nor a SQLite file: 78).
    db_cli("tickets", code=78 if empty_database_url.startswith("sqlite") else 1)
    upgraded = db_cli("db", "upgrade").output
    assert "upgraded from empty to " + schema.head() in upgraded
    assert ("creating a new database at" in upgraded) == empty_database_url.startswith("sqlite")
    assert f"already at {schema.head()}" in db_cli("db", "upgrade").output
    assert f"database at {schema.head()} matches the models" in db_cli("db", "check").output
    assert db_cli("db", "current").output.startswith(schema.head())
    assert set(SQLModel.metadata.tables) <= set(inspect(engine).get_table_names())
    assert db_cli("tickets").output.strip() == "no tickets"
    assert schema.revisions()[0] in db_cli("db", "history").output


def test_check_names_a_model_change_that_has_no_migration(engine):
    schema.upgrade(engine)
    changed = MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["ticket"].append_column(Column("triaged_by", Text))
    Table("ticket_watcher", changed, Column("ticket_id", Text))
    assert schema.differences(engine, changed) == [
        "table ticket_watcher: in the models only",
        "column ticket.triaged_by (TEXT): in the models only",
    ]
    assert schema.differences(engine) == []


def test_check_fails_with_a_readable_diff_on_a_database_changed_by_hand(db_cli, engine):
    db_cli("db", "upgrade")
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE ticket ADD COLUMN notes TEXT"))
        connection.execute(text("DROP INDEX ix_ticket_state"))
    result = db_cli("db", "check", code=1)
    assert "column ticket.notes (TEXT): in the database only" in result.output
    assert "index ix_ticket_state on ticket(state): in the models only" in result.output


# -- data through an upgrade -------------------------------------------------------------------

# Rows as the FIRST revision's schema holds them, one or more in every table. Written against that
# revision (inserted through its reflected tables), so they stay valid however many revisions follow.
FIRST_REVISION_ROWS: dict[str, list[dict]] = {
    "reference_counter": [{"id": 1, "prefix": "SEC", "year": 2026, "last": 7}],
    "ticket": [{
        "id": 1, "reference": "SEC-2026-0007", "subject": "Stored XSS in comments ✓", "reporter": "alice@researcher.test",
        "reporter_name": "Alice", "intake_address": "security@example.com", "state": "new", "severity": "high",
        "policy": "vaixus", "assignee": None, "labels": ["web", "xss"],
        "links": [{"kind": "mentions", "reference": "SEC-2026-0001"}],
        "quality": {"score": 1, "matched": [], "threshold": 5, "low_quality": False},
        "reporter_unreachable_at": None, "received_at": T0, "created_at": T0, "updated_at": T1}],
    "inbound_message": [{
        "id": 1, "received_at": T0, "mail_from": "alice@researcher.test", "rcpt_tos": ["security@example.com"],
        "peer": "127.0.0.1", "helo": "client.test", "size": 6, "sha256": "a" * 64, "raw": b"\x00raw\r\n",
        "status": "processed", "decision": "new-ticket", "reason": "no thread", "error": None, "attempts": 1,
        "processed_at": T1, "ticket_id": 1}],
    "thread_entry": [{
        "id": 1, "ticket_id": 1, "inbound_id": 1, "direction": "in", "kind": "report", "message_key": "<m1@test>",
        "message_id": "<m1@test>", "in_reply_to": None, "references": [], "sender": "alice@researcher.test",
        "subject": "Stored XSS in comments ✓", "body_text": "Steps:\n1. ...", "attachments": [
            {"index": 0, "filename": "poc.txt", "original_filename": "poc.txt", "content_type": "text/plain",
             "size": 3, "sha256": "b" * 64}],
        "warnings": ["no DKIM"], "threaded_by": None, "encrypted": None, "created_at": T0}],
    "event": [{"id": 1, "ticket_id": 1, "at": T0, "actor": "intake", "kind": "opened", "detail": {"via": "smtp"}}],
    "outbox": [{
        "id": 1, "dedupe_key": "ack:SEC-2026-0007", "ticket_id": 1, "kind": "acknowledgement", "envelope_from": "",
        "recipients": ["alice@researcher.test"], "rate_key": "alice@researcher.test", "message_id": "<ack@test>",
        "raw": b"Subject: ack\r\n\r\nthanks\r\n", "status": "pending", "attempts": 0, "created_at": T0,
        "next_attempt_at": T1, "sent_at": None, "lease_until": None, "lease_owner": None, "last_error": None}],
}


def test_data_made_at_the_first_revision_survives_upgrade_to_head(engine):
    first = schema.revisions()[0]
    assert schema.upgrade(engine, first).after == first
    with engine.begin() as connection:
        reflected = MetaData()
        reflected.reflect(connection)
        assert set(FIRST_REVISION_ROWS) == set(reflected.tables) - {"alembic_version"}, "a table has no test rows"
        for name in ["reference_counter", "ticket", "inbound_message", "thread_entry", "event", "outbox"]:
            connection.execute(reflected.tables[name].insert(), FIRST_REVISION_ROWS[name])

    upgraded = schema.upgrade(engine)
    assert (upgraded.before, upgraded.after) == (first, schema.head())
    assert schema.differences(engine) == []

    # Read back the way intake reads: through the models, timezone-aware.
    detail = reads.ticket_detail(engine, "sec-2026-0007")
    ticket = detail.ticket
    assert (ticket.subject, ticket.labels, ticket.links) == (
        "Stored XSS in comments ✓", ["web", "xss"], [{"kind": "mentions", "reference": "SEC-2026-0001"}])
    assert ticket.quality["threshold"] == 5 and (ticket.received_at, ticket.updated_at) == (T0, T1)
    [entry] = detail.entries
    assert entry.attachments[0]["filename"] == "poc.txt" and entry.warnings == ["no DKIM"]
    [event] = detail.events
    assert (event.kind, event.detail, event.at) == ("opened", {"via": "smtp"}, T0)
    [message] = detail.messages
    assert (inbound.get(engine, message.id).raw, message.rcpt_tos, message.processed_at) == (
        b"\x00raw\r\n", ["security@example.com"], T1)
    assert message.authentication is None  # processed before verdicts were recorded: none made up
    with read_session(engine) as session:
        # The first release stored no deadlines: they are computed after the upgrade (next test).
        assert session.exec(select(models.Deadline)).scalars().all() == []
        mail = session.exec(select(models.Outbox)).scalars().one()
        assert (mail.raw, mail.recipients, mail.next_attempt_at) == (b"Subject: ack\r\n\r\nthanks\r\n",
                                                                      ["alice@researcher.test"], T1)
        counter = session.exec(select(models.ReferenceCounter)).scalars().one()
        assert (counter.prefix, counter.year, counter.last) == ("SEC", 2026, 7)
    with engine.connect() as connection:
        for name, rows in FIRST_REVISION_ROWS.items():
            assert connection.execute(text(f"SELECT count(*) FROM {name}")).scalar_one() == len(rows), name


def test_upgrade_computes_the_deadlines_of_tickets_from_before_they_were_stored(db_cli, engine):
    schema.upgrade(engine, schema.revisions()[0])
    with engine.begin() as connection:
        for name in ["ticket", "event"]:
            connection.execute(reflected_insert(connection, name), FIRST_REVISION_ROWS[name])
    assert "deadlines computed for 1 ticket(s)" in db_cli("db", "upgrade").output
    with read_session(engine) as session:
        [acknowledge] = session.exec(select(models.Deadline)).scalars().all()
    # vaixus: a person acknowledges within 72 hours of receipt.
    assert (acknowledge.stage, acknowledge.due_at, acknowledge.met_at) == ("acknowledge", T0 + timedelta(hours=72), None)
    assert "deadlines computed" not in db_cli("db", "upgrade").output  # nothing left to fill


def test_messages_stored_before_0005_come_through_no_relay_and_with_no_trace(engine):
    """0005 adds the inbound relay and trace columns: rows stored at 0004 get '' for both (no
    relay was known then, no trace fields were written), and read back as any other message."""
    schema.upgrade(engine, "0004")
    with engine.begin() as connection:
        connection.execute(reflected_insert(connection, "inbound_message"),
                           [{name: value for name, value in FIRST_REVISION_ROWS["inbound_message"][0].items()
                             if name != "id"} | {"status": "pending", "ticket_id": None}])
    assert (schema.upgrade(engine).before, schema.current(engine)) == ("0004", schema.head())
    assert schema.differences(engine) == []
    [stored] = inbound.pending(engine, 10)
    assert (stored.relay, stored.trace, stored.raw) == ("", "", b"\x00raw\r\n")
    assert stored.full == stored.raw and stored.received_at == T0
    # New rows name their relay and keep their trace beside the bytes, which stay as sent.
    [new_id] = inbound.store(engine, [inbound.Arrival("bob@researcher.test", ["security@example.com"], "192.0.2.7",
                                                      "client.test", b"Subject: x\r\n\r\nhi\r\n", T1,
                                                      relay="127.0.0.1:41000", trace="Received: by intake; x\r\n")])
    new = inbound.get(engine, new_id).message
    assert (new.relay, new.trace, new.size) == ("127.0.0.1:41000", "Received: by intake; x\r\n", 18)


# -- databases from before migrations ----------------------------------------------------------


def _unversioned_first_revision(engine) -> None:  # type: ignore[no-untyped-def]
    """What an install from before migrations has: the first revision's tables, no alembic_version."""
    schema.upgrade(engine, schema.revisions()[0])
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(reflected_insert(connection, "reference_counter"), FIRST_REVISION_ROWS["reference_counter"])


def reflected_insert(connection, name: str):  # type: ignore[no-untyped-def]
    return Table(name, MetaData(), autoload_with=connection).insert()


def test_a_database_from_before_migrations_is_adopted(db_cli, engine):
    _unversioned_first_revision(engine)
    assert schema.current(engine) is None
    output = db_cli("db", "upgrade").output
    assert f"adopted a database from before migrations as revision {schema.revisions()[0]}" in output
    assert schema.current(engine) == schema.head()
    db_cli("db", "check")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT last FROM reference_counter")).scalar_one() == 7


def test_an_unknown_unversioned_schema_is_refused_untouched(db_cli, engine):
    _unversioned_first_revision(engine)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE ticket ADD COLUMN local_hack TEXT"))
    result = db_cli("db", "upgrade", code=1)
    assert "not the one intake's first migration makes (differing tables: ticket)" in result.output
    assert schema.current(engine) is None
    assert "local_hack" in [c["name"] for c in inspect(engine).get_columns("ticket")]


def test_a_database_from_a_newer_intake_is_refused(db_cli, engine):
    schema.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    assert "does not know (made by a newer version?)" in db_cli("db", "upgrade", code=1).output
    assert "does not know" in db_cli("tickets", code=1).output
    assert schema.current(engine) == "from_the_future"


def test_serve_refuses_a_database_it_cannot_migrate_with_exit_78(config_file, sqlite_url):
    """78 is in the unit's RestartPreventExitStatus: no restart loop on a database from a newer intake."""
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "NOTIFY_SOCKET"))}
    env.update(INTAKE_DATABASE__URL=sqlite_url, INTAKE_SMTP__LISTEN="127.0.0.1:0")
    finished = subprocess.run([str(INTAKE), "--config", str(config_file), "serve"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert finished.returncode == 78, finished.stderr
    assert "event=schema-refused" in finished.stderr and "from_the_future" in finished.stderr
    assert "event=listening" not in finished.stderr


def _lock_waiters(engine) -> int:  # type: ignore[no-untyped-def]
    """How many processes wait for the migration lock: advisory locks not granted (PostgreSQL),
    blocked flocks on the writer lock file (SQLite; Linux's /proc/locks marks them "->")."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                           "AND NOT granted AND database = (SELECT oid FROM pg_database "
                                           "WHERE datname = current_database())")).scalar_one()
    inode = os.stat(f"{engine.url.database}.writer").st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and line.split()[6].endswith(f":{inode}"))


def test_processes_upgrading_at_once_migrate_exactly_once(config_file, empty_database_url, engine):
    """Several nodes (or `intake db upgrade` and `intake serve`) starting together: they wait for
    the migration lock (held here until all four wait for it), then one migrates and the others
    find the database at head."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env["INTAKE_DATABASE__URL"] = empty_database_url
    with schema.migration_transaction(engine):
        processes = [subprocess.Popen([str(INTAKE), "--config", str(config_file), "db", "upgrade"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        deadline = time.monotonic() + 30
        while _lock_waiters(engine) < 4 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in processes), "an upgrade ran without waiting for the lock"
            time.sleep(0.05)
        assert _lock_waiters(engine) == 4
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    assert sorted("upgraded from empty" in out for out in outputs) == [False, False, False, True], outputs
    assert all(f"already at {schema.head()}" in out for out in outputs if "upgraded" not in out), outputs


def test_the_numbered_revisions_are_alembics_history_in_one_line():
    """head() and require_current read the revision files' numbers (no Alembic import for every
    command); that holds only while the history is one line numbered 0001, 0002, ..."""
    history = list(reversed(list(schema.scripts().walk_revisions())))
    assert [script.revision for script in history] == [f"{n:04d}" for n in range(1, len(history) + 1)]
    assert all(script.down_revision == (history[i - 1].revision if i else None) for i, script in enumerate(history))
    assert schema.head() == schema.scripts().get_current_head() == schema.revisions()[-1]


def test_a_database_at_an_unknown_revision_is_refused(engine):
    assert schema.current(engine) is None
    schema.upgrade(engine)
    schema.require_current(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(schema.SchemaRefused, match="9999, which this intake does not know"):
        schema.require_current(engine)
    assert schema.current(engine) == "9999"


def test_sealed_messages_stored_before_0019_open_after_it_with_the_same_key(engine):
    """0019 moves each message's bytes to inbound_raw as they are, without a key: sealed before
    it (their associated data naming inbound_message.raw), they open after it with the storage
    key of their time, nothing is left in clear, and the old column is gone."""
    keyring = sealing.Keyring(sealing.StorageKey(os.urandom(sealing.STORAGE_KEY_BYTES)))
    sealing.attach(engine, keyring)
    schema.upgrade(engine, "0018")
    messages = [b"Subject: first\r\n\r\nsealed before 0019\r\n", b"Subject: second\r\n\r\n" + os.urandom(300_000)]
    rows = []
    for raw in messages:
        data_key, key = sealing.inline_key(keyring)
        rows.append({name: value for name, value in FIRST_REVISION_ROWS["inbound_message"][0].items() if name != "id"}
                    | {"status": "pending", "ticket_id": None, "decision": None, "size": len(raw), "data_key": data_key,
                       "raw": sealing.seal_bytes(key, "inbound_message", "raw", raw),
                       "trace": sealing.seal_text(key, "inbound_message", "trace", "Received: by intake; x\r\n")})
    with engine.begin() as connection:
        connection.execute(reflected_insert(connection, "inbound_message"), rows)
    assert schema.upgrade(engine).before == "0018" and schema.differences(engine) == []
    assert "raw" not in {column["name"] for column in inspect(engine).get_columns("inbound_message")}
    with engine.connect() as connection:
        moved = [bytes(raw) for (raw,) in connection.execute(text("SELECT raw FROM inbound_raw ORDER BY id"))]
    assert all(sealing.is_sealed(raw) for raw in moved) and not any(raw in moved for raw in messages)
    stored = inbound.pending(engine, 10)
    assert [m.raw for m in stored] == messages and {m.trace for m in stored} == {"Received: by intake; x\r\n"}
    assert [inbound.get(engine, m.id).raw for m in stored] == messages
    assert key_rotation.status(engine, keyring)["plaintext_rows"]["inbound_message.raw"] == 0
