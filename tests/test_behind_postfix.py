"""intake behind a real Postfix (README "Behind Postfix"): Postfix is the MX researchers reach and
the relay intake sends through; mail for the researchers' domain ends in a test sink.

    researcher ─smtplib─▶ Postfix MX ─transport "intake" (XFORWARD)─▶ intake listener
    intake outbox ─▶ Postfix (mynetworks may relay) ─transport─▶ sink for researcher.test

One private Postfix per module (tests/postfix_harness.py), skipped with the reason where Debian's
postfix is missing or cannot start. Postfix's queue is flushed (`postqueue -f`) instead of waiting
for its retry times; each test leaves the queue empty.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import os
import re
import smtplib
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
import trustme
from aiosmtpd.controller import Controller
from sqlalchemy import select

from conftest import Sink, SinkHandler, all_tickets, free_port, process, report
from intake.store import inbound
from intake.store.db import make_engine, read_session
from intake.store.models import InboundMessage
from postfix_harness import Postfix, PostfixUnavailable, start_postfix
from test_serve import Serve

SIZE_LIMIT = 1_000_000  # Postfix's message_size_limit, and intake's max_message_size when matched
RESEARCHER = "alice@researcher.test"
SECURITY = "security@example.com"  # the shipped config's address


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # Postfix is the subject here, not the database


@pytest.fixture(scope="module")
def intake_port() -> int:
    """Where intake listens: Postfix's transport map names it, so it is fixed for the module."""
    return free_port()


@pytest.fixture(scope="module")
def intake_tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """intake's STARTTLS certificate: Postfix's transport to intake says `encrypt`."""
    certificate = trustme.CA().issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    chain, key = folder / "fullchain.pem", folder / "privkey.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
    key.write_bytes(certificate.private_key_pem.bytes())
    return {"INTAKE_SMTP__TLS_CERTIFICATE": str(chain), "INTAKE_SMTP__TLS_KEY": str(key)}


@pytest.fixture(scope="module")
def researchers() -> Iterator[Sink]:
    """The researchers' mail server (researcher.test): whatever Postfix delivers there."""
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Sink(handler, port)
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def postfix(intake_port: int, researchers: Sink) -> Iterator[Postfix]:
    try:
        instance = start_postfix(mx_port=free_port(), intake_port=intake_port, sink_port=researchers.port,
                                 message_size_limit=SIZE_LIMIT, addresses=[SECURITY],
                                 researcher_domain="researcher.test")
    except PostfixUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(autouse=True)
def empty_queue_after(postfix: Postfix, researchers: Sink) -> Iterator[None]:
    """Each test starts with nothing at the sink and must leave nothing in Postfix's queue (what a
    failed test left is deleted, so it cannot reach the next test's intake)."""
    researchers.messages.clear()
    yield
    left = postfix.queue()
    if left:
        postfix.command("postsuper", "-d", "ALL")
    assert left == [], postfix.log()[-3000:]


@pytest.fixture
def behind_postfix(make_settings, intake_port: int, postfix: Postfix, intake_tls):  # type: ignore[no-untyped-def]
    """Settings for intake behind this Postfix: listening where the transport points (with
    STARTTLS), relaying out through Postfix's MX port, size limit matched unless a test says
    otherwise."""

    def make(tls: bool = True, **env: str):  # type: ignore[no-untyped-def]
        return make_settings(**{
            **(intake_tls if tls else {}),
            "INTAKE_SMTP__LISTEN": f"127.0.0.1:{intake_port}",
            "INTAKE_SMTP__MAX_MESSAGE_SIZE": str(SIZE_LIMIT),
            "INTAKE_OUTBOUND__TRANSPORT": "smtp",
            "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{postfix.port}",
            "INTAKE_OUTBOUND__TIMEOUT": "5",
            **env,
        })

    return make


