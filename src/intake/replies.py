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
from email.utils import format_datetime
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined

from intake.parse import clean_text

# Marks mail we sent, so our own mail coming back is recognised as a loop.
LOOP_HEADER = "X-Intake-Loop"
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv|vs|antw|wg|tr)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


@dataclass(frozen=True)
class OutgoingMail:
    dedupe_key: str
    kind: str
    envelope_from: str  # '' = null sender
    recipients: list[str]
    message_id: str
    raw: bytes


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
    # Plain-text mail: no HTML autoescaping; StrictUndefined turns a template typo into an error.
    return Environment(loader=ChoiceLoader(loaders), autoescape=False, undefined=StrictUndefined,
                       keep_trailing_newline=True)


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


def acknowledgement(
    *,
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
    """The automatic acknowledgement of a new report (RFC 3834: auto-replied, null sender)."""
    shown_subject = strip_reply_prefixes(clean_text(subject)) or "(no subject)"
    body = render(
        "acknowledgement.txt.j2",
        templates_dir,
        reference=reference,
        subject=shown_subject,
        reporter_name=clean_text(reporter_name),
        deadlines=deadlines,
        policy=policy,
        from_name=from_name,
        intake_address=intake_address,
    )
    message_id = new_message_id("ack", reference, message_id_domain)
    message = EmailMessage(policy=email.policy.SMTPUTF8 if _needs_utf8(reporter_address, intake_address)
                           else email.policy.SMTP)
    message["From"] = Address(display_name=from_name, addr_spec=intake_address)
    message["To"] = reporter_address
    message["Subject"] = f"Re: [{reference}] {shown_subject}"
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = " ".join([*references, in_reply_to][-20:])
    message["Auto-Submitted"] = "auto-replied"
    # Ask Exchange and friends not to answer this automatic mail with their own.
    message["X-Auto-Response-Suppress"] = "All"
    message[LOOP_HEADER] = message_id_domain
    message["X-Intake-Ticket"] = reference
    message.set_content(body)
    return OutgoingMail(
        dedupe_key=f"ack:{reference}",
        kind="acknowledgement",
        envelope_from="",
        recipients=[reporter_address],
        message_id=message_id,
        raw=message.as_bytes(),
    )
