"""Behind an MX: XFORWARD from trusted relays over real TCP, limits counted under the original
client, intake's own trace fields, and the SLA clock started when the relay accepted the mail."""

from __future__ import annotations

import email
import hashlib
import logging
import smtplib
import ssl
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
import trustme
from sqlalchemy import select

from conftest import all_tickets, process, report
from intake.run import processor
from intake.store import inbound
from intake.store.db import read_session
from intake.store.models import Deadline, InboundMessage
from test_listener import RawSMTP, message_bytes

RELAY = "127.0.0.5"  # a loopback source address stands for the MX in front
TRUSTED = {"INTAKE_SMTP__TRUSTED_RELAYS": f'["{RELAY}"]', "INTAKE_SMTP__HOSTNAME": "intake.example.com"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # the listener's behaviour here does not depend on the database


def _rows(engine) -> list[InboundMessage]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def _relay(port: int, **kwargs) -> smtplib.SMTP:  # type: ignore[no-untyped-def]
    client = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(RELAY, 0), **kwargs)
    client.ehlo("mx.example.com")
    return client


def _fields(trace: str) -> list[tuple[str, str]]:
    """The trace as a mail reader sees it: (name, unfolded value) per field."""
    parsed = email.message_from_string(trace + "\r\n")
    return [(name, " ".join(value.split())) for name, value in parsed.items()]


# -- XFORWARD from a trusted relay ---------------------------------------------------------------


def test_a_trusted_relay_names_the_original_client_and_it_is_recorded(make_settings, start_intake_listener, caplog):
    running = start_intake_listener(make_settings(**TRUSTED))
    with caplog.at_level(logging.INFO, logger="intake.receive.listener"), _relay(running.port) as client:
        assert client.esmtp_features["xforward"].split() == ["NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT",
                                                             "SOURCE"]
        # As Postfix sends it: two commands, xtext values; they add up before MAIL.
        assert client.docmd("XFORWARD", "NAME=mail.client.test ADDR=192.0.2.7 PORT=51334") == (250, b"2.0.0 Ok")
        assert client.docmd("XFORWARD", "PROTO=ESMTP HELO=client+2Etest IDENT=4AbCd SOURCE=REMOTE")[0] == 250
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("first")) == {}
        relay_port = client.sock.getsockname()[1]
        # The next transaction on the same connection names no one: the relay is the client.
        assert client.sendmail("bob@researcher.test", ["security@example.com"], message_bytes("second")) == {}
        assert client.docmd("XFORWARD", "ADDR=IPV6:2001:db8::7 NAME=[UNAVAILABLE] HELO=[TEMPUNAVAIL]")[0] == 250
        assert client.sendmail("carol@researcher.test", ["security@example.com"], message_bytes("third")) == {}
    first, second, third = _rows(running.engine)
    relay_peer = f"{RELAY}:{relay_port}"
    assert (first.peer, first.helo, first.relay) == ("192.0.2.7:51334", "client.test", relay_peer)
    assert (second.peer, second.helo, second.relay) == (relay_peer, "mx.example.com", relay_peer)
    assert (third.peer, third.helo, third.relay) == ("2001:db8::7", "", relay_peer)
    accepted = [r.getMessage() for r in caplog.records if "event=accepted" in r.getMessage()]
    assert f"peer=192.0.2.7:51334 relay={relay_peer} " in accepted[0]

    [(_, return_path), (_, received)] = _fields(first.trace)
    assert return_path == "<alice@researcher.test>"
    trace_id = accepted[0].rsplit("trace_id=", 1)[1]
    assert received.startswith(
        f"from client.test (mail.client.test [192.0.2.7]) (via trusted relay mx.example.com [{RELAY}]) "
        f"by intake.example.com (intake) with ESMTP id {trace_id} for <security@example.com>; ")
    stamp = email.utils.parsedate_to_datetime(received.rsplit(";", 1)[1])
    assert abs(stamp - first.received_at) < timedelta(seconds=1)
    # Without a forwarded address the relay is the client; a missing name and HELO are "unknown".
    assert _fields(second.trace)[1][1].startswith(f"from mx.example.com ([{RELAY}]) by intake.example.com")
    assert _fields(third.trace)[1][1].startswith(
        f"from unknown ([IPv6:2001:db8::7]) (via trusted relay mx.example.com [{RELAY}]) by")


