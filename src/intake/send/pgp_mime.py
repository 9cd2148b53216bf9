"""Outgoing mail encrypted to its recipients' OpenPGP keys as PGP/MIME (RFC 3156).

The composer builds the message as ever; :func:`encrypted` then moves its MIME fields and body
into an entity that is encrypted (and signed with the organisation's key: the combined method,
RFC 3156 section 6.2) and left as the second part of a multipart/encrypted. The routing and
threading headers (From, To, Subject, Message-ID, In-Reply-To, References, Auto-Submitted, our
loop marker and X-Intake-Ticket) stay outside, readable by every relay and by intake when a
reply or a bounce comes back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from intake import openpgp

_MIME_FIELDS = (b"content-", b"mime-version")


@dataclass(frozen=True)
class Encryption:
    """Who a mail is encrypted to (armored certificates) and the key that signs it."""

    recipient_keys: tuple[str, ...]
    signer: openpgp.OrgKey | None


def _fields(head: bytes) -> list[bytes]:
    """The header fields of *head* (CRLF line endings), each with its folded lines."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def encrypted(raw: bytes, encryption: Encryption) -> bytes:
    """*raw* (a message the composer made, CRLF line endings) as PGP/MIME to *encryption*'s keys."""
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = _fields(head)
    mime = [field for field in fields if field.lower().startswith(_MIME_FIELDS)]
    outer = [field for field in fields if not field.lower().startswith(_MIME_FIELDS)]
    inner = b"\r\n".join(field for field in mime if not field.lower().startswith(b"mime-version")) + \
        b"\r\n\r\n" + body
    ciphertext = openpgp.encrypt(inner, list(encryption.recipient_keys), encryption.signer)
    boundary = f"intake-pgp-{secrets.token_hex(12)}".encode()
    parts = [
        b"This is an OpenPGP/MIME encrypted message (RFC 3156).",
        b"--" + boundary,
        b"Content-Type: application/pgp-encrypted",
        b"Content-Description: PGP/MIME version identification",
        b"",
        b"Version: 1",
        b"",
        b"--" + boundary,
        b'Content-Type: application/octet-stream; name="encrypted.asc"',
        b"Content-Description: OpenPGP encrypted message",
        b'Content-Disposition: inline; filename="encrypted.asc"',
        b"",
        ciphertext.replace(b"\r\n", b"\n").rstrip(b"\n").replace(b"\n", b"\r\n"),
        b"",
        b"--" + boundary + b"--",
        b"",
    ]
    top = [*outer, b"MIME-Version: 1.0",
           b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="'
           + boundary + b'"']
    return b"\r\n".join(top) + b"\r\n\r\n" + b"\r\n".join(parts)
