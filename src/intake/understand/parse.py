"""Bytes -> :class:`ParsedMail`. Pure (no database, no clock) and it never raises.

Two stages. The MIME structure is read first (:mod:`intake.understand.mime_reader`), with limits
applied *while* it reads: a hostile message still parses into a ParsedMail holding what could be
read, plus a warning naming the limit it hit (each limit starts the warning with "limit <NAME>").
mail-parser cannot do this part: it reads whatever it is given, unbounded.

mail-parser then extracts the content of that tree (:mod:`intake.understand.content`): the text of
the body parts and the attachments; HTML-only mail becomes text (:mod:`intake.understand.body_text`).
What it does not do is read elsewhere: parts recovered after a premature closing boundary and
embedded messages (an inline forward is read as part of the message, an attached one stays one
attachment of its exact bytes) by the reader, delivery reports by :mod:`intake.understand.bounces`,
the addresses by :mod:`intake.understand.addresses`, and here encryption, the loop headers and the
subject (decoded exactly as the stdlib's modern policy does). If anything unexpected still fails,
the result is built from a cheap scan of the header block and the raw bytes stay stored.

Every string in a ParsedMail is display-safe (see :mod:`intake.understand.header_text`).

A wall-clock bound is not this module's job: :mod:`intake.understand.parse_guard` runs :func:`parse` in a
helper process it can kill.
"""

from __future__ import annotations

import codecs
import dataclasses
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

from intake.understand.addresses import recipients, sender
from intake.understand.body_text import body_text
from intake.understand.bounces import delivery_report
from intake.understand.content import Content, extract_content
from intake.understand.header_text import (
    clean_text, decode_words, display_value, first_message_id, guarded, header_values, message_ids,
    scan_header_block, warn,
)
from intake.understand.mime_reader import MimePart, read_mime, shown_inline, walk_parts
from intake.understand.parsed_mail import LANGUAGE_HEADERS, LOOP_HEADERS, ParsedMail
from intake.understand.pgp_inbound import (
    Decryption, decrypt_inline, decrypted_mail, is_pgp_mime, open_pgp_mime, public_keys,
)


# -- encryption ----------------------------------------------------------------------------------

_SMIME_NOT_ENCRYPTED = {"signed-data", "certs-only", "compressed-data"}
_PGP_ARMOR = "-----BEGIN PGP MESSAGE-----"


def _param(part: Message, name: str) -> str:
    value = part.get_param(name)
    text = collapse_rfc2231_value(value) if isinstance(value, tuple) else (value or "")
    return clean_text(text, 255).lower()


def _is_smime_encrypted(part: Message) -> bool:
    """RFC 8551 enveloped (or authenticated-enveloped) data; signed-only data is not encrypted."""
    return part.get_content_type() in ("application/pkcs7-mime", "application/x-pkcs7-mime") and \
        _param(part, "smime-type") not in _SMIME_NOT_ENCRYPTED


def _encrypted_parts(root: MimePart) -> str | None:
    """The kind of the first encrypted entity, "pgp-mime" or "smime", if any. (The third kind, an
    armored PGP block in the text, "inline-pgp", is found in the body text.)"""
    for part, _, _ in walk_parts(root):
        if is_pgp_mime(part):
            return "pgp-mime"
        if not part.is_multipart() and _is_smime_encrypted(part):
            return "smime"
    return None


def _pgp_ciphertexts(root: MimePart) -> list[str]:
    """The encrypted parts of PGP/MIME entities as text, unchanged: the body shows them, so the
    armored block can be decrypted from the ticket without fetching the attachment."""
    return [(part.get_payload(decode=True) or b"").decode("utf-8", "replace") for part, parent, _ in walk_parts(root)
            if parent is not None and is_pgp_mime(parent) and part.get_content_type() == "application/octet-stream"]


def parse_headers_only(raw: bytes, warning: str) -> ParsedMail:
    """A minimal ParsedMail from a cheap scan of the header block, for when parsing failed or
    took too long; *warning* says which. The raw bytes stay stored for a later reprocess."""
    scanned = scan_header_block(raw.removeprefix(codecs.BOM_UTF8))
    # Bounded before any decoding: this path must stay cheap whatever the headers hold.
    values = {name: [clean_text(value) for value in found] for name, found in scanned.items()}
    content_type = clean_text(values.get("content-type", [""])[0].split(";")[0], 255).lower()
    return _mail_from(values, [warning], content_type=content_type or "text/plain", body_text="",
                      header_count=sum(map(len, values.values())))