def test_xforward_rules_of_the_protocol(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(**TRUSTED))
    with _relay(running.port) as client:
        assert client.docmd("XFORWARD", "ADDR=192.0.2.7")[0] == 250
        assert client.docmd("RSET")[0] == 250  # ends what XFORWARD said
        client.mail("alice@researcher.test")
        assert client.docmd("XFORWARD", "ADDR=192.0.2.8")[0] == 503  # not inside a transaction
        client.rcpt("security@example.com")
        assert client.data(message_bytes("rset"))[0] == 250
        assert client.docmd("HELP", "XFORWARD")[0] == 250
    [row] = _rows(running.engine)
    assert row.peer.startswith(f"{RELAY}:") and row.peer == row.relay


@pytest.mark.parametrize("argument", [
    "",                                              # nothing
    "ADDR",                                          # no value
    "FOO=bar",                                       # no such attribute
    "ADDR=192.0.2.7 COLOR=blue",                     # one bad attribute refuses the whole command
    "ADDR=not-an-ip", "ADDR=999.1.2.3", "ADDR=IPV6:192.0.2.7x",
    "PORT=70000", "PORT=-1", "PROTO=HTTP", "SOURCE=ELSEWHERE",
    "HELO=evil+0D+0AX-Injected:+20yes",              # CR LF
    "HELO=a+00b", "NAME=tab+09name", "NAME=a+E2+80+A8b",  # NUL, TAB, U+2028
    "NAME=" + "a" * 256,                             # longer than a host name
    "HELO=bad+ZZ", "HELO=trailing+", "NAME=+FF+FE",  # not xtext, not UTF-8
])
def test_malformed_xforward_is_refused_with_501_and_changes_nothing(make_settings, start_intake_listener, argument):
    running = start_intake_listener(make_settings(**TRUSTED))
    with _relay(running.port) as client:
        assert client.docmd("XFORWARD", "ADDR=192.0.2.9 HELO=kept.test")[0] == 250
        code, text = client.docmd("XFORWARD", argument)
        assert code == 501 and text.startswith(b"5.5.4 "), (code, text)
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("bad")) == {}
    [row] = _rows(running.engine)
    assert (row.peer, row.helo) == ("192.0.2.9", "kept.test")


def test_hostile_names_stay_one_word_of_one_header(make_settings, start_intake_listener):
    """Values XFORWARD may carry (printable) and a direct client's HELO (anything but CR LF) go
    into Received: with nothing that could end a word, open a comment or start a line."""
    running = start_intake_listener(make_settings(**TRUSTED))
    with _relay(running.port) as client:
        assert client.docmd("XFORWARD", "ADDR=192.0.2.7 NAME=x)(by+3Bevil HELO=<a>\\b\"c\"")[0] == 250
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("hostile")) == {}
    direct = RawSMTP(running.port, source="127.0.0.2")
    assert direct.command(b"EHLO evil;(x)\x0b\x1c\xc2\x85\xe2\x80\xa8\xff" + b"y" * 400)[0] == 250
    for line in (b"MAIL FROM:<al\xffice@researcher.test>", b"RCPT TO:<security@example.com>", b"DATA"):
        assert direct.command(line)[0] in (250, 354)
    # Bytes that are not UTF-8 once made every commit fail (451 for ever): they are U+FFFD now.
    assert direct.command(message_bytes("direct") + b".")[0] == 250
    direct.close()
    relayed, direct_row = _rows(running.engine)
    assert direct_row.mail_from == "al\ufffdice@researcher.test"
    assert direct_row.helo[:14] == "evil;(x)\x0b\x1c\x85\u2028\ufffdy"
    assert _fields(relayed.trace)[1][1].startswith("from ?a??b?c? (x??by?evil [192.0.2.7]) (via trusted relay")
    [(_, return_path), (_, received)] = _fields(direct_row.trace)
    assert return_path == "<al\ufffdice@researcher.test>"  # UTF-8 as in an SMTPUTF8 address, nothing else
    helo = received.split()[1]
    assert helo.startswith("evil??x??????yyy") and len(helo) == 255
    for row in (relayed, direct_row):
        assert [name for name, _ in _fields(row.trace)] == ["Return-Path", "Received"]
        received_field = row.trace.split("\r\nReceived: ", 1)[1]
        assert all(0x20 <= ord(c) < 0x7F or c == "\t" for c in received_field.replace("\r\n", ""))
        assert all(len(line) <= 998 for line in row.trace.split("\r\n"))


