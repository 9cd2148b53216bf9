"""The listener answers as aiosmtpd does where it takes a quicker way: MAIL FROM / RCPT TO
addresses read without the header parser, the EHLO answer sent in one piece."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from aiosmtpd.smtp import SMTP

from intake.receive import addresses
from intake.receive.listener import IntakeSMTP
from test_listener import RawSMTP

LOCAL_PART_LIMIT = 64

# The usual forms (which must take the quick way) and every kind of odd one next to them.
TABLE = [
    "<a@b.c>", "<researcher1@loadgen.test>", "<security+SEC-1@example.com>", "<A@B.C>", "<1@2.3>", "<a@b>",
    "<o'brien@example.com>", "<a{b}|c~!#$%&*/=?^_`@d-e.f>", "<a@b-c.d>", "<a@-b.c>", "<x.y.z@a.b.c.d>",
    # parameters after the address, and the white space (or none) before them
    "<a@b.c> SIZE=100", "<a@b.c>  SIZE=100 BODY=8BITMIME", "<a@b.c>\tSIZE=1", "<a@b.c> \t SIZE=1",
    "<a@b.c>SIZE=1", "<a@b.c> ", "<a@b.c>\t", "<a@b.c> \x0bSIZE=1", "<a@b.c> \u3000SIZE=1", "<a@b.c>\x0b",
    "<a@b.c> \x00", "<a@b.c>>", "<a@b.c> SMTPUTF8", "<a@b.c> x (y)",
    # comments
    "<a@b.c> (comment) SIZE=1", "<a@b.c>(comment)", "<a@b.c>  (x)", "<a@b.c>\t(x)", "(c) <a@b.c>", "<a(b)@c.d>",
    "<a@b.c> (unclosed", "<a@b.c> (a (nested) one) SIZE=1",
    # the null path
    "<>", "<> SIZE=1", "<>x", "<> (c)", "<>>",
    # white space inside, or around the brackets
    "< a@b.c>", "<a @b.c>", "<a@ b.c>", "<a@b.c >", "<a. b@c.d>", " <a@b.c>", "\t<a@b.c>",
    # quoted local parts, source routes, address literals
    '<"a b"@c.d>', '<"ab"@c.d>', '<"a\\"b"@c.d>', '<"a@b"@c.d>', '<""@c.d>', "<@route.example:a@b.c>",
    "<@r1,@r2:a@b.c>", "<@r1:a@b.c> SIZE=1", "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>", "<a@[bad]>",
    # SMTPUTF8 and other non-ASCII
    "<ü@b.c>", "<a@bü.c>", "<δοκιμή@παράδειγμα.δοκιμή>", "<a@b.c> ü", "<\udcff@b.c>", "<a\x7f@b.c>",
    # bad syntax
    "<a..b@c.d>", "<.a@c.d>", "<a.@c.d>", "<a@b..c>", "<a@.b>", "<a@b.>", "<a>", "<a@>", "<@b>", "<a@b@c>",
    "<a\\b@c.d>", "<a,b@c.d>", "<a;b@c.d>", "<a:b@c.d>", "<a[b]@c.d>", "<a@b.c", "a@b.c>", "<<a@b.c>>",
    "<a@b,c>", "<a@b;c>", "<", ">", "<@>", "<.>",
    # no brackets
    "a@b.c", "a@b.c SIZE=1", "a", "@", "", " ",
    # what could be an encoded word (the parser decodes one at the start of an atom)
    "<=?utf-8?q?a?=@b.c>", "<a@=?utf-8?q?b?=>", "<a=?b@c.d>", "<=?x@b.c>", "<=?utf-8?q?=41?=@b.c>",
    # the local part's length limit
    "<" + "a" * LOCAL_PART_LIMIT + "@b.c>", "<" + "a" * (LOCAL_PART_LIMIT + 1) + "@b.c>",
    "<" + "a." * 32 + "a@b.c>", '<"' + "a" * LOCAL_PART_LIMIT + '"@b.c>',
]


def aiosmtpd_reading(arg: str, local_part_limit: int) -> object:
    """What aiosmtpd's own ``_getaddr`` answers, or the exception it raises (``"<"`` is an
    IndexError in the header parser; the session answers it 500). It reads nothing of the
    protocol but the limit."""
    protocol = SMTP.__new__(SMTP)
    protocol.local_part_limit = local_part_limit
    return _outcome(lambda: SMTP._getaddr(protocol, arg))


def listener_reading(arg: str, local_part_limit: int) -> object:
    protocol = IntakeSMTP.__new__(IntakeSMTP)
    protocol.local_part_limit = local_part_limit
    return _outcome(lambda: protocol._getaddr(arg))


def _outcome(read) -> object:  # type: ignore[no-untyped-def]
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - the answer compared
        return type(exc)


@pytest.mark.parametrize("limit", [0, LOCAL_PART_LIMIT])
def test_the_listener_reads_every_address_of_the_table_as_aiosmtpd_does(limit):
    differences = {arg: (listener_reading(arg, limit), aiosmtpd_reading(arg, limit)) for arg in TABLE
                   if listener_reading(arg, limit) != aiosmtpd_reading(arg, limit)}
    assert not differences


def test_the_listener_reads_random_addresses_as_aiosmtpd_does():
    """Strings near the quick form, mutated at random (the same ones every run)."""
    alphabet = "ab.@<>\"()\\ \t[]:,;=?-+ü\x0b"
    chances = random.Random(20261203)
    differences = {}
    for _ in range(3000):
        text = list(chances.choice(["<ab@cd.ef>", "<a.b@c>", "<ab@c.d> SIZE=1", "<>", "<a@b>  x"]))
        for _ in range(chances.randint(1, 3)):
            position = chances.randrange(len(text) + 1)
            if chances.random() < 0.3 and position < len(text):
                del text[position]
            else:
                text.insert(position, chances.choice(alphabet))
        arg = "".join(text)
        for limit in (0, 2):
            if listener_reading(arg, limit) != aiosmtpd_reading(arg, limit):
                differences[(arg, limit)] = (listener_reading(arg, limit), aiosmtpd_reading(arg, limit))
    assert not differences


@pytest.mark.parametrize("arg", ["<researcher1@loadgen.test>", "<security+SEC-2026-0001@example.com> SIZE=4369",
                                 "<a@b.c>  SIZE=1 BODY=8BITMIME", "<o'brien@example.com>"])
def test_the_usual_forms_are_read_without_the_header_parser(arg):
    assert addresses.simple(arg, LOCAL_PART_LIMIT) == aiosmtpd_reading(arg, LOCAL_PART_LIMIT)


@pytest.mark.parametrize("arg", ['<"a b"@c.d>', "<@r:a@b.c>", "<ü@b.c>", "<a@b.c> (c)", "<>", "a@b.c", "< a@b.c>",
                                 "<=?utf-8?q?a?=@b.c>"])
def test_anything_unusual_is_left_to_aiosmtpd(arg):
    assert addresses.simple(arg, LOCAL_PART_LIMIT) is None


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # what is answered here does not depend on the database


BARE_SIZE_LIMIT = 25 * 1024 * 1024


class _Bare:
    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        return "250 OK"


@pytest.fixture
def bare_port():
    """A plain aiosmtpd server (intake's listener's settings) on a loopback port."""
    loop = asyncio.new_event_loop()

    def factory() -> SMTP:
        return SMTP(_Bare(), data_size_limit=BARE_SIZE_LIMIT, enable_SMTPUTF8=True, decode_data=False,
                    hostname="bare.test", ident="intake", loop=loop)

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


def mail_replies(port: int, args: list[str]) -> list[tuple[int, str]]:
    client = RawSMTP(port)
    try:
        client.command("EHLO client.test")
        replies = []
        for arg in args:
            replies.append(client.command(f"MAIL FROM:{arg}".encode("utf-8", "surrogateescape")))
            client.command("RSET")
        return replies
    finally:
        client.close()


def test_mail_from_gets_the_reply_a_plain_aiosmtpd_gives(make_settings, start_intake_listener, bare_port):
    """Over TCP, the listener (which has no MAIL hook of its own) answers every MAIL FROM of the
    table as aiosmtpd does."""
    listener = start_intake_listener(make_settings())
    assert mail_replies(listener.port, TABLE) == mail_replies(bare_port, TABLE)


def test_the_ehlo_answer_is_aiosmtpds_line_for_line(make_settings, start_intake_listener, bare_port):
    """Sent in one write, the EHLO answer is still aiosmtpd's, but for the host name; and EHLO
    without a name, and HELO, get aiosmtpd's replies."""
    listener = start_intake_listener(make_settings(INTAKE_SMTP__HOSTNAME="bare.test",
                                                    INTAKE_SMTP__MAX_MESSAGE_SIZE=str(BARE_SIZE_LIMIT)))

    def answers(port: int) -> list[tuple[int, str]]:
        client = RawSMTP(port)
        try:
            return [client.command("EHLO client.test"), client.command("EHLO"), client.command("HELO client.test"),
                    client.command("EHLO again.test"), client.command("MAIL FROM:<a@b.c> SIZE=10")]
        finally:
            client.close()

    assert answers(listener.port) == answers(bare_port)
