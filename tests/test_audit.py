"""The tamper-evident audit chain through the real CLI on real SQLite files (and PostgreSQL):
every event and every read of a report sealed; an attacker's raw SQL on the event or audit_entry
rows found by `intake audit verify`; an anchor catching a chain cut short; two PostgreSQL writers
appending at once keeping one linear chain."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from conftest import process, report
from intake.store import audit, audit_verify, inbound
from intake.store.db import make_engine, read_session, sqlite_file, write_session
from intake.store.models import AuditEntry, Event, ServiceSecret, Ticket
from intake.tickets import records, reads
from intake.vocabulary import AuditAction, EventKind

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
KEY = "k" * 40
LOGIN = pwd.getpwuid(os.getuid()).pw_name
# The attacks edit a SQLite file with the sqlite3 module (PostgreSQL: two writers, at the end).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
MAINTAINER = f"""
[[maintainers]]
name = "Ana Maintainer"
email = "ana@maintainers.test"
login = "{LOGIN}"
"""


@pytest.fixture
def desk(make_settings, config_file, monkeypatch):  # type: ignore[no-untyped-def]
    """Two tickets opened by the processor, a maintainer whose login runs the tests, the audit
    key given as a credential."""
    config_file.write_text(config_file.read_text() + MAINTAINER)
    credentials = config_file.parent / "credentials"
    credentials.mkdir()
    (credentials / "audit-key").write_text(KEY + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = make_settings()
    engine = make_engine(settings.database_url)
    for number, sender in enumerate(("alice@researcher.test", "carol@other.test")):
        raw = report(subject=f"Report {number}", sender=sender).as_bytes()
        inbound.store(engine, [inbound.Arrival(sender, ["security@example.com"], "127.0.0.1:1", "client.test", raw,
                                               T0 + timedelta(minutes=number))])
    refs = process(settings, engine, T0 + timedelta(minutes=5)).tickets_opened
    yield settings, engine, refs
    engine.dispose()


def _raw(settings) -> sqlite3.Connection:  # type: ignore[no-untyped-def]
    """The database file opened as an attacker would: the sqlite3 module, no intake."""
    connection = sqlite3.connect(sqlite_file(settings.database_url), isolation_level=None)
    return connection


def _verify(cli, *args: str, code: int) -> str:  # type: ignore[no-untyped-def]
    result = cli("audit", "verify", *args, code=code)
    return result.output + (result.stderr if result.stderr_bytes is not None else "")


def _count(engine, model) -> int:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# -- what is sealed ---------------------------------------------------------------------------


def test_every_event_of_opening_triage_and_credit_is_sealed_and_the_chain_verifies(desk, cli):
    settings, engine, (first, second) = desk
    cli("assign", first, "ana")
    cli("label", first, "web")
    cli("credit", first, "--name", "Alice R")
    cli("severity", second, "high")
    assert _count(engine, Event) >= 8
    # Every event has exactly one entry, in the order written; nothing else is in the chain yet.
    with read_session(engine) as session:
        entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        events = list(session.scalars(select(Event).order_by(Event.id)))
    assert [entry.event_id for entry in entries] == [event.id for event in events]
    assert [entry.seq for entry in entries] == list(range(1, len(entries) + 1))
    assert all(entry.action == AuditAction.EVENT + event.kind for entry, event in zip(entries, events))
    assert "audit chain intact" in _verify(cli, code=0)
    logged = json.loads(cli("audit", "log", first, "--json").output)
    assert [line["action"] for line in logged][:3] == ["event:credit-set", "event:labelled", "event:assigned"]
    assert logged[0]["actor"] == "Ana Maintainer"
    assert logged[0]["detail"]["name"] == "Alice R"


def test_reads_by_show_and_exports_appear_in_the_log_with_the_maintainer(desk, cli, tmp_path):
    settings, engine, (first, second) = desk
    cli("show", first)
    cli("show", second, "--json")
    cli("advisory", first, "-o", str(tmp_path / "draft.json"))
    cli("credits", "--format", "json")
    logged = json.loads(cli("audit", "log", first, "--json").output)
    reads_of_first = [line for line in logged if line["action"].startswith("read:")]
    assert [line["action"] for line in reads_of_first] == [AuditAction.ADVISORY, AuditAction.SHOW]
    assert {line["actor"] for line in reads_of_first} == {"Ana Maintainer"}
    assert all(line["reference"] == first for line in logged)
    everything = json.loads(cli("audit", "log", "--json", "--limit", "3").output)
    assert [line["action"] for line in everything] == [AuditAction.CREDITS, AuditAction.ADVISORY, AuditAction.SHOW]
    assert everything[2]["reference"] == second
    assert "audit chain intact" in _verify(cli, code=0)


@SQLITE_ONLY
def test_a_backup_is_recorded_in_the_chain_it_copies(desk, cli, tmp_path):
    settings, engine, _ = desk
    cli("backup", str(tmp_path / "copy.db"))
    [line] = json.loads(cli("audit", "log", "--json", "--limit", "1").output)
    assert line["action"] == AuditAction.BACKUP and line["detail"] == {"path": str(tmp_path / "copy.db")}
    copy = make_engine(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        assert audit_verify.head(copy).seq == line["seq"]  # the copy holds its own record
        assert audit_verify.verify(copy).intact
    finally:
        copy.dispose()


def test_another_module_appends_its_own_entry_in_its_transaction(desk, cli):
    """What a purge calls: one entry, its detail digested, appended at commit."""
    settings, engine, (first, _) = desk
    with write_session(engine) as session:
        ticket = reads.find(session, first)
        audit.record(session, "purge", "intake", T0, ticket.id, items=["raw", "attachments"])
    [line] = [line for line in json.loads(cli("audit", "log", first, "--json").output) if line["action"] == "purge"]
    assert line["detail"] == {"items": ["raw", "attachments"]} and line["actor"] == "intake"
    _verify(cli, code=0)


def test_a_failed_transaction_appends_nothing(desk, cli):
    settings, engine, (first, _) = desk
    before = _count(engine, AuditEntry)
    with pytest.raises(RuntimeError), write_session(engine) as session:
        records.add_event(session, reads.find(session, first).id, EventKind.NOTE_ADDED, T0, actor="ana")
        raise RuntimeError("the change failed half-way")
    with write_session(engine) as session:  # the same pooled connection: nothing left queued on it
        pass
    assert _count(engine, AuditEntry) == before
    _verify(cli, code=0)


# -- an attacker with the database file --------------------------------------------------------


@SQLITE_ONLY
def test_editing_one_event_row_with_sqlite3_fails_verify_naming_it(desk, cli):
    settings, engine, refs = desk
    cli("assign", refs[0], "ana")
    _verify(cli, code=0)
    with _raw(settings) as raw:
        event_id, seq = raw.execute("SELECT e.id, a.seq FROM event e JOIN audit_entry a ON a.event_id = e.id "
                                    "WHERE e.kind = 'assigned'").fetchone()
        raw.execute("UPDATE event SET actor = 'someone-else' WHERE id = ?", (event_id,))
    output = _verify(cli, code=1)
    assert f"first bad: event {event_id} differs from what entry {seq} sealed" in output


@SQLITE_ONLY
def test_deleting_one_event_row_with_sqlite3_fails_verify_naming_it(desk, cli):
    settings, engine, _ = desk
    with _raw(settings) as raw:
        event_id, seq = raw.execute("SELECT event_id, seq FROM audit_entry ORDER BY seq LIMIT 1 OFFSET 2").fetchone()
        raw.execute("DELETE FROM event WHERE id = ?", (event_id,))
    assert f"first bad: event {event_id} sealed by entry {seq} is gone" in _verify(cli, code=1)


@SQLITE_ONLY
def test_an_event_inserted_with_sqlite3_fails_verify(desk, cli):
    settings, engine, _ = desk
    with _raw(settings) as raw:
        raw.execute("INSERT INTO event (ticket_id, at, actor, kind, detail) VALUES "
                    "(1, '2026-03-02 09:30:00.000000', 'ana', 'milestone', '{}')")
        inserted = raw.execute("SELECT max(id) FROM event").fetchone()[0]
    assert f"first bad: event {inserted} (milestone, ticket id 1) is in no audit entry" in _verify(cli, code=1)


@SQLITE_ONLY
def test_editing_an_audit_entry_fails_verify(desk, cli):
    settings, engine, _ = desk
    cli("show", desk[2][0])
    with _raw(settings) as raw:
        seq = raw.execute("SELECT max(seq) FROM audit_entry").fetchone()[0]
        raw.execute("UPDATE audit_entry SET actor = 'nobody' WHERE seq = ?", (seq,))
    assert f"first bad: entry {seq} was altered: its MAC does not match" in _verify(cli, code=1)


@SQLITE_ONLY
def test_reordering_two_entries_fails_verify(desk, cli):
    settings, engine, _ = desk
    with _raw(settings) as raw:
        raw.execute("UPDATE audit_entry SET seq = -1 WHERE seq = 2")
        raw.execute("UPDATE audit_entry SET seq = 2 WHERE seq = 3")
        raw.execute("UPDATE audit_entry SET seq = 3 WHERE seq = -1")
    assert "first bad: entry 2 does not follow entry 1" in _verify(cli, code=1)


@SQLITE_ONLY
def test_a_rebuilt_chain_without_the_key_fails_verify(desk, cli):
    """Someone with the database but not the key recomputes every MAC with a key of their own."""
    settings, engine, _ = desk
    forged_key = b"f" * 40
    with _raw(settings) as raw:
        raw.execute("UPDATE event SET actor = 'someone-else' WHERE id = 1")
    with write_session(engine) as session:
        prev = audit.GENESIS
        for entry in session.scalars(select(AuditEntry).order_by(AuditEntry.seq)):
            row = session.get(Event, entry.event_id)
            entry.digest = audit.event_digest(row)
            entry.prev_mac, entry.mac = prev, audit.entry_mac(forged_key, prev, entry.seq, entry)
            prev = entry.mac
    assert "first bad: entry 1 was altered: its MAC does not match" in _verify(cli, code=1)


@SQLITE_ONLY
def test_deleting_the_last_entry_is_caught_with_the_anchor(desk, cli, tmp_path):
    settings, engine, (first, _) = desk
    cli("show", first)  # the head is a read: no event goes missing with it
    anchor = tmp_path / "anchor.json"
    anchor.write_text(cli("audit", "anchor").output)
    head = json.loads(anchor.read_text())
    assert head["seq"] == _count(engine, AuditEntry) and len(head["mac"]) == 64
    assert "anchored entry" in _verify(cli, "--anchor", str(anchor), code=0)
    with _raw(settings) as raw:
        raw.execute("DELETE FROM audit_entry WHERE seq = ?", (head["seq"],))
    _verify(cli, code=0)  # without the anchor the shorter chain is a valid chain
    output = _verify(cli, "--anchor", str(anchor), code=1)
    assert f"first bad: the anchored entry {head['seq']} is gone (the chain ends at entry {head['seq'] - 1})" in output


@SQLITE_ONLY
def test_deleting_every_entry_fails_verify(desk, cli):
    settings, engine, _ = desk
    with _raw(settings) as raw:
        raw.execute("DELETE FROM audit_entry")
    assert "first bad: the chain is empty but was started at" in _verify(cli, code=1)


# -- the key and the start ----------------------------------------------------------------------


def test_a_database_from_before_the_chain_is_sealed_by_the_first_audit_run(desk, cli):
    settings, engine, _ = desk
    events = _count(engine, Event)
    with engine.begin() as connection:  # as the migration leaves it: events, no chain
        connection.execute(delete(AuditEntry))
        connection.execute(delete(ServiceSecret).where(ServiceSecret.name.like("audit-%")))
    result = cli("audit", "verify")
    assert f"sealed the {events} event(s) stored before it" in result.stderr
    assert "audit chain intact" in result.output
    logged = json.loads(cli("audit", "log", "--json").output)
    assert {line["action"] for line in logged} == {f"sealed:{kind}" for kind in ("opened", "acknowledgement-queued")}
    assert "sealed" not in cli("audit", "verify").stderr  # once


def test_a_process_with_another_key_or_none_is_refused(desk, cli, monkeypatch):
    settings, engine, (first, _) = desk
    (Path(os.environ["CREDENTIALS_DIRECTORY"]) / "audit-key").write_text("x" * 40)
    assert "MAC'd with another key" in cli("show", first, code=78).stderr
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert "this process has none" in cli("audit", "verify", code=78).stderr


def test_key_file_and_check_config_warning(cli, config_file, monkeypatch, make_settings):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    make_settings()
    assert "no audit key" not in cli("check-config").stderr  # the development configuration is spared
    monkeypatch.setenv("INTAKE_INTAKE__DEVELOPMENT", "false")
    assert "no audit key" in cli("check-config").stderr
    (config_file.parent / "audit.key").write_text("short")
    monkeypatch.setenv("INTAKE_AUDIT__KEY_FILE", "audit.key")
    assert "at least 32" in cli("check-config", code=78).stderr
    (config_file.parent / "audit.key").write_text(KEY)
    assert "no audit key" not in cli("check-config").stderr


# -- PostgreSQL: two writers -------------------------------------------------------------------


@pytest.mark.postgres
def test_two_postgresql_writers_appending_at_once_keep_one_linear_chain(postgres_server, postgres_template, monkeypatch):
    from conftest import _fresh_postgres_database

    url, drop = _fresh_postgres_database(postgres_server, postgres_template)
    monkeypatch.setenv("INTAKE_AUDIT_KEY", KEY)
    engines = [make_engine(url), make_engine(url)]
    try:
        ticket_id = _a_ticket(engines[0])
        start = threading.Barrier(2)
        failures: list[BaseException] = []

        def write(engine, name: str) -> None:  # type: ignore[no-untyped-def]
            try:
                start.wait(10)
                for number in range(40):
                    with write_session(engine) as session:
                        records.add_event(session, ticket_id, EventKind.NOTE_ADDED, T0, actor=name, n=number)
                        records.add_event(session, ticket_id, EventKind.NOTE_ADDED, T0, actor=name, n=number)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)

        threads = [threading.Thread(target=write, args=(engine, f"writer{i}")) for i, engine in enumerate(engines)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures
        with read_session(engines[0]) as session:
            entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        assert [entry.seq for entry in entries] == list(range(1, len(entries) + 1))
        assert all(entry.prev_mac == before.mac for before, entry in zip(entries, entries[1:]))
        assert len({entry.actor for entry in entries if entry.actor.startswith("writer")}) == 2
        assert audit_verify.verify(engines[0]).intact
    finally:
        for engine in engines:
            engine.dispose()
        drop()


def _a_ticket(engine) -> int:  # type: ignore[no-untyped-def]
    with write_session(engine) as session:
        ticket = Ticket(reference="SEC-2026-0001", subject="s", reporter="a@b.test", intake_address="security@example.com",
                        policy="vaixus", received_at=T0, created_at=T0, updated_at=T0)
        session.add(ticket)
        session.flush()
        return ticket.id


def test_db_upgrade_seals_the_events_of_a_database_from_before_the_chain(desk, cli):
    settings, engine, _ = desk
    events = _count(engine, Event)
    with engine.begin() as connection:  # the events of revision 0007, and no chain
        connection.execute(delete(AuditEntry))
        connection.execute(delete(ServiceSecret).where(ServiceSecret.name.like("audit-%")))
    assert f"audit chain started: the {events} event(s) stored before it sealed" in cli("db", "upgrade").output
    assert "sealed" not in cli("db", "upgrade").output
    assert _count(engine, AuditEntry) == events


@SQLITE_ONLY
def test_reading_an_attachment_or_a_held_message_is_recorded(desk, cli, tmp_path):
    settings, engine, _ = desk
    with_file = report(subject="PoC attached", sender="dave@researcher.test")
    with_file.add_attachment(b"exploit", maintype="application", subtype="octet-stream", filename="poc.bin")
    spam = report(subject="Cheap pills", sender="spam@spam.test", X_Spam_Flag="YES")
    inbound.store(engine, [inbound.Arrival(sender, ["security@example.com"], "127.0.0.1:1", "client.test",
                                           message.as_bytes(), T0 + timedelta(minutes=10))
                           for sender, message in (("dave@researcher.test", with_file), ("spam@spam.test", spam))])
    [reference] = process(settings, engine, T0 + timedelta(minutes=11)).tickets_opened
    cli("attachment", reference, "1", "-o", str(tmp_path / "poc.bin"))
    held_id = max(message["id"] for message in json.loads(cli("messages", "--json").output))
    cli("messages", "show", str(held_id))
    newest, before = json.loads(cli("audit", "log", "--json", "--limit", "2").output)
    assert (newest["action"], newest["detail"], newest["reference"]) == (AuditAction.MESSAGE, {"message": held_id}, None)
    assert (before["action"], before["reference"], before["detail"]["number"]) == (AuditAction.ATTACHMENT, reference, 1)
    assert before["actor"] == newest["actor"] == "Ana Maintainer"


def test_a_chain_under_the_databases_key_moves_to_the_configured_one(desk, cli, monkeypatch):
    """An installation upgraded before it had a key: sealed under the key kept in the database."""
    settings, engine, (first, _) = desk
    credentials = os.environ["CREDENTIALS_DIRECTORY"]
    with engine.begin() as connection:
        connection.execute(delete(AuditEntry))
        connection.execute(delete(ServiceSecret).where(ServiceSecret.name.like("audit-%")))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    cli("show", first)  # sealed, and the read appended, under the database's own key
    assert "no key is given" in cli("audit", "rekey", code=1).stderr
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", credentials)
    assert "MAC'd with another key" in cli("show", first, code=78).stderr
    entries = _count(engine, AuditEntry)
    assert f"{entries} entries re-MAC'd" in cli("audit", "rekey").output
    assert "audit chain intact" in cli("audit", "verify").output
    [line] = json.loads(cli("audit", "log", "--json", "--limit", "1").output)
    assert (line["action"], line["actor"]) == (audit.REKEYED, "Ana Maintainer")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")  # the database's key is gone with the move
    assert "this process has none" in cli("show", first, code=78).stderr


def test_a_long_running_writer_is_refused_once_the_chain_moves_to_another_key(desk, monkeypatch):
    """The key is checked against the chain in every appending transaction, not once per engine
    (a worker keeps its engine for days): a move to another key stops its very next append."""
    settings, engine, (first, _) = desk
    with read_session(engine) as session:
        ticket_id = reads.find(session, first).id
    for number in range(3):  # one engine, several transactions of several events each
        with write_session(engine) as session:
            for _ in range(2):
                records.add_event(session, ticket_id, EventKind.NOTE_ADDED, T0, actor="worker", n=number)
    assert audit_verify.verify(engine).intact
    with write_session(engine) as session:  # as `intake audit rekey` to another key leaves it
        audit.take_key(session, b"n" * 40)
    entries = _count(engine, AuditEntry)
    with pytest.raises(audit.AuditKeyError, match="another key"):
        with write_session(engine) as session:
            records.add_event(session, ticket_id, EventKind.NOTE_ADDED, T0, actor="worker", n=99)
    assert _count(engine, AuditEntry) == entries  # nothing appended, the event rolled back with it
