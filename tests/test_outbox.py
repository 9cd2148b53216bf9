"""The outbox against a real relay (the aiosmtpd `sink`), a closed port, and a real Maildir:
delivery, retries with backoff, dead letters, TLS to the relay, leases and dedupe.

Time is driven by passing ``now``; nothing here sleeps to wait for a retry."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import ssl
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import func, select
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from conftest import free_port, process, report, smtp_send
from intake.send import outbox
from intake.send.composer import OutgoingMail
from intake.send.outbox import Delivery, OutboxSender, make_transport
from intake.store import inbound, schema
from intake.store.db import make_engine, read_session, write_session
from intake.store.inbound import Arrival
from intake.store.models import Outbox
from intake.tickets import undeliverable

INTAKE = Path(sys.executable).parent / "intake"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)



def test_an_idle_outbox_opens_no_session_with_the_relay(make_settings, sink):
    """Polling with nothing due must not EHLO and QUIT the relay every few seconds (a smarthost
    counts those sessions); mail that comes due gets exactly one session."""
    settings = make_settings(**relay_env(sink.port), INTAKE_OUTBOUND__POLL_INTERVAL="0.05")
    engine = engine_for(settings)
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)

    async def scenario() -> tuple[int, int, int]:
        stop, wake = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(sender.run(stop, wake))
        await asyncio.sleep(0.6)  # a dozen polls with nothing due
        idle = sink.handler.sessions
        enqueue(engine, outgoing(1), now=datetime.now(timezone.utc))
        wake.set()
        for _ in range(200):
            if sink.messages:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # idle again
        stop.set()
        await running
        return idle, len(sink.messages), sink.handler.sessions

    assert asyncio.run(scenario()) == (0, 1, 1)


def test_a_database_that_is_unavailable_is_one_line_a_poll_warned_once_and_its_recovery_said(
        make_settings, tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'not-yet.db'}"  # no schema yet: every statement fails as when it is away
    settings = make_settings(INTAKE_DATABASE__URL=url, INTAKE_OUTBOUND__TRANSPORT="maildir",
                             INTAKE_OUTBOUND__MAILDIR=str(tmp_path / "out"), INTAKE_OUTBOUND__POLL_INTERVAL="0.05")
    engine = make_engine(url, settings.database.busy_timeout)
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)

    async def scenario() -> None:
        stop, wake = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(sender.run(stop, wake))
        await asyncio.sleep(0.5)
        schema.upgrade(make_engine(url))  # the database comes (back) as intake serve makes it
        await asyncio.sleep(0.5)
        stop.set()
        await running

    with caplog.at_level("INFO", logger="intake.send.outbox"):
        asyncio.run(scenario())
    lines = [(r.levelname, r.getMessage().split()[0], r.exc_info) for r in caplog.records]
    unavailable = [line for line in lines if line[1] == "event=outbox-database-unavailable"]
    assert len(unavailable) >= 3 and [level for level, _, _ in unavailable] == ["WARNING"] + ["INFO"] * (
        len(unavailable) - 1)
    assert all(exc_info is None for _, _, exc_info in lines)  # no traceback, ever
    assert [line[:2] for line in lines if line[1] == "event=outbox-database-available"] == [
        ("INFO", "event=outbox-database-available")]
    assert not [line for line in lines if line[1] == "event=outbox-error"]


# -- helpers ---------------------------------------------------------------------------------


def outgoing(n: int, key: str | None = None, body: str = "Thank you for your report.\n") -> OutgoingMail:
    message_id = f"<ack.SEC-2026-{n:04d}.test@example.com>"
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "Example Security Team <security@example.com>"
    message["To"] = f"reporter{n}@researcher.test"
    message["Subject"] = f"Re: [SEC-2026-{n:04d}] report {n}"
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-replied"
    message.set_content(body)
    return OutgoingMail(dedupe_key=key or f"ack:SEC-2026-{n:04d}", kind="acknowledgement", envelope_from="",
                        recipients=[f"reporter{n}@researcher.test"], message_id=message_id, raw=message.as_bytes())


def engine_for(settings):  # type: ignore[no-untyped-def]
    engine = make_engine(settings.database_url, settings.database.busy_timeout)
    schema.upgrade(engine)
    return engine


def enqueue(engine, *mails: OutgoingMail, now: datetime = T0) -> list[bool]:  # type: ignore[no-untyped-def]
    with write_session(engine) as session:
        return [outbox.enqueue(session, mail, ticket_id=None, now=now) for mail in mails]


def send_due(settings, engine, now: datetime, sender: OutboxSender | None = None) -> dict[str, int]:  # type: ignore[no-untyped-def]
    sender = sender or OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)
    return asyncio.run(sender.send_due(now))


def rows(engine) -> list[Outbox]:  # type: ignore[no-untyped-def]
    return sorted(outbox.listing(engine), key=lambda r: r.id)


def message_ids(captured) -> list[str]:  # type: ignore[no-untyped-def]
    return [email.message_from_bytes(c.data)["Message-ID"] for c in captured]


def relay_env(port: int, **extra: str) -> dict[str, str]:
    return {"INTAKE_OUTBOUND__TRANSPORT": "smtp", "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{port}",
            "INTAKE_OUTBOUND__TIMEOUT": "5", **extra}


def cli_outbox(config_file: Path) -> list[dict]:
    """`intake outbox --json`, the real CLI in its own process, with this test's INTAKE_* environment."""
    done = subprocess.run([str(INTAKE), "--config", str(config_file), "outbox", "--json"], env=dict(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class TlsSinkHandler:
    """A relay that records, for each message, whether it arrived over TLS."""

    messages: list[tuple[bytes, bool]] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append((envelope.original_content, session.ssl is not None))
        return "250 2.0.0 OK"


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_sink(tls_ca: trustme.CA):  # type: ignore[no-untyped-def]
    """A relay offering STARTTLS with a certificate for 127.0.0.1 issued by `tls_ca`."""
    yield from _tls_sink(tls_ca, None)


@pytest.fixture
def tls_1_2_sink(tls_ca: trustme.CA):  # type: ignore[no-untyped-def]
    """The same relay, speaking TLS 1.2 at most (an older MTA)."""
    yield from _tls_sink(tls_ca, ssl.TLSVersion.TLSv1_2)


def _tls_sink(tls_ca: trustme.CA, maximum_version: ssl.TLSVersion | None):  # type: ignore[no-untyped-def]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    handler = TlsSinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- delivery ------------------------------------------------------------------------------------


def test_acknowledgement_is_delivered_through_the_relay(make_settings, sink):
    settings = make_settings(**relay_env(sink.port))
    engine = engine_for(settings)
    raw = report(subject="RCE in upload", sender="carol@researcher.test").as_bytes()
    inbound.store(engine, [Arrival("carol@researcher.test", ["security@example.com"], "127.0.0.1:1", "client.test",
                                   raw, T0)])
    assert process(settings, engine, T0).tickets_opened == ["SEC-2026-0001"]
    [queued] = rows(engine)
    assert queued.status == "pending"

    assert send_due(settings, engine, T0) == {"sent": 1}
    [captured] = sink.messages
    assert captured.mail_from == "<>"  # null envelope sender: an auto-reply must not be answered
    assert captured.rcpt_tos == ["carol@researcher.test"]
    assert captured.data == queued.raw  # the relay got exactly the queued bytes
    assert email.message_from_bytes(captured.data)["Message-ID"] == queued.message_id
    [sent] = rows(engine)
    assert (sent.status, sent.attempts, sent.sent_at, sent.last_error) == ("sent", 1, T0, None)
    assert send_due(settings, engine, T0 + timedelta(days=1)) == {}  # sent is final
    assert len(sink.messages) == 1


def test_an_acknowledgement_of_a_report_with_1000_character_lines_reaches_a_relay_that_refuses_longer(
        make_settings, start_intake_listener, sink):
    """A 1,000-character unbroken subject made acknowledgement lines of over 1,000 octets; an
    aiosmtpd relay (like many MTAs) answers "500 Line too long" to those, and the ack went dead."""
    settings = make_settings(**relay_env(sink.port),
                             INTAKE_MAINTAINERS='[{"name": "Ana", "email": "ana@example.com"}]')  # and a notice
    running = start_intake_listener(settings)
    subject, line = "S" * 1000, "B" * 1000
    smtp_send(running.port, report(subject=subject, body=f"Steps:\n{line}\n", sender="carol@researcher.test"),
              mail_from="carol@researcher.test")
    assert process(settings, running.engine, T0).tickets_opened == ["SEC-2026-0001"]
    assert send_due(settings, running.engine, T0).get("dead", 0) == 0
    queued = rows(running.engine)
    assert {row.kind: row.status for row in queued} == {"acknowledgement": "sent", "new-ticket": "sent"}
    for captured in sink.messages:
        assert max(len(line) for line in captured.data.split(b"\r\n")) <= 998
    [ack] = [c for c in sink.messages if c.rcpt_tos == ["carol@researcher.test"]]
    parsed = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert parsed["Subject"] == f"Re: [SEC-2026-0001] {'S' * 199}…"


def test_every_recipient_gets_the_message(make_settings, sink):
    settings = make_settings(**relay_env(sink.port))
    engine = engine_for(settings)
    mail = outgoing(1)
    enqueue(engine, OutgoingMail(mail.dedupe_key, mail.kind, "security@example.com",
                                 ["a@researcher.test", "b@researcher.test"], mail.message_id, mail.raw))
    assert send_due(settings, engine, T0) == {"sent": 1}
    [captured] = sink.messages
    assert captured.mail_from == "security@example.com"
    assert captured.rcpt_tos == ["a@researcher.test", "b@researcher.test"]


# -- temporary failures: retry with backoff -----------------------------------------------------


def test_4xx_is_retried_after_retry_initial_and_then_sent_once(make_settings, sink):
    settings = make_settings(**relay_env(sink.port))
    assert settings.outbound.retry_initial == 60  # the shipped config's value
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    sink.handler.replies.append("451 4.3.0 Mailbox busy, try again later")

    assert send_due(settings, engine, T0) == {"retry": 1}
    [row] = rows(engine)
    assert row.status == "pending"
    assert row.attempts == 1
    assert row.next_attempt_at == T0 + timedelta(seconds=60)
    assert "451" in row.last_error and "try again later" in row.last_error
    assert (row.lease_until, row.lease_owner) == (None, None)
    assert sink.messages == []

    assert send_due(settings, engine, T0 + timedelta(seconds=59)) == {}  # not due yet
    assert send_due(settings, engine, T0 + timedelta(seconds=60)) == {"sent": 1}
    assert message_ids(sink.messages) == [outgoing(1).message_id]
    [row] = rows(engine)
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, None)
    assert row.sent_at == T0 + timedelta(seconds=60)
    assert send_due(settings, engine, T0 + timedelta(hours=1)) == {}
    assert len(sink.messages) == 1


def test_relay_down_is_retried_with_doubling_backoff_capped_at_retry_max(make_settings):
    closed = free_port()  # nothing listens here: connection refused
    settings = make_settings(**relay_env(closed, INTAKE_OUTBOUND__RETRY_INITIAL="60",
                                         INTAKE_OUTBOUND__RETRY_MAX="200"))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    now, delays = T0, []
    for attempt in range(1, 6):
        assert send_due(settings, engine, now) == {"retry": 1}
        [row] = rows(engine)
        assert row.attempts == attempt
        assert row.status == "pending"
        assert "relay unreachable" in row.last_error
        delays.append((row.next_attempt_at - now).total_seconds())
        assert send_due(settings, engine, row.next_attempt_at - timedelta(seconds=1)) == {}
        now = row.next_attempt_at
    assert delays == [60, 120, 200, 200, 200]


def test_relay_back_after_an_outage_gets_the_message_once(make_settings, sink):
    closed = free_port()
    down = make_settings(**relay_env(closed))
    engine = engine_for(down)
    enqueue(engine, outgoing(1), outgoing(2))
    assert send_due(down, engine, T0) == {"retry": 2}
    up = make_settings(**relay_env(sink.port))  # the operator points intake at a working relay
    assert send_due(up, engine, T0 + timedelta(seconds=60)) == {"sent": 2}
    assert sorted(message_ids(sink.messages)) == [outgoing(1).message_id, outgoing(2).message_id]


def test_give_up_after_elapsed_makes_the_row_dead(make_settings, config_file):
    settings = make_settings(**relay_env(free_port(), INTAKE_OUTBOUND__RETRY_INITIAL="60",
                                         INTAKE_OUTBOUND__GIVE_UP_AFTER="300"))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    outcomes = []
    now = T0
    while not outcomes or outcomes[-1] == "retry":
        [outcome] = send_due(settings, engine, now)
        outcomes.append(outcome)
        now = rows(engine)[0].next_attempt_at
    # Tries at T0, +60, +180 (< 300 s old: retry), +420 (>= 300 s old: dead).
    assert outcomes == ["retry", "retry", "retry", "dead"]
    [row] = rows(engine)
    assert (row.status, row.attempts) == ("dead", 4)
    assert "relay unreachable" in row.last_error
    assert send_due(settings, engine, T0 + timedelta(days=30)) == {}
    [listed] = cli_outbox(config_file)
    assert (listed["status"], listed["attempts"], listed["next_attempt_at"]) == ("dead", 4, None)


# -- permanent failures -----------------------------------------------------------------------


def test_5xx_is_dead_at_once_listed_by_the_cli_and_never_retried(make_settings, sink, config_file):
    settings = make_settings(**relay_env(sink.port))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1), outgoing(2))
    sink.handler.replies.append("554 5.7.1 Message rejected as spam")  # the first DATA only

    assert send_due(settings, engine, T0) == {"dead": 1, "sent": 1}
    dead, sent = rows(engine)
    assert (dead.status, dead.attempts) == ("dead", 1)
    assert "554" in dead.last_error and "rejected as spam" in dead.last_error
    assert sent.status == "sent"

    listed = {entry["key"]: entry for entry in cli_outbox(config_file)}
    assert listed[dead.dedupe_key]["status"] == "dead"
    assert "554" in listed[dead.dedupe_key]["last_error"]
    assert listed[sent.dedupe_key]["status"] == "sent"
    dead_only = subprocess.run([str(INTAKE), "--config", str(config_file), "outbox", "--status", "dead", "--json"],
                               env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert [entry["key"] for entry in json.loads(dead_only.stdout)] == [dead.dedupe_key]

    # The relay would accept it now (no scripted reply left), but a dead row is never tried again.
    for later in (timedelta(minutes=1), timedelta(hours=2), timedelta(days=6)):
        assert send_due(settings, engine, T0 + later) == {}
    assert message_ids(sink.messages) == [outgoing(2).message_id]
    assert rows(engine)[0].attempts == 1


# -- TLS to the relay ------------------------------------------------------------------------


def test_required_starttls_never_sends_in_clear_to_a_relay_without_it(make_settings, sink, config_file):
    settings = make_settings(**relay_env(sink.port, INTAKE_OUTBOUND__STARTTLS="true"))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    assert send_due(settings, engine, T0) == {"retry": 1}
    [row] = rows(engine)
    assert row.status == "pending"
    assert "STARTTLS" in row.last_error
    assert sink.messages == []
    assert send_due(settings, engine, row.next_attempt_at) == {"retry": 1}
    assert sink.messages == []  # never in clear, however often it is tried


def test_required_starttls_sends_over_tls_to_a_trusted_relay(make_settings, tls_sink, tls_ca, tmp_path,
                                                             monkeypatch):
    handler, port = tls_sink
    bundle = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the system trust store, as an operator would extend it
    settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS="true"))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    assert send_due(settings, engine, T0) == {"sent": 1}
    [(data, over_tls)] = handler.messages
    assert over_tls
    assert data == outgoing(1).raw


