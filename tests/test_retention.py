"""Retention with encryption off: `intake purge` erases a closed ticket's content (report, attachment,
stored mail, outgoing mail), keeps its metadata and a legal-hold ticket's content, and leaves the
canary in no byte of the SQLite file, its -wal and -shm; held messages and sent mail go at their own
times; PostgreSQL's rows no longer hold it. Real listener, real outbox to a real SMTP sink."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select, text

from conftest import all_tickets, deliver_outbox, process, report, smtp_send
from intake.config import production
from intake.run import scheduler
from intake.store import reclaim, schema
from intake.store.db import make_engine, read_session, sqlite_file, wal_size, write_session
from intake.store.models import Event, InboundMessage, Outbox, PurgeLog, ReferenceCounter, ThreadEntry
from intake.tickets import held, retention
from intake.vocabulary import EventKind, OutboxStatus, PurgeKind
from test_schema import reflected_insert

CANARY = "Zq7-canary-4f1e9b-retention"
KEPT = "Hx2-kept-8c3d0a-legalhold"  # in the ticket under legal hold: must survive


def _report_with_attachment(canary: str, sender: str) -> EmailMessage:
    """A report quoting *canary* in its subject, its text, a text attachment and (base64) a binary one."""
    message = report(subject=f"Login bypass {canary}", sender=sender,
                     body=f"Steps to reproduce:\n1. send {canary} as the password\n")
    message.add_attachment(f"curl -d pw={canary} https://example.com/login\n", filename=f"poc-{canary}.sh")
    message.add_attachment(((canary + "\n") * 40).encode(), maintype="application", subtype="octet-stream",
                           filename="dump.bin")
    return message


def _needles(canary: str) -> list[bytes]:
    """The canary as stored: its bytes, and its base64 at each of the three alignments."""
    raw = canary.encode()
    found = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        start = -(-shift // 3) * 4  # the first base64 character made of canary bytes only
        end = (shift + len(raw)) // 3 * 4
        found.append(encoded[start:end])
    return found


def _database_bytes(url: str) -> bytes:
    """Every byte of the SQLite database, its WAL and its shared-memory file."""
    database = sqlite_file(url)
    assert database is not None
    return b"".join(Path(f"{database}{suffix}").read_bytes() for suffix in ("", "-wal", "-shm")
                    if Path(f"{database}{suffix}").exists())


def _rows_text(engine) -> str:  # type: ignore[no-untyped-def]
    """Every live row of every table, as text (PostgreSQL: what the database still returns)."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in metadata.sorted_tables
                         for row in connection.execute(table.select()))


@pytest.fixture
def mail_settings(make_settings, sink):  # type: ignore[no-untyped-def]
    """Outbound over SMTP to the sink; new-ticket notices (the report's text) to a maintainer."""
    return make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                         INTAKE_SCHEDULER__RECIPIENTS='["team@example.com"]')


