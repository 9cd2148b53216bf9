"""The SMTP listener over real TCP: who we accept mail for, limits, timeouts, TLS, smuggling,
and the promise behind ``250``: the raw message is committed before the client hears it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import trustme
from sqlalchemy import insert

from intake.receive.listener import ConnectionLimits
from intake.store import inbound, schema
from intake.store.db import make_engine, wal_size
from intake.store.group_commit import GroupCommitter
from intake.store.inbound import Arrival
from intake.store.models import InboundMessage


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Listener behaviour does not depend on the database; the tests about what gets committed take
    ``empty_database_url`` (a SQLite file and a PostgreSQL database, migrated by the listener)."""
    return sqlite_url


# -- helpers ---------------------------------------------------------------------------------


class RawSMTP:
    """A byte-level SMTP client, for tests about the protocol itself."""

    def __init__(self, port: int, timeout: float = 10, source: str = "127.0.0.1", host: str = "127.0.0.1"):
        # Any 127.x.y.z is this host's loopback on Linux: a source address stands for another client.
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self._buffer = b""
        self.banner = self.reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unparsed {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        return int(lines[0][:3]), "\n".join(line[4:].decode() for line in lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        data = self._buffer
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def stored_rows(engine) -> list[dict]:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        result = connection.exec_driver_sql(
            "SELECT m.id, mail_from, rcpt_tos, raw, sha256, size, status, helo FROM inbound_message m "
            "JOIN inbound_raw r ON r.id = m.id ORDER BY m.id")
        return [dict(row._mapping) for row in result]


def rcpts(row: dict) -> list[str]:
    value = row["rcpt_tos"]
    if isinstance(value, str):  # JSON text on SQLite
        value = json.loads(value)
    return value


def message_bytes(marker: str, size: int = 0) -> bytes:
    """A CRLF message (as it travels) with a unique marker, padded to about *size* bytes."""
    head = (f"From: Alice <alice@researcher.test>\r\nTo: security@example.com\r\n"
            f"Subject: report {marker}\r\nMessage-ID: <{marker}@researcher.test>\r\n\r\n"
            f"marker {marker}\r\n").encode()
    padding = b""
    while len(head) + len(padding) < size:
        padding += b"x" * 70 + b"\r\n"
    return head + padding


# -- recipients: our addresses only, never a relay ---------------------------------------------


ADDRESSES = '["security@example.com", "psirt@example.org"]'


def test_aiosmtpd_still_finds_every_command_hook_and_auth_mechanism(make_settings):
    """The listener lists only what aiosmtpd looks up per connection: it must find all of it."""
    from intake.receive.listener import IntakeHandler
    from intake.receive.listener import smtp_factory

    def every(obj: object, prefix: str) -> set[str]:
        return {name[len(prefix):] for name in object.__dir__(obj) if name.startswith(prefix)}

    async def made() -> tuple:
        committer = GroupCommitter(make_engine("sqlite://"))
        try:
            handler = IntakeHandler(make_settings(), committer)
            return handler, smtp_factory(make_settings(), handler)()
        finally:
            committer.close()

    handler, protocol = asyncio.run(made())
    assert set(protocol._smtp_methods) == every(protocol, "smtp_") >= {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS"}
    assert set(protocol._handle_hooks) == every(handler, "handle_") == {"RCPT", "DATA"}
    auth = every(protocol, "auth_") | every(handler, "auth_")
    assert {name.replace("__", "-") for name in auth} == set(protocol._auth_methods) >= {"LOGIN", "PLAIN"}


@pytest.mark.parametrize("recipient", [
    "security@example.com",
    "SECURITY@EXAMPLE.COM",
    "Security+SEC-2026-0001@Example.Com",
    "security+a+b@example.com",
    "security+@example.com",
    "psirt@example.org",
    "PSIRT+vectis@EXAMPLE.org",
])
def test_configured_addresses_and_their_tags_are_accepted(make_settings, start_intake_listener, recipient):
    running = start_intake_listener(make_settings(INTAKE_SMTP__ADDRESSES=ADDRESSES))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        assert client.sendmail("alice@researcher.test", [recipient], message_bytes("ok")) == {}
    [row] = stored_rows(running.engine)
    assert rcpts(row) == [recipient]  # stored as given; routing decides on the lowercased base later


@pytest.mark.parametrize("recipient", [
    "other@example.com",            # same domain, other mailbox
    "securityx@example.com",        # prefix of ours
    "xsecurity@example.com",
    "security@example.org",         # our local part at the other configured domain
    "psirt@example.com",
    "security@evil.example",        # a relay attempt
    "security@example.com.evil.example",
    "security@sub.example.com",
    "security%evil.example@example.com",   # percent hack
    "evil.example!security@example.com",   # bang path
    "victim@gmail.example",
])
def test_any_other_recipient_is_refused_with_550_and_nothing_is_stored(make_settings, start_intake_listener,
                                                                      recipient):
    running = start_intake_listener(make_settings(INTAKE_SMTP__ADDRESSES=ADDRESSES))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@researcher.test")[0] == 250
        code, text = client.rcpt(recipient)
        assert code == 550
        assert text.startswith(b"5.1.1")
        assert client.docmd("DATA")[0] == 503  # no accepted recipient: no transaction
    assert stored_rows(running.engine) == []


def test_a_refused_recipient_is_left_out_of_an_accepted_message(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings())
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        refused = client.sendmail("alice@researcher.test", ["victim@relay.example", "security+x@example.com"],
                                  message_bytes("mixed"))
    assert refused["victim@relay.example"][0] == 550
    [row] = stored_rows(running.engine)
    assert rcpts(row) == ["security+x@example.com"]


@pytest.mark.parametrize("recipient", [
    "<@security.example.com:victim@relay.example>",  # source route (RFC 5321 3.6.1: ignored)
    '<"victim@relay.example"@example.com>',          # quoted local part naming another host
    "<security@[127.0.0.1]>",                        # address literal of this very host
])
def test_routing_tricks_are_refused_and_never_relayed(make_settings, start_intake_listener, recipient):
    running = start_intake_listener(make_settings())
    client = RawSMTP(running.port)
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<alice@researcher.test>")[0] == 250
    code, text = client.command(f"RCPT TO:{recipient}")
    assert (code, text[:5]) == (550, "5.1.1")
    assert client.command("DATA")[0] == 503
    assert client.command("QUIT")[0] == 221
    client.close()
    assert stored_rows(running.engine) == []


# -- size and recipient limits -----------------------------------------------------------------


def test_size_is_announced_and_a_larger_declared_size_gets_552(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE="2048"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "2048"
        code, text = client.mail("alice@researcher.test", ["SIZE=4096"])
        assert code == 552, text
        assert client.rcpt("security@example.com")[0] == 503  # the MAIL was refused: no transaction
        # Declaring a size within the limit is fine on the same connection.
        assert client.mail("alice@researcher.test", ["SIZE=1500"])[0] == 250
        assert client.rcpt("security@example.com")[0] == 250
        assert client.data(message_bytes("declared", 1500))[0] == 250
    [row] = stored_rows(running.engine)
    assert b"declared" in row["raw"]


def test_data_larger_than_the_limit_gets_552_and_is_not_stored(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE="2048"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@researcher.test")[0] == 250  # no SIZE= given: the data itself decides
        assert client.rcpt("security@example.com")[0] == 250
        code, _ = client.data(message_bytes("too-big", 3000))
        assert code == 552
        # The connection is still usable and a message under the limit goes through.
        assert client.sendmail("alice@researcher.test", ["security@example.com"],
                               message_bytes("fits", 1900)) == {}
    [row] = stored_rows(running.engine)
    assert b"fits" in row["raw"]
    assert b"too-big" not in row["raw"]


def test_third_recipient_gets_452_when_two_are_allowed(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_RECIPIENTS="2"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@researcher.test")[0] == 250
        assert client.rcpt("security+1@example.com")[0] == 250
        assert client.rcpt("security+2@example.com")[0] == 250
        code, text = client.rcpt("security+3@example.com")
        assert code == 452
        assert text.startswith(b"4.5.3")
        assert client.data(message_bytes("three"))[0] == 250
        # The limit is per transaction: the next one starts from zero.
        assert client.sendmail("alice@researcher.test", ["security+4@example.com", "security+5@example.com"],
                               message_bytes("next")) == {}
    first, second = stored_rows(running.engine)
    assert rcpts(first) == ["security+1@example.com", "security+2@example.com"]
    assert rcpts(second) == ["security+4@example.com", "security+5@example.com"]


# -- idle timeout ------------------------------------------------------------------------------


def test_idle_client_is_disconnected_after_the_idle_timeout(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__IDLE_TIMEOUT="1"))
    client = RawSMTP(running.port, timeout=15)
    assert client.banner[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    started = time.monotonic()
    assert client.rest() == b""  # the server closed the connection without being asked
    elapsed = time.monotonic() - started
    client.close()
    assert 0.8 <= elapsed < 10, elapsed  # 1 s configured, not aiosmtpd's 300 s or our default 60 s


def test_a_client_that_keeps_talking_is_not_disconnected(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__IDLE_TIMEOUT="1"))
    client = RawSMTP(running.port)
    assert client.command("EHLO client.test")[0] == 250
    for _ in range(4):  # 1.6 s in all, never 1 s silent
        time.sleep(0.4)
        assert client.command("NOOP")[0] == 250
    assert client.command("QUIT")[0] == 221
    client.close()


def test_a_slow_but_steady_data_upload_is_not_cut_off(make_settings, start_intake_listener):
    """Idle means silent: a message arriving over a slow link for longer than the timeout is accepted."""
    running = start_intake_listener(make_settings(INTAKE_SMTP__IDLE_TIMEOUT="1"))
    client = RawSMTP(running.port)
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<alice@researcher.test>")[0] == 250
    assert client.command("RCPT TO:<security@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: slow\r\n\r\n")
    for n in range(6):  # 2.4 s of upload, a chunk every 0.4 s
        time.sleep(0.4)
        client.send(f"line {n}\r\n".encode())
    client.send(b".\r\n")
    code, text = client.reply()
    assert code == 250, text
    assert client.command("QUIT")[0] == 221
    client.close()
    [row] = stored_rows(running.engine)
    assert row["raw"].endswith(b"line 5\r\n")


def test_a_commit_slower_than_the_idle_timeout_still_answers_250(make_settings, start_intake_listener, tmp_path):
    """The client waiting for our 250 is not idle: a slow commit must not cost it the answer (it would
    send the stored message again)."""
    database = tmp_path / "locked.db"
    running = start_intake_listener(make_settings(INTAKE_SMTP__IDLE_TIMEOUT="1",
                                                  INTAKE_DATABASE__URL=f"sqlite:///{database}"))
    answer: list[object] = []

    def send() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("alice@researcher.test")
                client.rcpt("security@example.com")
                answer.append(client.data(message_bytes("waited")))
        except Exception as exc:  # noqa: BLE001 - asserted below
            answer.append(exc)

    admin = sqlite3.connect(database, isolation_level=None)
    admin.execute("BEGIN IMMEDIATE")  # another writer (say, the processor) holds the write lock
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(2.5)  # the commit waits on the lock for longer than the 1 s idle timeout
    admin.execute("COMMIT")
    admin.close()
    sender.join(30)
    [(code, _)] = answer
    assert code == 250
    assert len(stored_rows(running.engine)) == 1


# -- floods and slow-loris clients: bounded connections ------------------------------------------


def _served_promptly(port: int, source: str, marker: str) -> float:
    """Send one message from *source*; returns the seconds it took to get its 250."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes(marker)) == {}
    return time.monotonic() - started


def test_a_flood_from_one_address_gets_421_past_its_share_and_others_are_still_served(make_settings,
                                                                                     start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_CONNECTIONS_PER_IP="5",
                                                  INTAKE_SMTP__MAX_CONNECTIONS="20"))
    flood = [RawSMTP(running.port, source="127.0.0.2") for _ in range(30)]
    assert Counter(client.banner[0] for client in flood) == {220: 5, 421: 25}
    refused = next(client for client in flood if client.banner[0] == 421)
    assert refused.banner[1] == "4.7.0 Too many connections, try again later"
    assert refused.rest() == b""  # and closed (RFC 5321 3.8)
    assert _served_promptly(running.port, "127.0.0.3", "another-sender") < 2
    for client in flood:
        client.close()
    time.sleep(0.2)
    again = RawSMTP(running.port, source="127.0.0.2")  # the slots are free again
    assert again.banner[0] == 220
    again.close()
    assert len(stored_rows(running.engine)) == 1


def test_slow_loris_clients_hold_at_most_their_share_and_silent_ones_are_dropped(make_settings,
                                                                                start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_CONNECTIONS_PER_IP="3",
                                                  INTAKE_SMTP__MAX_CONNECTIONS="6",
                                                  INTAKE_SMTP__IDLE_TIMEOUT="1"))
    tricklers = [RawSMTP(running.port, source="127.0.0.2") for _ in range(3)]
    silent = [RawSMTP(running.port, source="127.0.0.3") for _ in range(3)]
    assert [c.banner[0] for c in tricklers + silent] == [220] * 6
    assert RawSMTP(running.port, source="127.0.0.2").banner[0] == 421  # over its share
    assert RawSMTP(running.port, source="127.0.0.4").banner[0] == 421  # over the total
    for c in tricklers:
        c.send(b"EHLO ")
    for n in range(6):  # 1.8 s: the tricklers are never silent for 1 s, the silent ones are
        time.sleep(0.3)
        for c in tricklers:
            c.send(b"x")
    for c in silent:
        assert c.rest() == b""  # dropped after the idle timeout, their slots freed
    assert _served_promptly(running.port, "127.0.0.4", "while-trickled-at") < 2
    for c in tricklers:  # still connected, still counted
        c.send(b"\r\n")
        assert c.reply()[0] == 250
    assert RawSMTP(running.port, source="127.0.0.2").banner[0] == 421
    for c in tricklers + silent:
        c.close()


def test_four_addresses_of_one_network_no_longer_hold_every_slot(make_settings, start_intake_listener):
    """Issue 12, finding 6: 127.0.0.2-5 x 50 connections held all 200 slots (the shipped limits).
    Now they share their /24's 100, and a client of another network still gets in."""
    running = start_intake_listener(make_settings())
    assert (running.settings.smtp.max_connections, running.settings.smtp.max_connections_per_ip,
            running.settings.smtp.max_connections_per_network) == (200, 50, 100)
    flood = [RawSMTP(running.port, source=f"127.0.0.{n}") for n in range(2, 6) for _ in range(50)]
    assert Counter(client.banner[0] for client in flood) == {220: 100, 421: 100}
    refused = [client for client in flood if client.banner[0] == 421]
    assert {client.banner[1] for client in refused} == {"4.7.0 Too many connections from your network"}
    assert refused[0].rest() == b""  # and closed (RFC 5321 3.8)
    other = RawSMTP(running.port, source="127.0.1.1")  # another /24
    assert other.banner[0] == 220
    assert other.command("EHLO other.test")[0] == 250
    other.close()
    for client in flood:
        client.close()


def _once_released(port: int, source: str, host: str = "127.0.0.1") -> RawSMTP:
    """A connection as soon as the listener has seen a closed one go (a few tries, bounded)."""
    for _ in range(100):
        client = RawSMTP(port, source=source, host=host)
        if client.banner[0] != 421:
            return client
        client.close()
        time.sleep(0.02)
    return client


def test_the_network_prefix_lengths_are_configurable(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_CONNECTIONS="20",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_IP="2",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_NETWORK="3",
                                                  INTAKE_SMTP__NETWORK_PREFIX_IPV4="16"))
    clients = [RawSMTP(running.port, source=source) for source in ("127.0.0.2", "127.0.1.2", "127.0.2.2")]
    assert [c.banner[0] for c in clients] == [220] * 3
    over = RawSMTP(running.port, source="127.0.3.2")  # the same /16
    assert over.banner == (421, "4.7.0 Too many connections from your network")
    clients[0].close()
    clients[0] = _once_released(running.port, source="127.0.3.2")  # a slot of the /16 is free again
    assert clients[0].banner[0] == 220
    assert RawSMTP(running.port, source="127.1.0.2").banner[0] == 220  # another /16
    for c in clients:
        c.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_clients_are_counted_and_refused_over_the_limits(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings(INTAKE_SMTP__LISTEN="[::1]:0", INTAKE_SMTP__MAX_CONNECTIONS="10",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_IP="3",
                                                  INTAKE_SMTP__MAX_CONNECTIONS_PER_NETWORK="3"))
    clients = [RawSMTP(running.port, source="::1", host="::1") for _ in range(3)]
    assert [c.banner[0] for c in clients] == [220] * 3
    assert RawSMTP(running.port, source="::1", host="::1").banner[0] == 421
    clients.pop().close()
    clients.append(_once_released(running.port, source="::1", host="::1"))
    assert clients[-1].banner[0] == 220  # released under the keys it was counted under
    for c in clients:
        c.close()


def test_an_ipv6_64_counts_as_one_network_and_ipv4_mapped_addresses_as_ipv4():
    """One IPv6 /64 is 2^64 addresses: each under its per-address limit, together under one."""
    limits = ConnectionLimits(10_000, 50, 100, 24, 64)
    admitted = [limits.admit(f"2001:db8:1:2:{n:x}::1") for n in range(1000)]
    assert admitted.count(None) == 100 and set(admitted[100:]) == {"network"}
    assert limits.admit("2001:db8:1:3::1") is None  # the next /64
    for n in range(100):
        limits.release(f"2001:db8:1:2:{n:x}::1")
    limits.release("2001:db8:1:3::1")
    assert limits.total == 0
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same address, the same /24.
    for n in range(50):
        assert limits.admit("198.51.100.7" if n % 2 else "::ffff:198.51.100.7") is None
    assert limits.admit("::ffff:198.51.100.7") == "address"
    assert limits.admit("198.51.100.7") == "address"
    for n in range(50):
        assert limits.admit(f"::ffff:198.51.100.{n + 8}") is None
    assert limits.admit("198.51.100.200") == "network"
    assert limits.admit("198.51.101.1") is None
    wider = ConnectionLimits(10_000, 50, 2, 24, 48)
    assert [wider.admit(a) for a in ("2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:1:ffff::1")] == [None, None,
                                                                                                      "network"]
    assert limits.admit("/run/intake.sock") is None  # not an IP address: its own address and network


# -- SMTPUTF8 ------------------------------------------------------------------------------------


def test_smtputf8_sender_and_recipient_are_accepted_and_stored(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings())
    sender = "josé@bücher.example"
    recipient = "Security+prüfung@example.com"
    body = ("From: José <josé@bücher.example>\r\nTo: security@example.com\r\nSubject: Über XSS\r\n\r\n"
            "Grüße\r\n").encode()
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8")
        assert client.has_extn("8bitmime")
        assert client.sendmail(sender, [recipient], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    [row] = stored_rows(running.engine)
    assert row["mail_from"] == sender
    assert rcpts(row) == [recipient]
    assert row["raw"] == body


def test_null_sender_is_stored_as_empty(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings())
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        assert client.sendmail("<>", ["security@example.com"], message_bytes("bounce")) == {}
    [row] = stored_rows(running.engine)
    assert row["mail_from"] == ""


# -- SMTP smuggling (CVE-2024-27305) -------------------------------------------------------------


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\n"])
def test_smuggled_second_message_stays_inside_the_first(make_settings, start_intake_listener, fake_end):
    running = start_intake_listener(make_settings())
    client = RawSMTP(running.port)
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<alice@researcher.test>")[0] == 250
    assert client.command("RCPT TO:<security@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    smuggled = (b"MAIL FROM:<evil@x>\nRCPT TO:<security@example.com>\nDATA\n"
                b"From: ceo@example.com\nSubject: smuggled\n\nwire the money" + fake_end)
    # All in one write, as a pipelining attacker would send it, then the real end of data.
    client.send(b"From: alice@researcher.test\r\nSubject: legit\r\n\r\nhello" + fake_end + smuggled + b"\r\n.\r\n"
                + b"QUIT\r\n")
    code, text = client.reply()
    assert code == 250, text
    after = client.rest()
    client.close()
    # Exactly one answer to the end of data, then QUIT's: no replies to smuggled commands.
    assert after.startswith(b"221"), after
    assert after.count(b"\r\n") == 1, after
    [row] = stored_rows(running.engine)
    assert row["mail_from"] == "alice@researcher.test"
    assert b"Subject: legit" in row["raw"]
    assert b"MAIL FROM:<evil@x>" in row["raw"]
    assert b"Subject: smuggled" in row["raw"]
    assert b"wire the money" in row["raw"]


# -- 250 means committed; 451 when it cannot be ------------------------------------------------


def _fresh_connection_rows(url: str) -> list[tuple]:
    """Read inbound_message with the bare driver on a new connection: no engine, no pool, no cache."""
    query = ("SELECT raw, sha256, size, status, mail_from FROM inbound_message m JOIN inbound_raw r ON r.id = m.id "
             "ORDER BY m.id")
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            return [tuple(row) for row in connection.execute(query)]
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return [tuple(row) for row in connection.execute(query)]


def test_250_means_the_exact_bytes_are_committed(make_settings, start_intake_listener, empty_database_url):
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=empty_database_url))
    # Given a str, smtplib turns line ends into CRLF and dot-stuffs; the server must undo exactly the latter.
    sent = ("From: Alice <alice@researcher.test>\nTo: security@example.com\nSubject: exact bytes\n\n"
            "a lone dot follows\n.\n..two dots\n.leading dot\ntrailing spaces   \n\tand a tab\n\n")
    as_delivered = sent.replace("\n", "\r\n").encode()
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@researcher.test")[0] == 250
        assert client.rcpt("security@example.com")[0] == 250
        code, text = client.data(sent)
        assert code == 250, text
        # Checked before anything else happens: no processor ran, nothing flushed on close.
        rows = _fresh_connection_rows(empty_database_url)
    [(raw, sha256, size, status, mail_from)] = rows
    assert bytes(raw) == as_delivered
    assert sha256 == hashlib.sha256(as_delivered).hexdigest()
    assert size == len(as_delivered)
    assert status == "pending"
    assert mail_from == "alice@researcher.test"
    stored_id = int(re.search(rb"queued as (\d+)", text).group(1))
    assert stored_id == stored_rows(running.engine)[0]["id"]


def test_the_sqlite_fast_insert_stores_what_sqlalchemy_would_and_answers_ids_in_order(tmp_path):
    """On SQLite the listener inserts through the driver, not SQLAlchemy: the rows must be the same
    to the byte as SQLAlchemy's (instants, JSON, blobs), and each message must get its own id."""
    arrivals = [Arrival(f"r{i}@researcher.test", ["security@example.com", f"security+t{i}@example.com"],
                        "127.0.0.1:4000", "client.test", b"same bytes\r\n" if i < 2 else b"other\r\n",
                        datetime(2026, 3, 1, 12, 0, i, 1000 * i, tzinfo=timezone.utc)) for i in range(3)]
    fast = make_engine(f"sqlite:///{tmp_path / 'fast.db'}")
    core = make_engine(f"sqlite:///{tmp_path / 'core.db'}")
    for engine in (fast, core):
        schema.upgrade(engine)
    assert inbound.store(fast, arrivals) == [1, 2, 3]
    with core.begin() as connection:
        connection.execute(insert(InboundMessage.__table__), inbound._rows(core, arrivals))

    def table(engine) -> list[tuple]:  # type: ignore[no-untyped-def]
        with sqlite3.connect(engine.url.database) as connection:
            return connection.execute("SELECT * FROM inbound_message ORDER BY id").fetchall()

    assert table(fast) == table(core)
    stored = inbound.get(fast, 2)
    assert (stored.message.mail_from, stored.message.rcpt_tos, stored.raw) == (
        arrivals[1].mail_from, arrivals[1].rcpt_tos, arrivals[1].raw)
    assert stored.message.received_at == arrivals[1].received_at


def test_with_no_worker_checkpointing_the_listener_keeps_the_wal_bounded(tmp_path):
    """The listener's connections leave checkpoints to the worker; with the worker down the WAL
    must not grow without bound: past the limit the committer checkpoints by itself."""
    limit, message = 256 * 1024, b"x" * 16 * 1024
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}", checkpoint_on_commit=False)  # as the listener's
    schema.upgrade(engine)
    committer = GroupCommitter(engine, wal_limit=limit)
    sizes = []

    async def deliver() -> None:
        for i in range(256):  # 4 MB of mail, 16 times the limit
            await committer.store(Arrival("r@researcher.test", ["security@example.com"], "127.0.0.1:4000",
                                          "client.test", message + str(i).encode(), datetime.now(timezone.utc)), 60)
            sizes.append(wal_size(engine))

    try:
        asyncio.run(deliver())
    finally:
        committer.close()
    assert max(sizes) < 4 * limit, f"the WAL grew to {max(sizes)} bytes"
    assert len(stored_rows(engine)) == 256


def test_451_when_the_store_fails_and_a_retry_succeeds_after_repair(make_settings, start_intake_listener,
                                                                   tmp_path):
    database = tmp_path / "broken.db"
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=f"sqlite:///{database}"))
    message = message_bytes("retried")
    with sqlite3.connect(database) as admin:  # the operator's mistake, made for real
        admin.execute("ALTER TABLE inbound_message RENAME TO inbound_message_moved")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@researcher.test", ["security@example.com"], message)
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.startswith(b"4.3.0")
        # The session survives a failed store; the client may try again on the same connection.
        assert client.noop()[0] == 250
        with sqlite3.connect(database) as admin:
            admin.execute("ALTER TABLE inbound_message_moved RENAME TO inbound_message")
            assert admin.execute("SELECT count(*) FROM inbound_message").fetchone() == (0,)
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message) == {}
    [row] = stored_rows(running.engine)
    assert row["raw"] == message
    assert row["status"] == "pending"


