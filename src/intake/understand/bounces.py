"""What a bounce says: DSN fields, the returned message's Message-ID and X-Intake-Ticket, classic bounces."""

from __future__ import annotations

import base64
import binascii
import bisect
from dataclasses import dataclass

from intake import patterns
from intake.understand.content import Content
from intake.understand.header_text import clean_text, first_message_id, first_values, scan_header_block
from intake.understand.parsed_mail import DeliveryReport, ParsedMail
from intake.vocabulary import TICKET_HEADER

_DELIVERY_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
# text/rfc822-headers is the standard; message/rfc822-headers is seen in the wild (MailSite).
_RETURNED_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers",
                   "message/global-headers")
_ACTIONS = {"failed", "delayed", "delivered", "relayed", "expanded"}
# An enhanced status code (group 1) not inside a longer number: RE2 has no look-around, so the
# character before is matched (or the start) and one after that would extend it is caught in
# group 2, which rules the match out (see _status_code).
_STATUS_CODE = patterns.compile(r"(?:^|[^\d.])([245]\.\d{1,3}\.\d{1,3})(\.?\d)?")
_SMTP_REPLY_LINE = patterns.compile(r"^(?:.*[^\d])?[45]\d\d(?:[ -].*)?$", multiline=True)
_BOUNCED_RECIPIENT = patterns.compile(r"^<([^<>\s@]+@[^<>\s]+)>:|^[ \t]{2,}([^<>\s@]+@[^<>\s]+)[ \t]*$",
                                      multiline=True)
_DAEMON_LOCAL_PARTS = {"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"}
_BOUNCE_TEXT = patterns.compile(r"Hi\. This is the qmail-send program|"
                                r"This message was created automatically by mail delivery software", ignorecase=True)
_BOUNCE_SUBJECT = patterns.compile(
    r"^\s*(?:undeliver|delivery (?:status notification|failure|failed|has failed|problem)|"
    r"returned mail|mail delivery failed|failure notice|non-?delivery|warning: message .* delayed)", ignorecase=True)
_DAEMON_NAME = patterns.compile(r"mail delivery (?:system|subsystem)", ignorecase=True)
_DELAY_WORDS = patterns.compile(r"\bdelay|will (?:retry|keep trying)|still (?:trying|being retried)", ignorecase=True)
_QUOTED_FIELD = patterns.compile(rf"^[ \t>]*(message-id|{TICKET_HEADER.lower()})[ \t]*:[ \t]*(?:\n[ \t]+)?(\S[^\n]*)",
                                 ignorecase=True, multiline=True)
_BLANK_LINE = patterns.compile(r"\n[ \t>]*\n")
_BLANK_LINES = patterns.compile(r"\r?\n(?:[ \t]*\r?\n)+")
# Characters of a bounce's text and of its delivery-status part searched for returned headers and
# fields: they come first, and a flood of blank lines after them costs nothing.
_BOUNCE_SCAN = 64 * 1024


@dataclass
class _Returned:
    """Headers of the mail that bounced, and where the bounce's own explanation ends."""

    message_id: str | None
    ticket: str | None
    explanation_end: int | None = None  # offset in the body text; None: the explanation is all of it


def _field_blocks(text: str) -> list[dict[str, str]]:
    """The header-like blocks of a delivery-status body. A block that is only base64 is decoded
    first: some gateways (Proofpoint) re-encode the per-recipient fields that way."""
    blocks = []
    for block in _BLANK_LINES.split(text.strip()):
        fields = first_values(scan_header_block(block.encode("utf-8")))
        if fields:
            blocks.append(fields)
        elif block.strip():
            try:
                decoded = base64.b64decode("".join(block.split()), validate=True)
            except (binascii.Error, ValueError):
                continue
            blocks += _field_blocks(decoded.decode("utf-8", "replace"))
    return blocks


def _recipient_fields(status_text: str) -> dict[str, str]:
    """The per-recipient fields of a DSN: the first recipient that failed, else the first one."""
    recipients = [b for b in _field_blocks(status_text)
                  if {"final-recipient", "original-recipient", "action", "status"} & b.keys()]
    failed = [b for b in recipients if clean_text(b.get("action", ""), 40).lower().startswith("failed")]
    return (failed or recipients or [{}])[0]


def _returned_headers(content: Content, body: str) -> _Returned | None:
    """The returned message's Message-ID and X-Intake-Ticket, from a returned message or headers
    part, else from a header block quoted in the body text."""
    for attachment, data in content.attachments:
        if attachment.content_type in _RETURNED_TYPES:
            fields = first_values(scan_header_block(data))
            return _Returned(first_message_id(fields.get("message-id")), _ticket(fields.get(TICKET_HEADER.lower())))
    return _quoted_returned_headers(body[:_BOUNCE_SCAN])


