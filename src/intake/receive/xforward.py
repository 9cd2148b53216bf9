"""Postfix's XFORWARD extension: an MTA in front of intake names the client it got the mail from.

Only clients in ``smtp.trusted_relays`` (:class:`TrustedRelays`) are offered it; from anyone
else the command is refused and changes nothing. ``XFORWARD NAME=... ADDR=...`` may come in
several commands before MAIL; each adds to (or replaces) the attributes of the transaction, which
end with it (http://www.postfix.org/XFORWARD_README.html). Values are xtext (RFC 3461 4: ``+XX``
for a byte in hex); ``[UNAVAILABLE]`` and ``[TEMPUNAVAIL]`` say the relay does not know the value.
A command with any bad attribute is refused whole (501), so the transaction keeps what it had.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace
from typing import Iterable

# What the EHLO answer offers: every attribute Postfix may send.
EHLO_KEYWORD = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"

_UNKNOWN = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
MAX_NAME = 255  # a host name (RFC 1035) and Postfix's own bound on NAME and HELO
_MAX_IDENT = 255
_PROTOCOLS = frozenset({"SMTP", "ESMTP", "LMTP", "QMQP"})
_SOURCES = frozenset({"LOCAL", "REMOTE"})


class BadXforward(ValueError):
    """An XFORWARD command intake refuses with 501; the text says why."""


@dataclass(frozen=True)
class Forwarded:
    """What XFORWARD said of the original client in this transaction; None: not said, or unknown."""

    name: str | None = None  # its host name, as the relay resolved it
    addr: str | None = None  # its IP address, normalised (no IPV6: prefix)
    port: int | None = None
    proto: str | None = None  # SMTP or ESMTP
    helo: str | None = None  # the name it greeted the relay with
    ident: str | None = None  # the relay's id of the message (its queue id)
    source: str | None = None  # LOCAL or REMOTE

    @property
    def peer(self) -> str | None:
        """As intake records a client: its address, and ``:port`` when the relay gave one."""
        if self.addr is None:
            return None
        return self.addr if self.port is None else f"{self.addr}:{self.port}"


def update(current: Forwarded, argument: str | None) -> Forwarded:
    """*current* with the attributes of one XFORWARD command's *argument*; raises
    :class:`BadXforward` (and changes nothing) if any attribute is malformed."""
    if not argument:
        raise BadXforward("Syntax: XFORWARD attribute=value ...")
    changes: dict[str, object] = {}
    for pair in argument.split():
        name, equals, encoded = pair.partition("=")
        field = name.lower()
        if not equals or field not in _CHECKS:
            raise BadXforward(f"Bad XFORWARD attribute name: {name[:32]!r}")
        value = _xtext(encoded, name)
        changes[field] = None if value in _UNKNOWN else _CHECKS[field](value)
    return replace(current, **changes)


def _xtext(encoded: str, name: str) -> str:
    """RFC 3461 xtext decoded; bytes that are not UTF-8 are refused."""
    decoded = bytearray()
    position = 0
    while position < len(encoded):
        char = encoded[position]
        if char == "+":
            digits = encoded[position + 1:position + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEFabcdef" for d in digits):
                raise BadXforward(f"Bad XFORWARD {name} value: malformed xtext")
            decoded.append(int(digits, 16))
            position += 3
            continue
        if not "!" <= char <= "~":
            raise BadXforward(f"Bad XFORWARD {name} value: malformed xtext")
        decoded.append(ord(char))
        position += 1
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadXforward(f"Bad XFORWARD {name} value: not UTF-8") from None


def _host_name(what: str):  # type: ignore[no-untyped-def]
    def check(value: str) -> str:
        # Printable, one word, bounded: it goes into logs, the store and our Received: header.
        if not value or len(value) > MAX_NAME or not value.isprintable() or any(c.isspace() for c in value):
            raise BadXforward(f"Bad XFORWARD {what} value")
        return value
    return check


def _address(value: str) -> str:
    text = value[5:] if value[:5].upper() == "IPV6:" else value
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadXforward("Bad XFORWARD ADDR value: not an IP address") from None


def _port(value: str) -> int:
    if not value.isascii() or not value.isdigit() or int(value) > 65535:
        raise BadXforward("Bad XFORWARD PORT value")
    return int(value)


def _word(allowed: frozenset[str], what: str):  # type: ignore[no-untyped-def]
    def check(value: str) -> str:
        if value.upper() not in allowed:
            raise BadXforward(f"Bad XFORWARD {what} value")
        return value.upper()
    return check


def _ident(value: str) -> str:
    if len(value) > _MAX_IDENT or not value.isprintable() or any(c.isspace() for c in value):
        raise BadXforward("Bad XFORWARD IDENT value")
    return value


_CHECKS = {
    "name": _host_name("NAME"), "addr": _address, "port": _port, "proto": _word(_PROTOCOLS, "PROTO"),
    "helo": _host_name("HELO"), "ident": _ident, "source": _word(_SOURCES, "SOURCE"),
}


class TrustedRelays:
    """The networks of ``smtp.trusted_relays``, matched against a client's address string as the
    listener has it (an IPv4-mapped IPv6 address counts as the IPv4 address). Integers, not
    ``ipaddress``: this runs for every connection when any relay is configured."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        self._networks: list[tuple[int, int, int]] = []  # (bits of the family, prefix length, network)
        for network in networks:
            bits = network.max_prefixlen
            self._networks.append((bits, network.prefixlen, int(network.network_address) >> (bits - network.prefixlen)))

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, ip: str) -> bool:
        host = ip.partition("%")[0]
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except (OSError, ValueError):
            return False  # not an IP address (a Unix socket): never a relay
        if packed[:12] == _IPV4_MAPPED:
            packed = packed[12:]
        bits, value = 8 * len(packed), int.from_bytes(packed, "big")
        return any(family == bits and value >> (bits - prefix) == network
                   for family, prefix, network in self._networks)


_IPV4_MAPPED = bytes(10) + b"\xff\xff"