def test_451_when_every_insert_fails_and_a_retry_succeeds_after_repair(make_settings, start_intake_listener,
                                                                        tmp_path):
    database = tmp_path / "refusing.db"
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=f"sqlite:///{database}"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("first")) == {}
    # The database refuses the write inside the writer's transaction (as a full or read-only disk would).
    with sqlite3.connect(database) as admin:
        admin.execute("CREATE TRIGGER refuse BEFORE INSERT ON inbound_message "
                      "BEGIN SELECT RAISE(ABORT, 'disk is read-only for the test'); END")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("second"))
    assert refused.value.smtp_code == 451
    with sqlite3.connect(database) as admin:
        admin.execute("DROP TRIGGER refuse")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("second")) == {}
    assert [b"first" in r["raw"] for r in stored_rows(running.engine)] == [True, False]
    assert len(stored_rows(running.engine)) == 2


# -- many clients at once (group commit) -------------------------------------------------------


def test_many_concurrent_clients_each_message_stored_exactly_once(make_settings, start_intake_listener,
                                                                 empty_database_url):
    running = start_intake_listener(make_settings(INTAKE_DATABASE__URL=empty_database_url))
    threads, per_thread = 20, 10
    answers: dict[str, tuple[int, bytes]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def client_thread(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", running.port, timeout=60) as client:
                client.ehlo(f"client{n}.test")
                start.wait()
                for m in range(per_thread):
                    marker = f"t{n:02d}m{m:02d}-{uuid.uuid4().hex}"
                    assert client.mail("alice@researcher.test")[0] == 250
                    assert client.rcpt("security@example.com")[0] == 250
                    answers[marker] = client.data(message_bytes(marker))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=client_thread, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == []
    assert len(answers) == threads * per_thread
    assert {code for code, _ in answers.values()} == {250}

    rows = stored_rows(running.engine)
    assert len(rows) == threads * per_thread
    by_id = {row["id"]: row for row in rows}
    for marker, (_, text) in answers.items():
        # The id in each client's 250 is the row holding that client's message: no futures crossed.
        stored_id = int(re.search(rb"queued as (\d+)", text).group(1))
        assert f"marker {marker}".encode() in bytes(by_id[stored_id]["raw"]), marker
    stored_markers = [re.search(rb"marker (\S+)", bytes(row["raw"])).group(1).decode() for row in rows]
    assert sorted(stored_markers) == sorted(answers)  # each exactly once


# -- STARTTLS ------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
    key.write_bytes(certificate.private_key_pem.bytes())
    return ca, chain, key


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_starttls_is_offered_with_a_certificate_and_mail_is_accepted_over_it(make_settings, start_intake_listener,
                                                                            tls_files):
    ca, chain, key = tls_files
    running = start_intake_listener(make_settings(INTAKE_SMTP__TLS_CERTIFICATE=str(chain),
                                                  INTAKE_SMTP__TLS_KEY=str(key)))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert client.starttls(context=_client_context(ca))[0] == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # not offered twice
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("tls")) == {}
    [row] = stored_rows(running.engine)
    assert b"marker tls" in row["raw"]


def test_tls_min_version_1_3_refuses_a_tls_1_2_client_and_takes_a_tls_1_3_one(make_settings, start_intake_listener,
                                                                                tls_files):
    """A policy that promises TLS 1.3 (EmailConnect's) is kept at the handshake: a client that
    cannot speak it gets no session, so it never sends the report over something older."""
    ca, chain, key = tls_files
    running = start_intake_listener(make_settings(INTAKE_SMTP__TLS_CERTIFICATE=str(chain),
                                                  INTAKE_SMTP__TLS_KEY=str(key),
                                                  INTAKE_SMTP__REQUIRE_STARTTLS="true",
                                                  INTAKE_SMTP__TLS_MIN_VERSION="1.3"))
    old_client = _client_context(ca)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        with pytest.raises(ssl.SSLError):
            client.starttls(context=old_client)
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.starttls(context=_client_context(ca))
        assert client.sock.version() == "TLSv1.3"
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("tls13")) == {}
    [row] = stored_rows(running.engine)
    assert b"marker tls13" in row["raw"]