def stored(engine) -> list[InboundMessage]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def report_of_size(size: int) -> bytes:
    """A report of exactly *size* bytes on the wire (CRLF line ends)."""
    line = "z" * 70 + "\n"  # 72 bytes with CRLF
    head = report().as_bytes(policy=email.policy.SMTP)
    data = report(body=line * ((size - len(head)) // 72)).as_bytes(policy=email.policy.SMTP)
    assert len(data) <= size
    return data[:-2] + b"q" * (size - len(data)) + b"\r\n"


def deferrals(postfix: Postfix) -> int:
    """Deliveries Postfix has deferred so far (intake down: "Connection refused")."""
    return postfix.log().count("status=deferred")


def utc(instant: datetime) -> datetime:
    """An instant as stored (SQLite gives it back naive, in UTC) made comparable."""
    return instant if instant.tzinfo else instant.replace(tzinfo=timezone.utc)


def send_to_mx(postfix: Postfix, message: email.message.EmailMessage | bytes) -> str:
    """Send as the researcher's client (HELO researcher.test); its address as Postfix saw it."""
    data = message if isinstance(message, bytes) else message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="researcher.test", timeout=30) as client:
        host, port = client.sock.getsockname()
        assert client.sendmail(RESEARCHER, [SECURITY], data) == {}
    return f"{host}:{port}"


def test_a_report_through_postfix_is_a_ticket_and_the_acknowledgement_goes_out_through_postfix(
        postfix, researchers, intake_port, intake_tls, config_file, sqlite_url):
    """`intake serve` behind Postfix: the report reaches it through the transport, and its
    acknowledgement leaves through Postfix to the researcher's server, threaded to the report."""
    serve_env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    serve_env.update({
        "INTAKE_DATABASE__URL": sqlite_url,
        "INTAKE_SMTP__LISTEN": f"127.0.0.1:{intake_port}",
        "INTAKE_SMTP__MAX_MESSAGE_SIZE": str(SIZE_LIMIT),
        "INTAKE_OUTBOUND__TRANSPORT": "smtp",
        "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{postfix.port}",
        "INTAKE_OUTBOUND__POLL_INTERVAL": "0.2",
        "INTAKE_PROCESSING__POLL_INTERVAL": "0.2",
        **intake_tls,
    })
    server = Serve(config_file, serve_env, intake_port)
    try:
        server.start()
        send_to_mx(postfix, report(subject="SSRF in the webhook tester", message_id="<pf1@researcher.test>",
                                   References="<earlier@researcher.test>"))
        postfix.wait(lambda: len(researchers.messages) == 1, "the acknowledgement at the researcher's server")
    finally:
        if server.process and server.process.poll() is None:
            server.stop()
    assert server.process.returncode == 0
    engine = make_engine(sqlite_url)
    [ticket] = all_tickets(engine)
    [row] = stored(engine)
    raw = inbound.get(engine, row.id).raw
    engine.dispose()
    assert ticket.subject == "SSRF in the webhook tester" and ticket.reporter == RESEARCHER
    [ack] = researchers.messages
    assert ack.mail_from == "<>" and ack.rcpt_tos == [RESEARCHER]
    message = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert message["Subject"] == f"Re: [{ticket.reference}] SSRF in the webhook tester"
    assert message["In-Reply-To"] == "<pf1@researcher.test>"
    assert message["References"].split() == ["<earlier@researcher.test>", "<pf1@researcher.test>"]
    assert message["Auto-Submitted"] == "auto-replied"
    # It went through Postfix: the top Received: is Postfix's, from intake's session.
    assert f"by {postfix.myhostname} (Postfix)" in message.get_all("Received")[0]
    # The report came in through Postfix (its Received: is in the stored message), over TLS.
    received = email.message_from_bytes(raw, policy=email.policy.default).get_all("Received")
    assert any(f"by {postfix.myhostname} (Postfix)" in header for header in received)
    # README: one line of Postfix's log, under the transport's own name, ties its queue id to intake's row.
    assert re.search(rf"postfix/intake/smtp\[\d+\]: \w+: to=<{SECURITY}>, relay=127.0.0.1\[127.0.0.1\]:{intake_port},"
                     rf".* status=sent \(250 2.0.0 OK queued as {row.id}\)", postfix.log())
    assert f"TLS connection established to 127.0.0.1[127.0.0.1]:{intake_port}" in postfix.log()


def test_postfix_accepts_only_the_security_addresses_and_their_tags(behind_postfix, start_intake_listener,
                                                                    postfix):
    """relay_recipient_maps + recipient_delimiter: anything else for the domain is refused by
    Postfix at RCPT (no bounce later), and +tag addresses reach intake."""
    running = start_intake_listener(behind_postfix())
    with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="researcher.test", timeout=30) as client:
        refused = client.sendmail(RESEARCHER, ["ceo@example.com", "security+SEC-2026-0001@example.com"],
                                  report().as_bytes(policy=email.policy.SMTP))
    assert refused["ceo@example.com"][0] == 550
    postfix.wait(lambda: len(stored(running.engine)) == 1, "the +tag report in intake")
    assert stored(running.engine)[0].rcpt_tos == ["security+SEC-2026-0001@example.com"]


def test_with_matched_size_limits_postfix_itself_refuses_an_oversize_report(behind_postfix, start_intake_listener,
                                                                           postfix, researchers):
    """message_size_limit = max_message_size: too big is refused in the researcher's own session
    (at MAIL when the client declares SIZE, else at the end of DATA), and what Postfix accepts,
    with its Received: and XFORWARD added, intake accepts too."""
    running = start_intake_listener(behind_postfix())
    too_big = report_of_size(SIZE_LIMIT + 1000)
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:
            client.sendmail(RESEARCHER, [SECURITY], too_big)  # smtplib declares SIZE=
        assert declared.value.smtp_code == 552
        client.rset()
        assert client.mail(RESEARCHER)[0] == 250  # no SIZE: Postfix counts while it reads
        assert client.rcpt(SECURITY)[0] == 250
        assert client.data(too_big)[0] == 552
    # Postfix counts its queue file (its Received: and envelope included): it takes a little less
    # than its limit, and passes on less than that, so intake never refuses what Postfix took.
    send_to_mx(postfix, report_of_size(SIZE_LIMIT - 1000))
    postfix.wait(lambda: len(stored(running.engine)) == 1, "the largest report in intake")
    assert SIZE_LIMIT - 1000 < stored(running.engine)[0].size <= SIZE_LIMIT
    assert researchers.messages == []  # no bounce anywhere