def test_required_starttls_refuses_a_relay_certificate_it_cannot_verify(make_settings, tls_sink, caplog):
    handler, port = tls_sink  # its CA is not trusted here
    settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS="true"))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    assert send_due(settings, engine, T0) == {"retry": 1}  # the operator's to fix: the mail waits
    [row] = rows(engine)
    assert "certificate" in row.last_error.lower() and "ca_file" in row.last_error
    assert row.next_attempt_at == T0 + timedelta(seconds=settings.outbound.retry_initial)
    assert [r for r in caplog.records if r.levelname == "ERROR" and "ca_file" in r.getMessage()]
    assert handler.messages == []


def test_opportunistic_tls_does_not_block_delivery_to_a_relay_with_a_private_certificate(make_settings, tls_sink):
    """starttls = false: encrypt when the relay offers it, but an unverifiable certificate (a local
    MTA's self-signed one) is no reason to hold the mail back: it would otherwise go in clear. No
    login can go this way: a username needs starttls = true (test_config)."""
    handler, port = tls_sink
    settings = make_settings(**relay_env(port))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    assert send_due(settings, engine, T0) == {"sent": 1}
    [(data, over_tls)] = handler.messages
    assert over_tls
    assert data == outgoing(1).raw


@pytest.mark.parametrize("required", [True, False], ids=["required-starttls", "opportunistic"])
def test_tls_min_version_1_3_sends_nothing_to_a_tls_1_2_relay_and_everything_to_a_tls_1_3_one(
        make_settings, tls_1_2_sink, tls_sink, tls_ca, tmp_path, required):
    tls_ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    for (handler, port), expected in ((tls_1_2_sink, {"retry": 1}), (tls_sink, {"sent": 1})):
        settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS=str(required).lower(),
                                             INTAKE_OUTBOUND__CA_FILE=str(tmp_path / "relay-ca.pem"),
                                             INTAKE_OUTBOUND__TLS_MIN_VERSION="1.3",
                                             INTAKE_DATABASE__URL=f"sqlite:///{tmp_path}/{port}.db"))
        engine = engine_for(settings)
        enqueue(engine, outgoing(1))
        assert send_due(settings, engine, T0) == expected
        if expected == {"retry": 1}:
            assert handler.messages == []  # not in clear instead, opportunistic or not
            [row] = rows(engine)
            assert row.status == "pending" and row.last_error
        else:
            [(data, over_tls)] = handler.messages
            assert over_tls and data == outgoing(1).raw