def test_no_starttls_without_a_certificate(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings())
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("size")  # the EHLO answer was read
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 454  # "TLS not available"


def test_require_starttls_refuses_mail_in_clear(make_settings, start_intake_listener, tls_files):
    ca, chain, key = tls_files
    running = start_intake_listener(make_settings(INTAKE_SMTP__TLS_CERTIFICATE=str(chain),
                                                  INTAKE_SMTP__TLS_KEY=str(key),
                                                  INTAKE_SMTP__REQUIRE_STARTTLS="true"))
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@researcher.test")[0] == 530
        assert client.rcpt("security@example.com")[0] == 530
        assert client.docmd("DATA")[0] == 530
    assert stored_rows(running.engine) == []
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        client.starttls(context=_client_context(ca))
        assert client.sendmail("alice@researcher.test", ["security@example.com"], message_bytes("secure")) == {}
    [row] = stored_rows(running.engine)
    assert b"marker secure" in row["raw"]


def test_commands_pipelined_after_starttls_are_discarded(make_settings, start_intake_listener, tls_files):
    """CVE-2024-34083: plaintext sent behind STARTTLS must not be run inside the TLS session."""
    ca, chain, key = tls_files
    running = start_intake_listener(make_settings(INTAKE_SMTP__TLS_CERTIFICATE=str(chain),
                                                  INTAKE_SMTP__TLS_KEY=str(key)))
    client = RawSMTP(running.port)
    assert client.command("EHLO client.test")[0] == 250
    code, _ = client.command(b"STARTTLS\r\nMAIL FROM:<evil@x>")
    assert code == 220
    tls = _client_context(ca).wrap_socket(client.sock, server_hostname="127.0.0.1")
    tls.settimeout(10)
    tls.sendall(b"EHLO client.test\r\n")
    reply = b""
    while not re.search(rb"(^|\r\n)250 [^\r\n]*\r\n$", reply):
        reply += tls.recv(65536)
    # Had the injected MAIL run, RCPT would now be accepted; without it the server wants MAIL first.
    tls.sendall(b"RCPT TO:<security@example.com>\r\n")
    assert tls.recv(65536).startswith(b"503")
    tls.close()