def test_purge_erases_a_closed_tickets_content_from_every_byte_and_keeps_its_metadata(
        mail_settings, start_intake_listener, sink, cli, database_url):
    settings = mail_settings
    listener = start_intake_listener(settings)
    engine = listener.engine
    smtp_send(listener.port, _report_with_attachment(CANARY, "alice@researcher.test"))
    smtp_send(listener.port, _report_with_attachment(KEPT, "bob@researcher.test"), mail_from="bob@researcher.test")
    listener.stop()
    started = datetime.now(timezone.utc)
    process(settings, engine, started)
    assert deliver_outbox(settings, engine, started)["sent"] >= 4  # two acknowledgements, two notices
    assert any(CANARY.encode() in m.data for m in sink.messages)  # the notice mailed the report's text
    purged, kept = (t.reference for t in all_tickets(engine))
    # --quiet: no closing update left pending in the outbox (it would be sent long before a purge).
    cli("close", purged, "--reason", "invalid", "--quiet")
    cli("label", kept, "legal-hold")
    cli("close", kept, "--reason", "out-of-scope", "--quiet")
    assert cli("attachment", purged, "1", "-o", "-").output.count(CANARY) == 1
    is_sqlite = engine.dialect.name == "sqlite"
    if is_sqlite:  # the test can fail: before the purge the canary is in the files, plain and in base64
        assert all(needle in _database_bytes(database_url) for needle in _needles(CANARY)[:2])
    later = (datetime.now(timezone.utc) + timedelta(days=366)).isoformat()

    dry = json.loads(cli("purge", "--dry-run", "--json", "--now", later).output)
    assert (dry["tickets"]["purged"], dry["tickets"]["legal_hold"]) == ([purged], [kept])
    assert dry["sent_mail"]["by_kind"] == {"acknowledgement": 1, "new-ticket": 1} and dry["reclaimed"] is None
    assert CANARY in _rows_text(engine)  # a dry run changes nothing
    with read_session(engine) as session:
        assert not session.scalars(select(PurgeLog)).all()

    done = cli("purge", "--now", later).output
    assert f"purged 1: {purged}" in done and f"kept by legal hold (label legal-hold): {kept}" in done

    if is_sqlite:
        everything = _database_bytes(database_url)
        assert not [needle for needle in _needles(CANARY) if needle in everything]
        assert KEPT.encode() in everything
        assert "wal_checkpoint(TRUNCATE)" in done
    else:
        assert "VACUUM thread_entry" in done and "note: PostgreSQL" in done
    rows = _rows_text(engine)
    assert CANARY not in rows and KEPT in rows

    shown = cli("show", purged).output
    assert "content purged on" in shown and "state closed" in shown and "attachment 1: (purged) (" in shown, shown
    assert "Steps to reproduce" not in shown
    detail = json.loads(cli("show", purged, "--json").output)
    assert detail["reference"] == purged and detail["close_reason"] == "invalid" and detail["content_purged_at"]
    assert [e["direction"] for e in detail["thread"]] == ["in", "out"]  # the entries stay, emptied
    assert all(e["body"] == "" and e["subject"] == "" for e in detail["thread"])
    assert detail["thread"][0]["attachments"][0].keys() == {"index", "content_type", "size", "number"}
    assert [s["stage"] for s in detail["stages"]]  # its deadlines stay
    purge_event = next(e for e in detail["events"] if e["kind"] == EventKind.CONTENT_PURGED)
    assert purge_event["detail"]["entries"] == 2 and purge_event["detail"]["messages"] == 1
    assert "purged" in cli("attachment", purged, "1", "-o", "-", code=1).output
    assert KEPT in cli("show", kept).output  # legal hold: untouched
    with read_session(engine) as session:
        logs = {log.kind: (log.total, log.by_decision) for log in session.scalars(select(PurgeLog))}
        assert logs[PurgeKind.TICKET_CONTENT] == (1, {"invalid": 1})

    again = json.loads(cli("purge", "--json", "--now", later).output)  # idempotent
    assert again["tickets"]["purged"] == [] and again["tickets"]["legal_hold"] == [kept]
    assert again["held"]["total"] == 0 and again["sent_mail"]["total"] == 0 and again["reclaimed"] is None
    with read_session(engine) as session:
        assert len(session.scalars(select(PurgeLog)).all()) == len(logs)
        assert len(session.scalars(select(Event).where(Event.kind == EventKind.CONTENT_PURGED)).all()) == 1


def _spam() -> bytes:
    return (b"From: s@spam.test\r\nTo: security@example.com\r\nSubject: pills\r\nX-Spam-Flag: YES\r\n"
            b"Message-ID: <spam1@spam.test>\r\n\r\nbuy " + CANARY.encode() + b"\r\n")


def test_held_messages_and_sent_mail_go_at_their_own_times_and_open_tickets_never(
        mail_settings, start_intake_listener, cli):
    settings = mail_settings
    listener = start_intake_listener(settings)
    engine = listener.engine
    smtp_send(listener.port, report(body=f"open report {CANARY}"))
    smtp_send(listener.port, _spam(), mail_from="s@spam.test")
    listener.stop()
    now = datetime.now(timezone.utc)
    process(settings, engine, now)
    deliver_outbox(settings, engine, now)

    def purge_at(days: int) -> retention.PurgeReport:
        return retention.purge(engine, settings, now + timedelta(days=days))

    early = purge_at(10)
    assert (early.held.total, early.sent_mail.by_kind, early.tickets.purged) == (0, {}, [])
    month = purge_at(31)  # sent mail's 30 days passed, held's 90 not
    assert month.sent_mail.by_kind == {"acknowledgement": 1, "new-ticket": 1} and month.held.total == 0
    with read_session(engine) as session:
        assert {len(raw) for raw in session.scalars(select(Outbox.raw).where(
            Outbox.status == OutboxStatus.SENT))} == {0}
        assert session.scalar(select(InboundMessage.id).where(InboundMessage.decision == "spam")) is not None
    quarter = purge_at(91)
    assert quarter.held.by_decision == {"spam": 1} and quarter.tickets.purged == []
    with read_session(engine) as session:
        assert session.scalar(select(InboundMessage.id).where(InboundMessage.decision == "spam")) is None
        bodies = list(session.scalars(select(ThreadEntry.body_text)))
    assert any(CANARY in body for body in bodies)  # the ticket is open: years later, still whole
    assert purge_at(3650).tickets.purged == []
    # `intake messages purge` is the held-only alias, from [retention] held unless --older-than.
    assert cli("messages", "purge", "--now", (now + timedelta(days=91)).isoformat()).output.startswith(
        "purged 0 held message(s)")


