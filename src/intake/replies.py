"""Templates -> outbound messages. Builds bytes only; sending is the outbox's job.

Every header value that came from a researcher passes through :func:`intake.parse.clean_text`
before it is used here, and the stdlib's SMTP policy refuses any CR/LF left in a header, so a
subject can never smuggle a header into our mail.
"""

from __future__ import annotations

import email.policy
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.charset import QP, Charset
from email.header import Header
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined, select_autoescape

from intake import patterns
from intake.parse import clean_text

class _Compat32(email.policy.Compat32):
    """compat32 that writes a short, plain ASCII header line as it is. The stdlib runs every
    header through ``Header.encode``, which was most of the cost of composing an
    acknowledgement, for the same bytes."""

    def _fold(self, name: str, value: object, sanitize: bool) -> str:
        if (isinstance(value, str) and value.isascii() and value.isprintable()
                and len(name) + 2 + len(value) <= self.max_line_length and "  " not in value):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


_COMPAT32_CRLF = _Compat32(linesep="\r\n")  # SMTP line endings
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in a raw mail file, unlike base64

# Marks mail we sent, so our own mail coming back is recognised as a loop.
LOOP_HEADER = "X-Intake-Loop"
# Applied to senders' subjects: RE2 (intake.patterns).
_REPLY_PREFIX = patterns.compile(r"^\s*((re|fwd?|aw|sv|vs|antw|wg|tr)\s*(\[\d+\])?\s*:\s*)+", ignorecase=True)


@dataclass(frozen=True)
class OutgoingMail:
    dedupe_key: str
    kind: str
    envelope_from: str  # '' = null sender
    recipients: list[str]
    message_id: str
    raw: bytes
    automatic: bool = False  # counted against the per-recipient auto-reply limit


@dataclass(frozen=True)
class PromisedDate:
    label: str
    due: datetime
    timezone: str
    note: str = ""

    @property
    def due_local(self) -> str:
        local = self.due.astimezone(ZoneInfo(self.timezone))
        text = local.strftime("%a %d %b %Y %H:%M %Z")
        if self.timezone != "UTC":
            text += self.due.astimezone(ZoneInfo("UTC")).strftime(" (%d %b %H:%M UTC)")
        return text


@lru_cache(maxsize=8)
def _environment(override_dir: str | None) -> Environment:
    loaders = [FileSystemLoader(override_dir)] if override_dir else []
    loaders.append(PackageLoader("intake", "templates"))
    # Plain-text templates are not escaped; HTML ones (*.html.j2: the digest's alternative) are, as
    # they show reporters' subjects. StrictUndefined turns a template typo into an error.
    return Environment(loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html.j2"], default=False),
                       undefined=StrictUndefined, keep_trailing_newline=True)


def render(template: str, override_dir: Path | None, **context: object) -> str:
    return _environment(str(override_dir) if override_dir else None).get_template(template).render(**context)


def strip_reply_prefixes(subject: str) -> str:
    """'Re: Fwd: AW: hello' -> 'hello'."""
    return _REPLY_PREFIX.sub("", subject).strip()


def new_message_id(kind: str, reference: str, domain: str) -> str:
    """A unique Message-ID on our domain that names what it is: <ack.SEC-2026-0001.1f2e…@example.com>."""
    return f"<{kind}.{reference}.{secrets.token_hex(8)}@{domain}>"


def _needs_utf8(*addresses: str) -> bool:
    return any(not address.isascii() for address in addresses)


# Dedupe-key prefix per kind of automatic reply: one of each per ticket, ever.
_KEY_PREFIX = {"acknowledgement": "ack", "out-of-scope": "out-of-scope"}


def automatic_reply(
    *,
    template: str,
    kind: str,
    reference: str,
    subject: str,
    reporter_address: str,
    reporter_name: str,
    intake_address: str,
    from_name: str,
    in_reply_to: str | None,
    references: list[str],
    deadlines: list[PromisedDate],
    policy: str,
    message_id_domain: str,
    templates_dir: Path | None,
    now: datetime,
) -> OutgoingMail:
    """An automatic reply to a new report (RFC 3834: auto-replied, from the null sender)."""
    shown_subject = strip_reply_prefixes(clean_text(subject)) or "(no subject)"
    body = render(
        template,
        templates_dir,
        reference=reference,
        subject=shown_subject,
        reporter_name=clean_text(reporter_name),
        deadlines=deadlines,
        policy=policy,
        from_name=from_name,
        intake_address=intake_address,
    )
    message_id = new_message_id(_KEY_PREFIX[kind], reference, message_id_domain)
    headers = [
        ("To", reporter_address),
        ("Subject", f"Re: [{reference}] {shown_subject}"),
        ("Date", format_datetime(now)),
        ("Message-ID", message_id),
    ]
    if in_reply_to:
        headers += [("In-Reply-To", in_reply_to), ("References", " ".join([*references, in_reply_to][-20:]))]
    headers += [
        ("Auto-Submitted", "auto-replied"),
        # Ask Exchange and friends not to answer this automatic mail with their own.
        ("X-Auto-Response-Suppress", "All"),
        (LOOP_HEADER, message_id_domain),
        ("X-Intake-Ticket", reference),
    ]
    return OutgoingMail(
        dedupe_key=f"{_KEY_PREFIX[kind]}:{reference}",
        kind=kind,
        envelope_from="",
        recipients=[reporter_address],
        message_id=message_id,
        raw=compose((from_name, intake_address), headers, body),
        automatic=True,
    )


