"""intake's own trace header fields (RFC 5321 4.4): ``Return-Path:`` and ``Received:``.

They are stored beside the message (the inbound ``trace`` column), not in its bytes: the stored
bytes, their size and sha256 stay those of the message as the client sent it, so a redelivery is
still recognised as a copy, and the listener never copies a message to prepend a few lines.
:attr:`intake.store.inbound.StoredMessage.full` puts them back on top for whatever reads the
whole message.

What a client said of itself (HELO, the names XFORWARD gives) is hostile text: each goes in as
one bounded word of printable ASCII, anything else replaced by ``?``, so it can neither break the
header onto a line of its own nor pass for another clause of it.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone

from intake.receive.xforward import MAX_NAME

_MAX_ADDRESS = 320  # an envelope address (RFC 5321 4.5.3.1: 64 + @ + 255)
# Replaced in a word: the ASCII that is not printable or would end a word or start a comment.
# (str.translate and the codecs, not a loop per character: this runs for every message.)
_NOT_IN_WORD = dict.fromkeys([*range(0x00, 0x21), 0x7F, *map(ord, "()\\;<>\"")], "?")
_NOT_IN_ADDRESS = dict.fromkeys(map(ord, "<>"), "?")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Hop:
    """One end of a hop: the name it greeted with, its host name (if known) and its address."""

    helo: str
    addr: str
    name: str | None = None


def trace_fields(*, mail_from: str, rcpt_tos: list[str], client: Hop, relay: Hop | None, by: str,
                 extended: bool, authenticated: bool, tls: ssl.SSLObject | None, trace_id: str,
                 at: datetime) -> str:
    """``Return-Path:`` and ``Received:`` (CRLF, folded as Postfix folds) for a message from
    *client*, through the trusted *relay* when there was one, received by *by* at *at*."""
    clauses = [f"from {_word(client.helo)} ({_tcp_info(client)})"]
    if relay is not None:
        clauses.append(f"(via trusted relay {_word(relay.helo)} {_literal(relay.addr)})")
    if tls is not None:
        name, version, bits = tls.cipher() or ("unknown", tls.version() or "unknown", 0)
        clauses.append(f"(using {_word(version)} with cipher {_word(name)} ({bits} bits))")
    protocol = ("ESMTP" if extended else "SMTP") + ("S" if tls is not None and extended else "") + (
        "A" if authenticated and extended else "")
    clauses.append(f"by {_word(by)} (intake) with {protocol} id {trace_id}")
    if len(rcpt_tos) == 1:  # as Postfix: naming one of several would tell each of the others
        clauses[-1] += f"\r\n\tfor <{_address(rcpt_tos[0])}>"
    received = "\r\n\t".join(clauses) + f"; {_date(at)}"
    return f"Return-Path: <{_address(mail_from)}>\r\nReceived: {received}\r\n"


def _tcp_info(hop: Hop) -> str:
    literal = _literal(hop.addr)
    return f"{_word(hop.name)} {literal}" if hop.name else literal


def _literal(addr: str) -> str:
    """An address literal (RFC 5321 4.1.3): ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``; an
    IPv4-mapped address as its IPv4 address."""
    if addr.replace(".", "").isdigit() and addr.isascii():  # IPv4, the usual case, as the socket gave it
        return f"[{addr}]"
    try:
        address = ipaddress.ip_address(addr.partition("%")[0])
    except ValueError:
        return f"[{_word(addr)}]"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _word(text: str | None) -> str:
    """*text* as one bounded word of printable ASCII; ``unknown`` for none."""
    text = (text or "")[:MAX_NAME]
    if not text.isascii():
        text = text.encode("ascii", "replace").decode("ascii")  # each other character (or surrogate): ?
    return text.translate(_NOT_IN_WORD) or "unknown"


def _address(text: str) -> str:
    """An envelope address for inside ``<>``: printable, UTF-8 kept (SMTPUTF8), bounded, no ``<>``."""
    text = text[:_MAX_ADDRESS]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text.translate(_NOT_IN_ADDRESS)


def _date(at: datetime) -> str:
    """*at* as RFC 5322 date-time in UTC (email.utils.format_datetime took 16 µs, a third of this module's time)."""
    if at.tzinfo is not timezone.utc:
        at = at.astimezone(timezone.utc)
    return (f"{_DAYS[at.weekday()]}, {at.day:02d} {_MONTHS[at.month - 1]} {at.year} "
            f"{at.hour:02d}:{at.minute:02d}:{at.second:02d} +0000")
