"""`intake import`: the public corpus packed as an mbox and as a Maildir goes in once, with exact
counts, sends nothing to the relay, and a second import adds nothing; threads are rebuilt in
Date order; --acknowledge answers only the recent reports."""

from __future__ import annotations

import json
import mailbox
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import CORPUS, all_tickets, deliver_outbox, report
from intake.store.db import make_engine, read_session
from intake.store.models import InboundMessage
from intake.vocabulary import InboundStatus

SAMPLES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in {".eml", ".txt", ""}
                 and not p.name.startswith(("LICENSE", "COPYING", "NOTICE", "README")))
MAINTAINERS = """
[[maintainers]]
name = "Ana Maintainer"
email = "ana@maintainers.test"
"""
# Corpus samples packed a second time: the box holds a few hundred messages, these duplicates.
REPEATED = 100


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings(make_settings, config_file, sink):  # type: ignore[no-untyped-def]
    """Mail goes out over SMTP to the sink: whatever an import sends would land there."""
    config_file.write_text(config_file.read_text() + MAINTAINERS)
    return make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")


def _pack(kind: str, folder: Path, messages: list[bytes]) -> Path:
    """*messages* in a new mbox file or Maildir folder, in that order."""
    path = folder / ("box.mbox" if kind == "mbox" else "Maildir")
    box = mailbox.mbox(path) if kind == "mbox" else mailbox.Maildir(path)
    for message in messages:
        box.add(message)
    box.flush()
    return path


def _import(cli, path: Path, *options: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return json.loads(cli("import", str(path), "--json", *options).output)


def _stored(settings) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Stored messages, and how many of them failed."""
    with read_session(make_engine(settings.database_url)) as session:
        total = session.scalar(select(func.count()).select_from(InboundMessage))
        failed = session.scalar(select(func.count()).where(InboundMessage.status == InboundStatus.FAILED))
    return total, failed


@pytest.mark.skipif(not SAMPLES, reason=f"no corpus at {CORPUS}")
@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_a_corpus_mailbox_imports_once_with_exact_counts_and_sends_nothing(kind, settings, cli, sink, tmp_path):
    messages = [path.read_bytes() for path in SAMPLES] + [path.read_bytes() for path in SAMPLES[:REPEATED]]
    path = _pack(kind, tmp_path, messages)

    first = _import(cli, path)

    assert first["imported"] + first["duplicates"] + first["failed"] == len(messages)
    assert first["duplicates"] >= REPEATED  # every repeated sample, and samples sharing a Message-ID
    assert first["held"] <= first["imported"] and first["tickets"] <= first["imported"] - first["held"]
    assert first["tickets"] > 0 and first["held"] > 0  # the corpus has reports, bounces and spam
    assert first["open_tickets"] == first["tickets"]  # nothing in history closes a ticket
    total, failed = _stored(settings)
    assert total == first["imported"] + failed and failed == first["failed"]  # nothing is unreadable here

    second = _import(cli, path)
    assert second == {"imported": 0, "duplicates": len(messages), "held": 0, "failed": 0, "tickets": 0,
                      "acknowledged_by_replies": 0, "open_tickets": 0, "stages_past_due": 0, "close_hint": None}
    assert _stored(settings)[0] == total

    assert deliver_outbox(settings, make_engine(settings.database_url)).get("sent", 0) == 0
    assert sink.messages == []


def _mail(subject: str, sender: str, date: datetime, message_id: str, **headers: str) -> bytes:
    message = report(subject=subject, sender=sender, message_id=message_id, **headers)
    message["Date"] = format_datetime(date)
    return message.as_bytes()


def test_a_reply_stored_before_its_report_threads_into_the_ticket_the_report_opens(settings, cli, sink, tmp_path):
    reported = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    reply = _mail("Re: SQL injection in search", "carol@researcher.test", reported + timedelta(days=2),
                  "<reply@researcher.test>", In_Reply_To="<report@researcher.test>")
    original = _mail("SQL injection in search", "carol@researcher.test", reported, "<report@researcher.test>")
    path = _pack("mbox", tmp_path, [reply, original])

    counts = _import(cli, path)
    assert {key: counts[key] for key in ("imported", "duplicates", "held", "failed", "tickets", "open_tickets",
                                         "stages_past_due")} == {"imported": 2, "duplicates": 0, "held": 0,
                                                                 "failed": 0, "tickets": 1, "open_tickets": 1,
                                                                 "stages_past_due": 1}

    [ticket] = all_tickets(make_engine(settings.database_url))
    assert ticket.received_at == reported and ticket.reference.startswith("SEC-2026-")
    with read_session(make_engine(settings.database_url)) as session:
        assert set(session.scalars(select(InboundMessage.ticket_id))) == {ticket.id}
    assert deliver_outbox(settings, make_engine(settings.database_url)).get("sent", 0) == 0
    assert sink.messages == []


def test_acknowledge_answers_only_the_reports_younger_than_the_cutoff(settings, cli, sink, tmp_path):
    now = datetime.now(timezone.utc)
    old = _mail("Old: open redirect", "old@researcher.test", now - timedelta(days=30), "<old@researcher.test>")
    recent = _mail("Recent: CSRF on settings", "new@researcher.test", now - timedelta(hours=3),
                   "<new@researcher.test>")
    path = _pack("maildir", tmp_path, [recent, old])

    counts = _import(cli, path, "--acknowledge", "--younger-than", "7d")

    assert counts["tickets"] == 2
    deliver_outbox(settings, make_engine(settings.database_url))
    to_reporters = [m for m in sink.wait_for(2) if not m.rcpt_tos[0].endswith("@maintainers.test")]
    assert [m.rcpt_tos for m in to_reporters] == [["new@researcher.test"]]
    assert re.search(rb"Auto-Submitted: auto-replied", to_reporters[0].data)
    # The recent report's new-ticket notice, none for the old one.
    assert [m.rcpt_tos for m in sink.messages if m not in to_reporters] == [["ana@maintainers.test"]]


def test_anything_but_an_mbox_or_a_maildir_is_refused(settings, cli, tmp_path):
    (tmp_path / "notes.txt").write_text("just some notes\n")
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "notes.txt", tmp_path / "folder", tmp_path / "missing"):
        result = cli("import", str(path), code=2)
        assert str(path) in result.output
    cli("import", str(tmp_path / "folder"), "--acknowledge", code=2)