def test_a_report_over_intakes_limit_but_under_postfixs_bounces_to_the_researcher(
        behind_postfix, start_intake_listener, postfix, researchers):
    """What README's advice prevents: Postfix accepts, intake announces a smaller SIZE, and Postfix
    bounces the report to the researcher ("exceeds size limit … of server 127.0.0.1"). intake never sees it: no ticket, nothing for anyone to act on."""
    running = start_intake_listener(behind_postfix(INTAKE_SMTP__MAX_MESSAGE_SIZE=str(SIZE_LIMIT // 4)))
    send_to_mx(postfix, report(message_id="<big@researcher.test>",
                               body=("w" * 70 + "\n") * (SIZE_LIMIT // 2 // 71)))
    postfix.wait(lambda: len(researchers.messages) == 1, "the bounce at the researcher's server")
    [bounce] = researchers.messages
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == [RESEARCHER]
    text = bounce.data.decode(errors="replace")
    # Postfix read intake's EHLO "SIZE 250000" and gave up before MAIL: a permanent 5.3.4.
    assert "Status: 5.3.4" in text and f"exceeds size limit {SIZE_LIMIT // 4}" in text
    assert "Message-ID: <big@researcher.test>" in text
    assert stored(running.engine) == []


def test_while_intake_is_down_postfix_queues_and_delivers_every_report_when_it_is_back(
        behind_postfix, start_intake_listener, postfix):
    settings = behind_postfix()
    ids = [f"<down{n}@researcher.test>" for n in range(3)]
    deferred_before = deferrals(postfix)
    for message_id in ids:
        send_to_mx(postfix, report(subject=f"report {message_id}", message_id=message_id))
    postfix.wait(lambda: deferrals(postfix) >= deferred_before + 3, "three deferred reports")
    assert len(postfix.queue()) == 3
    running = start_intake_listener(settings)
    postfix.flush()
    postfix.wait(lambda: len(stored(running.engine)) == 3, "the queued reports in intake")
    assert process(settings, running.engine).decisions == {"new-ticket": 3}
    assert sorted(t.subject for t in all_tickets(running.engine)) == sorted(f"report {i}" for i in ids)


def test_postfix_hands_reports_to_intake_only_over_tls(behind_postfix, start_intake_listener, postfix):
    """The transport says `smtp_tls_security_level=encrypt`: an intake without STARTTLS gets
    nothing in clear; the report waits in Postfix's queue until intake offers TLS."""
    without_tls = behind_postfix(tls=False)
    assert without_tls.smtp.tls_certificate is None
    running = start_intake_listener(without_tls)
    deferred_before = deferrals(postfix)
    send_to_mx(postfix, report(message_id="<tls@researcher.test>"))
    postfix.wait(lambda: deferrals(postfix) > deferred_before, "the report deferred")
    assert "TLS is required, but was not offered" in postfix.log()
    assert stored(running.engine) == []
    running.stop()
    running = start_intake_listener(behind_postfix())
    postfix.flush()
    postfix.wait(lambda: len(stored(running.engine)) == 1, "the report in intake over TLS")


def test_xforward_from_postfix_records_the_original_client_and_the_mx_receipt_time(
        behind_postfix, start_intake_listener, postfix):
    """With Postfix in smtp.trusted_relays, intake records the client Postfix saw (on loopback its
    address is Postfix's own too: the port and the HELO tell them apart), the relay that handed the
    mail over, and starts the SLA clock when Postfix accepted the report, not when intake got it
    (here after an outage)."""
    settings = behind_postfix(INTAKE_SMTP__TRUSTED_RELAYS=json.dumps(["127.0.0.1"]))
    deferred_before = deferrals(postfix)
    researcher_client = send_to_mx(postfix, report(message_id="<xforward@researcher.test>"))
    postfix.wait(lambda: deferrals(postfix) > deferred_before, "the report deferred")
    running = start_intake_listener(settings)
    postfix.flush()
    postfix.wait(lambda: len(stored(running.engine)) == 1, "the report in intake")
    [row] = stored(running.engine)
    assert (row.peer, row.helo) == (researcher_client, "researcher.test")
    assert row.relay.startswith("127.0.0.1:") and row.relay != researcher_client
    process(settings, running.engine)
    [ticket] = all_tickets(running.engine)
    parsed = email.message_from_bytes(inbound.get(running.engine, row.id).raw, policy=email.policy.default)
    mx_received = next(h for h in parsed.get_all("Received") if f"by {postfix.myhostname}" in h)
    accepted = email.utils.parsedate_to_datetime(mx_received.rsplit(";", 1)[1].strip())
    # Received: has whole seconds, intake's own clock microseconds: equal means Postfix's time.
    assert utc(ticket.received_at) == accepted and utc(row.received_at) > accepted
