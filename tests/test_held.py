"""Held mail noticed: the digest's "Held since the last digest", the `intake_held_messages` gauge
over HTTP, `intake stats`, and the purge of old held messages with its count (and migration 0006)."""

from __future__ import annotations

import email
import email.policy
import json
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect, select, update

from conftest import process, report
from intake.config.sections import MetricsSection
from intake.run import metrics, readings
from intake.sla import digest, stats
from intake.store import inbound, schema
from intake.store.db import make_engine, read_session, write_session
from intake.store.models import InboundMessage, PurgeLog
from intake.tickets import held
from intake.understand.decisions import HANDLING
from intake.vocabulary import HELD_DECISIONS, InboundStatus
from test_digest import desk  # noqa: F401 - the fixture
from test_schema import FIRST_REVISION_ROWS, reflected_insert

UTC = timezone.utc
NOW = datetime(2026, 6, 10, 22, 0, tzinfo=UTC)  # Thu 11 Jun 08:00 Brisbane: the "morning" digest's time
# An upstream-flagged spam whose subject tries a header injection and a terminal escape, and is long.
HOSTILE_SUBJECT = "=?utf-8?q?Win=0D=0ABcc:_all@example.com_=1B[31mred_?= " + "x" * 600


def _store(engine, message: bytes, at: datetime, sender: str = "alice@researcher.test") -> int:  # type: ignore[no-untyped-def]
    [stored] = inbound.store(engine, [inbound.Arrival(sender, ["security@example.com"], "127.0.0.1", "test",
                                                      message, at)])
    return stored


def _spam(subject: str = "Cheap pills") -> bytes:
    return report(subject=subject, X_Spam_Flag="YES").as_bytes()


def _hostile_spam() -> bytes:
    return (b"From: Spammer <s@spam.test>\r\nTo: security@example.com\r\nSubject: " + HOSTILE_SUBJECT.encode()
            + b"\r\nX-Spam-Flag: YES\r\nMessage-ID: <hostile@spam.test>\r\n\r\nbuy\r\n")


def _auto_replied(subject: str = "Out of office") -> bytes:
    """Automatic mail that threads into no ticket."""
    return report(subject=subject, Auto_Submitted="auto-replied").as_bytes()


def _fail(engine, message_id: int) -> None:  # type: ignore[no-untyped-def]
    """What the processor leaves when it gives up on a message (no parse failure is easy to cause)."""
    with write_session(engine) as session:
        session.execute(update(InboundMessage).where(InboundMessage.id == message_id)
                        .values(status=InboundStatus.FAILED, decision=None, error="boom"))


def _seed(settings, engine, at: datetime) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """At *at*: a report (a ticket), a copy of it (duplicate), a hostile spam, an auto-reply
    threading nowhere and a message processing failed on, all processed at *at*."""
    original = report(subject="Real report", message_id=f"<real-{at.timestamp()}@researcher.test>").as_bytes()
    ids = {"report": _store(engine, original, at), "duplicate": _store(engine, original, at),
           "spam": _store(engine, _hostile_spam(), at, "s@spam.test"), "auto-reply": _store(engine, _auto_replied(), at),
           "failed": _store(engine, _spam("will fail"), at)}
    process(settings, engine, at)
    _fail(engine, ids["failed"])
    return ids


def test_held_decisions_are_those_handled_as_ignored():
    assert set(HELD_DECISIONS) == {kind for kind, handling in HANDLING.items()
                                   if handling.status == InboundStatus.IGNORED}


def test_the_digest_counts_held_mail_since_the_last_digest_and_names_the_spam_failed_and_unthreaded(
        desk, monkeypatch):  # noqa: F811
    before = _seed(desk.settings, desk.engine, NOW - timedelta(days=3))  # before the last digest's period
    ids = _seed(desk.settings, desk.engine, NOW - timedelta(hours=2))
    built = digest.build(desk.engine, desk.settings, "morning", NOW)
    assert built.since == NOW - timedelta(days=1)  # Wednesday's 08:00 Brisbane
    section = {s.key: s for s in built.sections}["held"]
    assert section.counts == {"auto-reply": 1, "duplicate": 1, "failed": 1, "spam": 1}
    assert section.total == 4 and section.listable == 3 and section.more == 0
    assert stats.compute(desk.engine, built.since, NOW).held == section.counts  # `intake stats` agrees
    named = [line.reference for line in section.lines]
    assert sorted(named) == sorted(f"message {ids[key]}" for key in ("spam", "auto-reply", "failed"))
    assert not {f"message {value}" for value in before.values()} & set(named)
    [spam] = [line for line in section.lines if line.reference == f"message {ids['spam']}"]
    assert spam.subject.startswith("Win") and "Bcc: all@example.com" in spam.subject
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in spam.subject)  # one line, no ESC
    assert len(spam.subject) <= held.SUBJECT_LIMIT and spam.detail.startswith("spam, from <s@spam.test>")
    assert not built.empty
    text = digest.text(desk.settings, built)
    assert "Held since the last digest (4)" in text
    assert "by decision: " in text and "spam 1" in text and f"message {ids['auto-reply']}  Out of office" in text
    mail = email.message_from_bytes(digest.render(desk.settings, built, ["team@example.com"]).raw,
                                    policy=email.policy.default)
    html = mail.get_body(("html",)).get_content()
    assert "Held since the last digest" in html and "\x1b" not in html
    assert built.as_dict()["sections"]["held"]["counts"]["failed"] == 1
    # At most HELD_LIMIT are named, the rest counted.
    monkeypatch.setattr(digest, "HELD_LIMIT", 1)
    limited = {s.key: s for s in digest.build(desk.engine, desk.settings, "morning", NOW).sections}["held"]
    assert (len(limited.lines), limited.more) == (1, 2)
    assert "... and 2 more" in digest.text(desk.settings, digest.build(desk.engine, desk.settings, "morning", NOW))


