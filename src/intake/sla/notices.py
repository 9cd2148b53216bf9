"""What the SLA sweep mails: one notice per point reached, the notices of one ticket for one
audience gathered into one mail, and that mail composed for each recipient. Apart from
:mod:`intake.sla.reminders` so that the sweep's other parts (:mod:`intake.sla.disclosure_reminders`)
plan and compose the same things without importing it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from intake.config.settings import Settings
from intake.send import composer
from intake.store.models import Ticket
from intake.tickets import reporter_keys
from intake.understand import reply_tokens


@dataclass(frozen=True)
class Notice:
    """One notification about one stage of a ticket."""

    key: str
    kind: str  # reminder | breach | escalation
    ticket_id: int
    reference: str
    stage: str
    label: str  # "50%", "24 hours before", "breach", "repeat 2", "escalation"
    at: datetime  # when it fell due
    stage_due: datetime
    late: bool  # fell due longer than misfire_grace ago, or stands in for notices never sent


@dataclass(frozen=True)
class PlannedMail:
    """The notices of one ticket for one audience, sent as one mail."""

    kind: str  # reminder | breach | escalation | catch-up
    ticket_id: int
    reference: str
    recipients: list[str]
    notices: list[Notice]

    @property
    def key(self) -> str:
        return ",".join(notice.key for notice in self.notices)


def notice_mails(settings: Settings, ticket: Ticket, mail: PlannedMail, subject: str, context: dict[str, Any],
                 now: datetime, reply_secret: bytes) -> list[composer.OutgoingMail]:
    """*mail* as the notice template filled with *context*: one per recipient, each replying to
    that recipient's own reply address, encrypted to their key where one is configured."""
    mails = []
    for recipient in mail.recipients:
        reply_address = reply_tokens.reply_to(settings, reply_secret, ticket.intake_address, ticket.reference,
                                              recipient, now)
        mails.append(composer.notice(
            mail.kind, dedupe_key=f"{mail.key}>{recipient.lower()}", ticket=ticket.reference, subject=subject,
            recipients=[recipient], sender=(settings.intake.from_name, ticket.intake_address), reply_to=reply_address,
            text=composer.render("notice.txt.j2", settings.templates_path, reply_address=reply_address, **context),
            message_id_domain=settings.intake.message_id_domain, now=now,
            encryption=reporter_keys.to_maintainer(settings, recipient)))
    return mails