# -- parse -------------------------------------------------------------------------------------


def parse(raw: bytes, decryption: Decryption | None = None) -> ParsedMail:
    """Parse *raw*; whatever happens, return a ParsedMail (warnings say what went wrong). With
    *decryption*, a report encrypted to the organisation's key is read as its plaintext (see
    :mod:`intake.understand.pgp_inbound`)."""
    try:
        return _parse(raw, decryption)
    except Exception as exc:  # noqa: BLE001 - the promise is "never raises"; the raw bytes stay stored
        return parse_headers_only(raw, f"parse failed ({type(exc).__name__}); only the header block was read")


def _parse(raw: bytes, decryption: Decryption | None = None) -> ParsedMail:
    reading = read_mime(raw)
    root, warnings = reading.root, list(reading.warnings)
    if decryption is not None and is_pgp_mime(root):
        opened = open_pgp_mime(raw, root, decryption)
        if opened.raw is not None:
            return decrypted_mail(_parse(opened.raw), opened, decryption)
        warn(warnings, opened.failure)
    # What we read of the tree ourselves is read first: the extraction writes into it.
    values = header_values(root)
    content_type = clean_text(root.get_content_type(), 255)
    is_report = (_param(root, "report-type") or None) if content_type == "multipart/report" else None
    encrypted_parts, ciphertexts = _encrypted_parts(root), _pgp_ciphertexts(root)
    body_language = guarded(lambda: _text_part_language(root), "", "text part's Content-Language", warnings)
    content = extract_content(root, warnings, reading.large_parts)
    body = body_text(content, ciphertexts, warnings)
    keys = guarded(lambda: public_keys(content, body), [], "OpenPGP keys", warnings)
    encrypted = encrypted_parts or ("inline-pgp" if _PGP_ARMOR in body else None)
    pgp = None
    if encrypted == "inline-pgp" and decryption is not None:
        body, pgp = decrypt_inline(body, decryption, keys, warnings)
    if encrypted:
        warn(warnings, f"encrypted: {encrypted}" + (" (decrypted; ciphertext kept as received)" if pgp and pgp.decrypted
                                                    else ""))
    mail = _mail_from(
        values, warnings,
        content_type=content_type,
        body_text=body,
        attachments=[attachment for attachment, _ in content.attachments],
        encrypted=encrypted,
        is_report=is_report,
        pgp=pgp,
        public_keys=keys,
        body_language=body_language,
        part_count=reading.part_count,
        header_count=reading.header_count,
    )
    return _with_delivery_report(mail, content)


def _text_part_language(root: MimePart) -> str:
    """The Content-Language of the message's first text part shown inline (the text the sender
    wrote, in a multipart message), display-safe and bounded; '' when it has none."""
    for part, _, _ in walk_parts(root):
        if part is not root and part.get_content_maintype() == "text" and shown_inline(part, bool(part.get_filename())):
            return display_value(part.get("content-language", ""))
    return ""


def _mail_from(values: dict[str, list[str]], warnings: list[str], **content: Any) -> ParsedMail:
    """A ParsedMail: the fields read from the top-level header *values* (raw, by lowercased name),
    plus the *content* fields."""

    def first(name: str) -> str:
        return values[name][0] if name in values else ""

    from_name, from_address = sender(values.get("from", []), warnings)
    listed = recipients(values.get("to", []), values.get("cc", []), warnings)
    return ParsedMail(
        message_id=first_message_id(first("message-id")),
        subject=clean_text(decode_words(first("subject"))),  # whole: it must read as the stdlib reads it
        from_address=from_address,
        from_name=from_name,
        to=listed.to,
        in_reply_to=first_message_id(first("in-reply-to")),
        references=[clean_text(r, 500) for r in message_ids(first("references"))][:100],
        auto_submitted=clean_text(first("auto-submitted"), 100).lower() or None,
        precedence=clean_text(first("precedence"), 100).lower() or None,
        warnings=warnings,
        headers={name: display_value(values[name][0])
                 for name in (*LOOP_HEADERS, *LANGUAGE_HEADERS) if name in values},
        cc=listed.cc,
        recipient_count=listed.count,
        undisclosed_recipients=listed.undisclosed,
        **content,
    )


def _with_delivery_report(mail: ParsedMail, content: Content) -> ParsedMail:
    report = guarded(lambda: delivery_report(mail, content), None, "delivery report", mail.warnings)
    return mail if report is None else dataclasses.replace(mail, delivery_report=report)