def _quoted_returned_headers(body: str) -> _Returned | None:
    """A returned header block quoted in the text (qmail, Exim): the block carrying X-Intake-Ticket,
    else the first one with a Message-ID. Blocks are separated by blank lines."""
    breaks = [m.end() for m in _BLANK_LINE.finditer(body)]
    blocks: dict[int, dict[str, str]] = {}
    for match in _QUOTED_FIELD.finditer(body):
        fields = blocks.setdefault(bisect.bisect_right(breaks, match.start()), {})
        fields.setdefault(match.group(1).lower(), match.group(2))
    with_ticket = [b for b in sorted(blocks) if TICKET_HEADER.lower() in blocks[b]]
    with_id = [b for b in sorted(blocks) if "message-id" in blocks[b]]
    chosen = (with_ticket or with_id or [None])[0]
    if chosen is None:
        return None
    fields = blocks[chosen]
    return _Returned(first_message_id(fields.get("message-id")), _ticket(fields.get(TICKET_HEADER.lower())),
                     breaks[chosen - 1] if chosen else 0)


def _ticket(value: str | None) -> str | None:
    words = clean_text(value or "", 100).split()
    return words[0] if words else None


def _is_classic_bounce(mail: ParsedMail) -> bool:
    """A non-DSN bounce: sent by a mailer daemon, and saying so in its subject or opening text."""
    from_daemon = mail.from_address.rpartition("@")[0].lower() in _DAEMON_LOCAL_PARTS or \
        _DAEMON_NAME.match(mail.from_name) is not None
    return from_daemon and (_BOUNCE_SUBJECT.match(mail.subject) is not None
                            or _BOUNCE_TEXT.search(mail.body_text) is not None)


def delivery_report(mail: ParsedMail, content: Content) -> DeliveryReport | None:
    """What a DSN (multipart/report; report-type=delivery-status) says, or a classic bounce whose
    returned headers can be found. MDNs and feedback reports get none: they are not bounces."""
    is_dsn = mail.is_report == "delivery-status"
    if not is_dsn and not _is_classic_bounce(mail):
        return None
    returned = _returned_headers(content, mail.body_text)
    if not is_dsn and returned is None:
        return None
    status_part = next((data for attachment, data in content.attachments
                        if attachment.content_type in _DELIVERY_STATUS_TYPES), b"")
    fields = _recipient_fields(status_part[:_BOUNCE_SCAN].decode("utf-8", "replace"))
    explanation = mail.body_text[:_BOUNCE_SCAN][: returned.explanation_end if returned else None]
    if is_dsn:
        action = clean_text(fields.get("action", ""), 40).lower().split(" ")[0]
    else:
        action = "delayed" if _DELAY_WORDS.search(mail.subject + "\n" + explanation[:2000]) else "failed"
    status = _status_code(fields.get("status", "")) or _status_code(explanation)
    reply_line = _SMTP_REPLY_LINE.search(explanation)
    diagnostic = fields.get("diagnostic-code") or (reply_line.group() if reply_line else "")
    original_id = (returned.message_id if returned else None) or mail.in_reply_to or \
        (mail.references[-1] if mail.references else None)
    return DeliveryReport(
        original_message_id=original_id,
        original_ticket=returned.ticket if returned else None,
        recipient=_bounced_recipient(fields, mail, explanation),
        action=action if action in _ACTIONS else None,
        status=status,
        diagnostic=" ".join(clean_text(diagnostic, 500).split()) or None,
    )


def _status_code(text: str) -> str | None:
    """The first enhanced status code ("5.1.1") in *text* that is not part of a longer number."""
    return next((found.group(1) for found in _STATUS_CODE.finditer(text) if found.group(2) is None), None)


def _bounced_recipient(fields: dict[str, str], mail: ParsedMail, explanation: str) -> str | None:
    """Final-/Original-Recipient without its address type, else X-Failed-Recipients (Exim), else
    the address a qmail, Postfix or Exim explanation names."""
    candidates = [(fields.get("final-recipient") or fields.get("original-recipient") or "").rpartition(";")[2],
                  mail.headers.get("x-failed-recipients", "").split(",")[0]]
    found = _BOUNCED_RECIPIENT.search(explanation)
    if found:
        candidates.append(found.group(1) or found.group(2))
    return next((clean_text(c, 320).strip("<>") for c in candidates if c.strip()), None)