# -- anyone else ---------------------------------------------------------------------------------


def test_an_untrusted_client_is_not_offered_xforward_and_its_xforward_changes_nothing(make_settings,
                                                                                      start_intake_listener):
    running = start_intake_listener(make_settings(**TRUSTED))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.test")
        assert not client.has_extn("xforward")
        assert b"XFORWARD" not in client.docmd("HELP")[1]
        assert client.docmd("XFORWARD", "ADDR=192.0.2.7 HELO=forged.test") == (550, b"5.7.0 XFORWARD not permitted")
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("direct")) == {}
    [row] = _rows(running.engine)
    assert row.peer.startswith("127.0.0.2:") and (row.helo, row.relay) == ("client.test", "")
    received = _fields(row.trace)[1][1]
    assert received.startswith("from client.test ([127.0.0.2]) by intake.example.com (intake) with ESMTP id ")
    assert "via" not in received and "192.0.2.7" not in row.trace


# -- connection limits: the original client's -----------------------------------------------------


def _xforward(port: int, addr: str) -> tuple[RawSMTP, tuple[int, str]]:
    relay = RawSMTP(port, source=RELAY)
    assert relay.banner[0] == 220
    relay.command("EHLO mx.example.com")
    return relay, relay.command(f"XFORWARD ADDR={addr}")


def test_limits_hold_each_original_client_and_not_the_relay(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(**TRUSTED, INTAKE_SMTP__MAX_CONNECTIONS="8",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_IP="2",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_NETWORK="3"))
    # The relay's own connections are held to the total only (8), not to an address's 2.
    first, ok1 = _xforward(running.port, "127.0.0.9")
    second, ok2 = _xforward(running.port, "127.0.0.9")
    assert ok1 == ok2 == (250, "2.0.0 Ok")
    third, over = _xforward(running.port, "127.0.0.9")  # a third connection for one client
    assert over == (421, "4.7.0 Too many connections, try again later")
    assert third.rest() == b""  # and closed: Postfix defers the message and retries
    # The client's address is full: the same client directly too.
    assert RawSMTP(running.port, source="127.0.0.9").banner[0] == 421
    fourth, ok4 = _xforward(running.port, "127.0.0.10")
    fifth, over_network = _xforward(running.port, "127.0.0.11")  # 127.0.0.0/24 holds 3 already
    assert ok4[0] == 250 and over_network == (421, "4.7.0 Too many connections from your network")
    # Naming another client releases the one named before.
    assert fourth.command("XFORWARD ADDR=192.0.2.8")[0] == 250
    sixth, ok6 = _xforward(running.port, "127.0.0.11")
    assert ok6[0] == 250
    # The end of a transaction releases its client: its 250 comes after.
    for line in ("MAIL FROM:<alice@researcher.test>", "RCPT TO:<security@example.com>", "DATA"):
        first.command(line)
    assert first.command(message_bytes("limits") + b".")[0] == 250
    direct = RawSMTP(running.port, source="127.0.0.9")
    assert direct.banner[0] == 220
    assert [row.peer for row in _rows(running.engine)] == ["127.0.0.9"]
    for client in (first, second, third, fourth, fifth, sixth, direct):
        client.close()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return ca, {"INTAKE_SMTP__TLS_CERTIFICATE": str(chain), "INTAKE_SMTP__TLS_KEY": str(key)}


def test_received_names_the_tls_version_and_cipher_of_the_session(make_settings, start_intake_listener, certificate):
    ca, files = certificate
    running = start_intake_listener(make_settings(**TRUSTED, **files))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with _relay(running.port) as client:
        client.starttls(context=context)
        version, cipher = client.sock.version(), client.sock.cipher()[0]
        client.ehlo("mx.example.com")
        assert client.has_extn("xforward")  # offered again after STARTTLS, and what was said is gone
        assert client.docmd("XFORWARD", "ADDR=192.0.2.7 HELO=client.test")[0] == 250
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("tls")) == {}
    received = _fields(_rows(running.engine)[0].trace)[1][1]
    assert f"(using {version} with cipher {cipher} (" in received
    assert " with ESMTPS id " in received