def test_never_keeps_everything_and_the_settings_are_checked(make_settings):
    settings = make_settings(INTAKE_RETENTION__AFTER_CLOSE="never", INTAKE_RETENTION__HELD="never",
                             INTAKE_RETENTION__SENT_MAIL="never")
    engine = make_engine(settings.database_url)
    report_ = retention.purge(engine, settings, datetime.now(timezone.utc) + timedelta(days=9999))
    assert (report_.tickets, report_.held, report_.sent_mail, report_.reclaimed) == (None, None, None, None)
    jobs = scheduler.build_scheduler(engine, settings)  # nothing to purge: no daily job
    assert "purge" not in {job.id for job in jobs.get_jobs()}
    production_like = make_settings(INTAKE_INTAKE__DEVELOPMENT="false", INTAKE_RETENTION__HELD="never")
    assert [w for w in production.warnings(production_like) if w.startswith("[retention] held unset")]
    from intake.config.settings import ConfigError

    for key, value in (("INTAKE_RETENTION__AFTER_CLOSE", "2 business days"), ("INTAKE_RETENTION__HELD", "soon"),
                       ("INTAKE_RETENTION__LEGAL_HOLD_LABEL", "Legal Hold")):
        with pytest.raises(ConfigError, match="retention"):
            make_settings(**{key: value})
    assert make_settings().retention.period("after_close") == timedelta(days=365)  # the shipped config's


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_rewrite_leaves_no_old_row_version_holding_the_canary(make_settings, database_url, request):
    """VACUUM FULL (`intake purge --rewrite`) on PostgreSQL, read from the table's pages: no old row
    version holds the canary. (Plain VACUUM does not zero freed space; whether the dead version's
    bytes survive it depends on whether page compaction happens to write over them.)"""
    engine = make_engine(database_url)
    request.addfinalizer(engine.dispose)
    with engine.begin() as connection:
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS pageinspect"))
        connection.execute(Outbox.__table__.insert().values(
            dedupe_key="k", kind="acknowledgement", envelope_from="", recipients=["a@b.test"], message_id="<m@x>",
            raw=CANARY.encode() * 3, status=OutboxStatus.SENT, created_at=datetime(2020, 1, 1, tzinfo=timezone.utc),
            next_attempt_at=datetime(2020, 1, 1, tzinfo=timezone.utc),
            sent_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
    settings = make_settings()

    def pages_hold_canary() -> bool:
        with engine.connect() as connection:
            pages = connection.execute(text("SELECT pg_relation_size('outbox') / current_setting('block_size')::int"))
            return any(CANARY.encode() in bytes(connection.execute(text(
                f"SELECT get_raw_page('outbox', {page})")).scalar_one()) for page in range(pages.scalar_one()))

    assert pages_hold_canary()
    plain = retention.purge(engine, settings, datetime.now(timezone.utc))
    assert plain.sent_mail.by_kind == {"acknowledgement": 1} and plain.reclaimed.ran == [
        "VACUUM thread_entry, inbound_message, inbound_raw, outbox, ticket"]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT length(raw) FROM outbox")).scalar_one() == 0
    full = retention.purge(engine, settings, datetime.now(timezone.utc), rewrite=True)
    assert full.reclaimed.ran == ["VACUUM FULL thread_entry, inbound_message, inbound_raw, outbox, ticket"]
    assert not pages_hold_canary()


def test_a_reader_keeping_old_wal_frames_is_reported_and_the_next_run_truncates(sqlite_url):
    engine = make_engine(sqlite_url, busy_timeout=0.1)  # each attempt waits for the reader this long
    reader = sqlite3.connect(str(sqlite_file(sqlite_url)))
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM ticket").fetchall()  # a snapshot from before the write below
        with write_session(engine) as session:
            session.execute(ReferenceCounter.__table__.insert().values(prefix="SEC", year=2026, last=1))
        held_up = reclaim.reclaim(engine, attempts=2, pause=0)
        assert held_up.incomplete and "2 attempts" in held_up.incomplete[0] and wal_size(engine) > 0
    finally:
        reader.close()
    done = reclaim.reclaim(engine, attempts=2, pause=0)
    assert (done.incomplete, done.ran, wal_size(engine)) == ([], ["wal_checkpoint(TRUNCATE), attempt 1"], 0)
    rewritten = reclaim.reclaim(engine, rewrite=True)
    assert rewritten.ran[0] == "VACUUM" and not rewritten.incomplete and wal_size(engine) == 0


def test_migration_0011_counts_earlier_purges_as_held_and_marks_no_ticket_purged(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        schema.upgrade(engine, "0007")
        at = datetime(2026, 3, 1, tzinfo=timezone.utc)
        with engine.begin() as connection:
            connection.execute(reflected_insert(connection, "purge_log"),
                               [{"purged_at": at, "cutoff": at, "total": 2, "by_decision": {"spam": 2}}])
        assert (schema.upgrade(engine).before, schema.current(engine)) == ("0007", schema.head())
        assert schema.differences(engine) == []
        with read_session(engine) as session:
            assert [log.kind for log in session.scalars(select(PurgeLog))] == [PurgeKind.HELD]
            assert held.purged_total(session) == 2
    finally:
        engine.dispose()