def test_starttls_to_a_relay_of_a_private_ca_named_by_ca_file(make_settings, tls_sink, tls_ca, tmp_path):
    handler, port = tls_sink
    tls_ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS="true",
                                         INTAKE_OUTBOUND__CA_FILE=str(tmp_path / "relay-ca.pem")))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    assert send_due(settings, engine, T0) == {"sent": 1}
    [(data, over_tls)] = handler.messages
    assert over_tls and data == outgoing(1).raw


def test_ca_file_does_not_accept_a_certificate_for_another_host_name(make_settings, tls_ca, tmp_path):
    """The host name is checked as well as the issuer: a certificate of the private CA for
    another name (here 'mail.example.net' at 127.0.0.1) is refused."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("mail.example.net").configure_cert(context)
    handler, port = TlsSinkHandler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context)
    controller.start()
    try:
        tls_ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
        settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS="true",
                                             INTAKE_OUTBOUND__CA_FILE=str(tmp_path / "relay-ca.pem")))
        engine = engine_for(settings)
        enqueue(engine, outgoing(1))
        assert send_due(settings, engine, T0) == {"retry": 1}
        assert "mismatch" in rows(engine)[0].last_error
        assert handler.messages == []
    finally:
        controller.stop()


def test_relay_login_goes_over_verified_tls(make_settings, tls_ca, tmp_path, monkeypatch):
    logins: list[tuple[bytes, bytes, bool]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        logins.append((auth_data.login, auth_data.password, session.ssl is not None))
        return AuthResult(success=True)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    handler, port = TlsSinkHandler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                            authenticator=authenticator, auth_require_tls=True)
    controller.start()
    try:
        tls_ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
        settings = make_settings(**relay_env(port, INTAKE_OUTBOUND__STARTTLS="true", INTAKE_OUTBOUND__USERNAME="intake",
                                             INTAKE_OUTBOUND__CA_FILE=str(tmp_path / "relay-ca.pem")))
        monkeypatch.setenv("INTAKE_RELAY_PASSWORD", "hunter2")
        engine = engine_for(settings)
        enqueue(engine, outgoing(1))
        assert send_due(settings, engine, T0) == {"sent": 1}
        assert logins == [(b"intake", b"hunter2", True)]
    finally:
        controller.stop()


# -- maildir -----------------------------------------------------------------------------------


def test_maildir_transport_writes_one_file_per_message_into_new(make_settings, tmp_path):
    folder = tmp_path / "outgoing"
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="maildir", INTAKE_OUTBOUND__MAILDIR=str(folder))
    engine = engine_for(settings)
    mails = [outgoing(n) for n in range(1, 4)]
    enqueue(engine, *mails)
    assert send_due(settings, engine, T0) == {"sent": 3}
    files = sorted((folder / "new").iterdir())
    assert len(files) == 3
    assert sorted(f.read_bytes() for f in files) == sorted(m.raw for m in mails)
    assert list((folder / "tmp").iterdir()) == []
    assert [r.status for r in rows(engine)] == ["sent"] * 3
    assert send_due(settings, engine, T0 + timedelta(hours=1)) == {}
    assert len(list((folder / "new").iterdir())) == 3



def test_while_processing_has_a_backlog_a_wake_up_sends_one_claimed_batch(make_settings, tmp_path):
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="maildir", INTAKE_OUTBOUND__MAILDIR=str(tmp_path / "out"),
                             INTAKE_OUTBOUND__POLL_INTERVAL="60")  # no wake-up but ours during the test
    engine = engine_for(settings)
    enqueue(engine, *[outgoing(n) for n in range(1, outbox.CLAIM_BATCH + 11)], now=datetime.now(timezone.utc))
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)

    async def sent_reaches(count: int) -> int:
        for _ in range(200):
            sent = sum(row.status == "sent" for row in rows(engine))
            if sent >= count:
                break
            await asyncio.sleep(0.05)
        return sent

    async def scenario() -> tuple[int, int, int]:
        stop, wake, busy = asyncio.Event(), asyncio.Event(), asyncio.Event()
        busy.set()  # the processor's batches come back full
        running = asyncio.create_task(sender.run(stop, wake, busy=busy))
        first = await sent_reaches(outbox.CLAIM_BATCH)
        await asyncio.sleep(0.3)
        still = await sent_reaches(0)
        busy.clear()  # it caught up
        wake.set()
        last = await sent_reaches(outbox.CLAIM_BATCH + 10)
        stop.set()
        await running
        return first, still, last

    assert asyncio.run(scenario()) == (outbox.CLAIM_BATCH, outbox.CLAIM_BATCH, outbox.CLAIM_BATCH + 10)


# -- leases and dedupe -------------------------------------------------------------------------


def test_two_senders_at_the_same_now_never_both_send_a_row(make_settings, sink):
    settings = make_settings(**relay_env(sink.port))
    engine = engine_for(settings)
    count = 130  # more than one claim batch each, so the two senders really interleave
    enqueue(engine, *[outgoing(n) for n in range(1, count + 1)])
    senders = [OutboxSender(engine_for(settings), settings, make_transport(settings), on_undelivered=undeliverable.record) for _ in range(2)]
    totals: list[Counter] = [Counter(), Counter()]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(index: int) -> None:
        async def drain() -> None:
            while counts := await senders[index].send_due(T0):
                totals[index].update(counts)
        try:
            start.wait()
            asyncio.run(drain())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    received = Counter(message_ids(sink.messages))
    assert len(received) == count
    assert set(received.values()) == {1}  # each message reached the relay exactly once
    assert totals[0]["sent"] + totals[1]["sent"] == count
    assert totals[0]["sent"] > 0 and totals[1]["sent"] > 0  # both really took part
    assert all(r.status == "sent" and r.attempts == 1 for r in rows(engine))


def test_a_claimed_row_is_not_sent_by_another_sender_until_the_lease_expires(make_settings, sink):
    settings = make_settings(**relay_env(sink.port))
    engine = engine_for(settings)
    enqueue(engine, outgoing(1))
    crashed = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)
    [claimed] = crashed.claim(T0)  # ... and then the process dies before sending
    other = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)
    lease = timedelta(seconds=settings.outbound.timeout * 2 + 5)
    assert send_due(settings, engine, T0, other) == {}
    assert send_due(settings, engine, T0 + lease, other) == {}  # still held at the last instant
    assert sink.messages == []
    assert send_due(settings, engine, T0 + lease + timedelta(seconds=1), other) == {"sent": 1}
    assert len(sink.messages) == 1
    # The first sender's late report cannot overwrite the new owner's outcome.
    crashed.record(claimed, Delivery(False, detail="late"), T0 + lease + timedelta(seconds=2))
    [row] = rows(engine)
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)


def test_enqueue_with_the_same_dedupe_key_twice_queues_one_row(make_settings):
    settings = make_settings()
    engine = engine_for(settings)
    first = outgoing(1, key="ack:SEC-2026-0001", body="first version\n")
    second = outgoing(2, key="ack:SEC-2026-0001", body="second version\n")
    assert enqueue(engine, first) == [True]
    assert enqueue(engine, second, now=T0 + timedelta(minutes=5)) == [False]
    # Twice inside one transaction is a no-op as well.
    assert enqueue(engine, second, second) == [False, False]
    [row] = rows(engine)
    assert row.raw == first.raw
    assert row.created_at == T0
    with read_session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Outbox)) == 1