# -- the whole message, its hash, its SLA start ----------------------------------------------------


def _relayed(port: int, data: bytes, addr: str = "192.0.2.7") -> None:
    with _relay(port) as client:
        assert client.docmd("XFORWARD", f"ADDR={addr} HELO=client.test")[0] == 250
        assert client.sendmail("alice@researcher.test", ["security@example.com"], data) == {}


def test_the_parser_sees_the_trace_and_the_stored_bytes_and_hash_are_the_clients(make_settings,
                                                                                 start_intake_listener):
    settings = make_settings(**TRUSTED)
    running = start_intake_listener(settings)
    data = report(message_id="<once@researcher.test>").as_bytes(policy=email.policy.SMTP)
    _relayed(running.port, data)
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10, source_address=("127.0.0.3", 0)) as client:
        client.sendmail("alice@researcher.test", ["security@example.com"], data)  # the same, directly
    first, second = inbound.pending(running.engine, 10)
    assert first.raw == second.raw == data and first.sha256 == second.sha256 == hashlib.sha256(data).hexdigest()
    assert first.full == first.trace.encode() + data and first.trace != second.trace
    prepared = processor.prepare(settings, first)
    assert prepared.mail.headers["return-path"] == "<alice@researcher.test>"
    assert prepared.mail.header_count == len(email.message_from_bytes(data)) + 2
    assert process(settings, running.engine).decisions == {"new-ticket": 1, "duplicate": 1}


def test_the_sla_starts_when_the_relay_accepted_the_message(make_settings, start_intake_listener, cli):
    settings = make_settings(**TRUSTED)
    running = start_intake_listener(settings)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    accepted = now - timedelta(hours=6)  # the MX queued it while intake was down

    def mx_copy(subject: str, mx_time: datetime, date: datetime) -> bytes:
        message = report(subject=subject, Date=format_datetime(date))
        return (f"Received: from client.test (client.test [192.0.2.7])\r\n\tby mx.example.com (Postfix) "
                f"with ESMTP id 4AB\r\n\tfor <security@example.com>; {format_datetime(mx_time)} (UTC)\r\n"
                f"Received: from laptop by mail.client.test; {format_datetime(date)}\r\n").encode() + \
            message.as_bytes(policy=email.policy.SMTP)

    _relayed(running.port, mx_copy("queued", accepted, accepted - timedelta(minutes=1)))
    _relayed(running.port, mx_copy("ancient", now - timedelta(days=30), now - timedelta(days=31)))
    _relayed(running.port, mx_copy("future", now + timedelta(hours=3), now - timedelta(minutes=1)))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10, source_address=("127.0.0.3", 0)) as client:
        client.sendmail("alice@researcher.test", ["security@example.com"],  # a direct client's Received: is its own
                        mx_copy("direct", accepted, accepted - timedelta(minutes=1)))
    process(settings, running.engine, now=now + timedelta(minutes=1))
    stored = {row.id: row.received_at for row in _rows(running.engine)}
    tickets = {ticket.subject: ticket for ticket in all_tickets(running.engine)}
    assert tickets["queued"].received_at == accepted
    assert tickets["ancient"].received_at == stored[2] - timedelta(days=5)
    assert tickets["future"].received_at == stored[3]
    assert tickets["direct"].received_at == stored[4]
    assert all(abs(at - now) < timedelta(minutes=1) for at in stored.values())  # the listing keeps intake's time
    with read_session(running.engine) as session:
        due = session.scalars(select(Deadline.due_at).where(Deadline.ticket_id == tickets["queued"].id,
                                                            Deadline.stage == "acknowledge")).one()
    assert due == accepted + timedelta(hours=72)  # vaixus: acknowledge within 72 hours of receipt
    shown = cli("show", tickets["queued"].reference).output
    assert f"received {accepted.isoformat()} (relay accepted it; intake got it {stored[1].isoformat()})" in shown
    assert f"from 192.0.2.7 (client.test) via trusted relay {RELAY}:" in shown
    assert "relay accepted" not in cli("show", tickets["direct"].reference).output
