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
from datetime import datetime
from email.utils import format_datetime

from intake.receive.xforward import MAX_NAME

_MAX_ADDRESS = 320  # an envelope address (RFC 5321 4.5.3.1: 64 + @ + 255)
# Kept in a word: printable ASCII but the characters that would end a word or start a comment.
_WORD = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("()\\;<>\"")


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
    received = "\r\n\t".join(clauses) + f"; {format_datetime(at)}"
    return f"Return-Path: <{_address(mail_from)}>\r\nReceived: {received}\r\n"


def _tcp_info(hop: Hop) -> str:
    literal = _literal(hop.addr)
    return f"{_word(hop.name)} {literal}" if hop.name else literal


def _literal(addr: str) -> str:
    """An address literal (RFC 5321 4.1.3): ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``; an
    IPv4-mapped address as its IPv4 address."""
    try:
        address = ipaddress.ip_address(addr.partition("%")[0])
    except ValueError:
        return f"[{_word(addr)}]"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _word(text: str | None) -> str:
    """*text* as one bounded word of the header; ``unknown`` for none."""
    cleaned = "".join(c if c in _WORD else "?" for c in (text or "")[:MAX_NAME])
    return cleaned or "unknown"


def _address(text: str) -> str:
    """An envelope address for inside ``<>``: printable, UTF-8 kept (SMTPUTF8), bounded, no ``<>``."""
    return "".join(c if c.isprintable() and c not in "<>" else "?" for c in text[:_MAX_ADDRESS])