def test_the_held_gauge_counts_the_last_week_per_decision_over_http(make_settings):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    _seed(settings, engine, NOW - timedelta(days=8))  # outside the window
    _seed(settings, engine, NOW - timedelta(days=1))
    _store(engine, _spam("another"), NOW - timedelta(hours=1))
    process(settings, engine, NOW - timedelta(hours=1))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics.DatabaseCollector(engine, clock=lambda: NOW))
    server = metrics.MetricsServer(MetricsSection(listen="127.0.0.1:0"), registry, health=None)  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    gauge = {sample.labels["decision"]: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples if sample.name == "intake_held_messages"}
    assert gauge == {"spam": 2, "auto-reply": 1, "duplicate": 1, "failed": 1, "bounce": 0, "loop": 0, "rejected": 0}
    assert readings.HELD_WINDOW == timedelta(days=7)


def test_purge_deletes_only_old_held_mail_on_no_ticket_and_keeps_the_count(make_settings, cli):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    old = _seed(settings, engine, NOW - timedelta(days=100))
    recent = _seed(settings, engine, NOW - timedelta(days=10))
    # Received long ago, processed only now (an import of history): not purged yet.
    imported = _store(engine, _spam("old history"), NOW - timedelta(days=300))
    process(settings, engine, NOW)

    dry = held.purge_held(engine, NOW, timedelta(days=90), dry_run=True)
    assert dry.by_decision == {"spam": 1, "auto-reply": 1, "failed": 1} and dry.dry_run
    with read_session(engine) as session:
        assert held.purged_total(session) == 0
        assert session.scalar(select(InboundMessage.id).where(InboundMessage.id == old["spam"])) == old["spam"]
    cli_dry = json.loads(cli("messages", "purge", "--dry-run", "--json", "--now", NOW.isoformat()).output)
    assert cli_dry["total"] == 3 and cli_dry["dry_run"]

    purged = held.purge_held(engine, NOW, timedelta(days=90), batch=2)  # two batches: the log row follows both
    assert purged.by_decision == {"spam": 1, "auto-reply": 1, "failed": 1} and purged.complete
    with read_session(engine) as session:
        left = set(session.scalars(select(InboundMessage.id)))
        [log] = session.scalars(select(PurgeLog)).all()
        assert held.purged_total(session) == 3
    assert left == {old["report"], old["duplicate"], imported, *recent.values()}  # a ticket's and a named one kept
    assert (log.total, log.by_decision, log.purged_at, log.cutoff) == (
        3, {"auto-reply": 1, "failed": 1, "spam": 1}, NOW, NOW - timedelta(days=90))

    again = cli("messages", "purge", "--now", NOW.isoformat()).output  # idempotent: nothing more, no new row
    assert again.startswith("purged 0 held message(s)")
    assert stats.compute(engine, NOW - timedelta(days=30), NOW).purged == 3
    figures = json.loads(cli("stats", "--json").output)
    assert figures["purged"] == 3 and "held" in figures
    # A shorter age reaches the recent ones.
    assert "purged 3 held message(s)" in cli("messages", "purge", "--older-than", "7d", "--now", NOW.isoformat()).output
    cli("messages", "purge", "--older-than", "soon", code=2)


def test_migration_0006_adds_the_purge_log_and_the_held_index(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        schema.upgrade(engine, "0005")
        with engine.begin() as connection:
            row = FIRST_REVISION_ROWS["inbound_message"][0]
            connection.execute(reflected_insert(connection, "inbound_message"),
                               [{name: value for name, value in row.items() if name != "id"}
                                | {"status": "ignored", "decision": "spam", "ticket_id": None}])
        assert (schema.upgrade(engine).before, schema.current(engine)) == ("0005", schema.head())
        assert schema.differences(engine) == []
        assert "ix_inbound_status_processed_at" in {index["name"] for index in inspect(engine).get_indexes(
            "inbound_message")}
        # The message stored before 0006 is held, and purged with its count logged.
        result = held.purge_held(engine, row["processed_at"] + timedelta(days=91), timedelta(days=90))
        assert result.by_decision == {"spam": 1}
        with read_session(engine) as session:
            assert held.purged_total(session) == 1
    finally:
        engine.dispose()