def thread_address(intake_address: str, reference: str) -> str:
    """The +tag form of *intake_address* that threads a reply into ticket *reference*:
    security+SEC-2026-0001@example.com (the router's first threading rule)."""
    local, _, domain = intake_address.rpartition("@")
    return f"{local}+{reference}@{domain}"


def maintainer_mail(
    *,
    kind: str,
    dedupe_key: str,
    reference: str,
    subject: str,
    recipients: list[str],
    sender: tuple[str, str],
    reply_to: str | None,
    text: str,
    html: str | None = None,
    message_id_domain: str,
    now: datetime,
) -> OutgoingMail:
    """A notification to maintainers (new ticket, reminder, breach, escalation, digest): automatic
    (``Auto-Submitted: auto-generated``, from the null sender, loop-marked), replying to *reply_to*."""
    message_id = new_message_id(kind, reference, message_id_domain)
    headers = [
        ("To", ", ".join(recipients)),
        ("Subject", clean_text(subject)),
        ("Date", format_datetime(now)),
        ("Message-ID", message_id),
        *([("Reply-To", reply_to)] if reply_to else []),
        ("Auto-Submitted", "auto-generated"),
        ("X-Auto-Response-Suppress", "All"),
        (LOOP_HEADER, message_id_domain),
    ]
    raw = compose(sender, headers, text) if html is None else compose_alternative(sender, headers, text, html)
    return OutgoingMail(dedupe_key=dedupe_key, kind=kind, envelope_from="", recipients=list(recipients),
                        message_id=message_id, raw=raw)


def compose_alternative(sender: tuple[str, str], headers: list[tuple[str, str]], text: str, html: str) -> bytes:
    """A multipart/alternative message (plain text, then HTML) as bytes, with SMTP line endings."""
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ValueError(f"{name} header value contains a line break")
    message = EmailMessage(policy=email.policy.SMTPUTF8 if _needs_utf8(sender[1], *(v for h, v in headers if h == "To"))
                           else email.policy.SMTP)
    message["From"] = Address(display_name=sender[0], addr_spec=sender[1])
    for header, value in headers:
        message[header] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes()


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


def compose(sender: tuple[str, str], headers: list[tuple[str, str]], body: str,
            attachments: tuple[Attachment, ...] = ()) -> bytes:
    """A text/plain message (multipart/mixed with *attachments*) as bytes. *headers* values must
    already be display-safe.

    ASCII addresses go through the stdlib's compat32 classes, four times cheaper than its
    modern header registry; mail to an SMTPUTF8 (non-ASCII) address, or with attachments, uses
    the modern policy.
    """
    for name, value in headers:
        if "\r" in value or "\n" in value:  # belt and braces: clean_text already removed them
            raise ValueError(f"{name} header value contains a line break")
    name, address = sender
    recipients = [value for header, value in headers if header in ("To", "Cc")]
    if attachments or _needs_utf8(address, *recipients):
        policy = email.policy.SMTPUTF8 if _needs_utf8(address, *recipients) else email.policy.SMTP
        message = EmailMessage(policy=policy)
        message["From"] = Address(display_name=name, addr_spec=address)
        for header, value in headers:
            message[header] = value
        message.set_content(body)
        for attachment in attachments:
            maintype, _, subtype = attachment.content_type.partition("/")
            message.add_attachment(attachment.data, maintype=maintype or "application",
                                   subtype=subtype or "octet-stream", filename=attachment.filename)
        return message.as_bytes()
    fields = [("From", formataddr((name, address), charset="utf-8")),
              *((header, value if value.isascii() else Header(value, "utf-8")) for header, value in headers)]
    if body.isascii():
        return _ascii_text(fields, body)
    text = MIMEText(body, "plain", _UTF8_QP)
    for header, value in fields:
        text[header] = value
    return text.as_bytes(policy=_COMPAT32_CRLF)


# What MIMEText gives an ASCII text, before the caller's headers.
_ASCII_TEXT_FIELDS = (("Content-Type", 'text/plain; charset="us-ascii"'), ("MIME-Version", "1.0"),
                      ("Content-Transfer-Encoding", "7bit"))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _ascii_text(fields: list[tuple[str, object]], body: str) -> bytes:
    """The bytes ``MIMEText(body, "plain", "us-ascii")`` with *fields* gives through the stdlib's
    generator (same folding, same line endings), written directly: the generator's walk over
    the message was most of what an acknowledgement cost the worker."""
    head = b"".join(_COMPAT32_CRLF.fold_binary(name, value) for name, value in (*_ASCII_TEXT_FIELDS, *fields))
    return head + b"\r\n" + "\r\n".join(_LINE_BREAK.split(body)).encode("ascii")
