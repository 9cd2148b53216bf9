"""Progress updates to the reporter through the real CLI: assessed, fix released, disclosure
scheduled, disclosed, closed. Reports come in over real SMTP; updates go out through the relay
transport to a real SMTP sink, threaded under the report, encrypted where the reporter has a key."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import datetime, timezone

import pysequoia
import pytest
from sqlalchemy import update

from conftest import deliver_outbox, process, report, smtp_send
from intake.store.db import write_session
from intake.store.models import Ticket
from intake.tickets import reads

POLICIES = """
[policies.coordinated]
title = "Example coordinated disclosure policy"
calendar = "utc"
auto_ack_counts = true

[[policies.coordinated.stages]]
name = "acknowledge"
duration = "1 days"

[[policies.coordinated.stages]]
name = "disclose"
duration = "7 days"
start = "event:released"

[policies.closing-only]
calendar = "utc"
auto_ack_counts = true
updates = ["closed"]

[[policies.closing-only.stages]]
name = "acknowledge"
duration = "1 days"
"""


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink):  # type: ignore[no-untyped-def]
    """Alice's report under "coordinated" (every update), Carol's under "closing-only"; the
    acknowledgements delivered and cleared from the sink. Extra settings as INTAKE_* overrides."""
    config_file.write_text(config_file.read_text() + POLICIES)

    def start(**env: str):  # type: ignore[no-untyped-def]
        return two_reports(make_settings, start_intake_listener, sink, "coordinated", "closing-only", **env)

    return start


def two_reports(make_settings, start_intake_listener, sink,  # type: ignore[no-untyped-def]
                policy: str, other_policy: str, **env: str):
    """The listener relaying to *sink*; Alice's report under *policy*, Carol's (to security+few@)
    under *other_policy*; their acknowledgements delivered and cleared from the sink. (settings,
    running listener, references)."""
    settings = make_settings(
        INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
        INTAKE_INTAKE__DEFAULT_POLICY=policy,
        INTAKE_INTAKE__POLICY_BY_ADDRESS=f'{{"security+few@example.com": "{other_policy}"}}', **env)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="SQL injection in search", message_id="<first@alice.test>"))
    smtp_send(running.port, report(subject="Open redirect", sender="carol@other.test",
                                   message_id="<second@carol.test>"),
              mail_from="carol@other.test", rcpt_tos=["security+few@example.com"])
    refs = process(settings, running.engine).tickets_opened
    deliver_outbox(settings, running.engine)
    sink.wait_for(2)
    sink.messages.clear()
    return settings, running, refs


def _sent(settings, running, sink) -> list[tuple[str, email.message.EmailMessage]]:  # type: ignore[no-untyped-def]
    """The mail the outbox delivers now: (recipient, parsed message) each."""
    before = len(sink.messages)
    sent = deliver_outbox(settings, running.engine).get("sent", 0)
    return [(mail.rcpt_tos[0], email.message_from_bytes(mail.data, policy=email.policy.default))
            for mail in sink.wait_for(before + sent)[before:]]


def _words(message: email.message.EmailMessage) -> str:
    """The text of *message*, its line breaks and runs of spaces made single spaces."""
    return " ".join(message.get_content().split())


def _updates(engine, reference: str) -> tuple[list[str], list[tuple[str, str]]]:  # type: ignore[no-untyped-def]
    """The updates recorded as queued, and those suppressed with the reason."""
    events = reads.ticket_detail(engine, reference).events
    return ([e.detail["update"] for e in events if e.kind == "progress-update-queued"],
            [(e.detail["update"], e.detail["reason"]) for e in events if e.kind == "update-suppressed"])


def test_each_update_reaches_the_reporter_once_threaded_from_the_intake_address(desk, cli, sink):
    settings, running, (first, _) = desk()
    cli("assess", first, "--severity", "high")
    [(to, assessed)] = _sent(settings, running, sink)
    assert to == "alice@researcher.test"
    assert assessed["From"].addresses[0].addr_spec == "security@example.com"
    assert assessed["Subject"] == f"Re: [{first}] SQL injection in search"
    assert assessed["In-Reply-To"] == "<first@alice.test>" and "<first@alice.test>" in assessed["References"]
    assert "rated its severity high." in _words(assessed)

    cli("released", first, "--version", "2.0.1", "--message", "Thanks for the quick retest, Alice.")
    released, scheduled = (_words(message) for _, message in _sent(settings, running, sink))
    assert "released in version 2.0.1" in released and "Thanks for the quick retest, Alice." in released
    assert "disclose the issue" in scheduled and "publicly on " in scheduled
    stages = json.loads(cli("show", first, "--json").output)["stages"]
    disclose_due = datetime.fromisoformat(next(s["due"] for s in stages if s["stage"] == "disclose"))
    assert f"{disclose_due:%d %b %Y}" in scheduled

    cli("disclose", first, "--advisory", "https://example.com/advisories/EX-2026-7")
    [(_, disclosed)] = _sent(settings, running, sink)
    assert "publicly disclosed: https://example.com/advisories/EX-2026-7" in _words(disclosed)

    cli("close", first, "--reason", "fixed")
    [(_, closed)] = _sent(settings, running, sink)
    assert "the issue is fixed." in _words(closed)
    assert "internal" not in _words(closed)

    # Repeated on purpose (forced, or after reopening): no second mail of any kind.
    cli("assess", first, "--severity", "critical", "--force")
    cli("released", first, "--version", "2.0.2", "--force")
    cli("reopen", first)
    cli("close", first, "--reason", "fixed")
    assert _sent(settings, running, sink) == []
    queued, suppressed = _updates(running.engine, first)
    assert queued == ["assessed", "fix-released", "disclosure-scheduled", "disclosed", "closed"]
    # (The disclose stage is met by then: no disclosure date to announce again.)
    assert suppressed == [("assessed", "already sent"), ("fix-released", "already sent"), ("closed", "already sent")]


@pytest.mark.parametrize("reason, words", [
    ("duplicate", "same issue as an earlier report"),
    ("invalid", "it is not a vulnerability"),
    ("out-of-scope", 'outside the scope of our security policy, "Example coordinated disclosure policy"'),
])
def test_closed_says_why_in_plain_words(desk, cli, sink, reason, words):
    settings, running, (first, _) = desk()
    cli("close", first, "--reason", reason)
    [(to, closed)] = _sent(settings, running, sink)
    assert to == "alice@researcher.test" and words in _words(closed)


def test_spam_gets_no_closing_update(desk, cli, sink):
    settings, running, (first, _) = desk()
    cli("close", first, "--reason", "spam")
    assert _sent(settings, running, sink) == []
    assert _updates(running.engine, first) == ([], [("closed", "closed as spam")])


def test_quiet_sends_nothing_and_is_recorded(desk, cli, sink):
    settings, running, (first, _) = desk()
    cli("assess", first, "--severity", "low", "--quiet")
    cli("released", first, "--quiet")
    assert _sent(settings, running, sink) == []
    assert _updates(running.engine, first) == ([], [("assessed", "--quiet"), ("fix-released", "--quiet"),
                                                     ("disclosure-scheduled", "--quiet")])


def test_a_policy_without_the_kind_sends_none(desk, cli, sink):
    settings, running, (_, second) = desk()
    cli("assess", second, "--severity", "medium")
    cli("released", second)
    assert _sent(settings, running, sink) == []
    cli("close", second, "--reason", "fixed")
    [(to, _)] = _sent(settings, running, sink)
    assert to == "carol@other.test"
    queued, suppressed = _updates(running.engine, second)
    assert queued == ["closed"]
    assert suppressed == [("assessed", "policy closing-only sends no assessed update"),
                          ("fix-released", "policy closing-only sends no fix-released update")]


def test_an_unreachable_reporter_gets_none(desk, cli, sink):
    settings, running, (first, _) = desk()
    with write_session(running.engine) as session:
        session.execute(update(Ticket).where(Ticket.reference == first)
                        .values(reporter_unreachable_at=datetime.now(timezone.utc)))
    cli("assess", first, "--severity", "high")
    cli("close", first, "--reason", "invalid")
    assert _sent(settings, running, sink) == []
    assert _updates(running.engine, first) == ([], [("assessed", "reporter unreachable"),
                                                     ("closed", "reporter unreachable")])


def test_an_update_is_encrypted_to_the_reporters_key(desk, cli, sink, tmp_path):
    org = pysequoia.Tsk.generate("Security <security@example.com>")
    alice = pysequoia.Tsk.generate("Alice Researcher <alice@researcher.test>")
    (tmp_path / "org.asc").write_text(str(org))
    (tmp_path / "alice.asc").write_text(str(alice.extract_certificate()))
    settings, running, (first, _) = desk(INTAKE_OPENPGP__KEY_FILE=str(tmp_path / "org.asc"))
    cli("key", first, str(tmp_path / "alice.asc"))
    cli("assess", first, "--severity", "high", "--message", "canary-personal-line")
    [(to, message)] = _sent(settings, running, sink)
    assert to == "alice@researcher.test" and message.get_content_type() == "multipart/encrypted"
    assert b"canary-personal-line" not in message.as_bytes()
    assert message["In-Reply-To"] == "<first@alice.test>"
