"""``intake reminders REF``: a ticket's mail to maintainers beside its mail to the reporter.

The maintainers' side is :func:`intake.sla.reminders.ticket_reminders` (notices sent, suppressed,
due now, next per stage). The reporter's side is read from the ticket's events: every mail queued
to the reporter (acknowledgement, replies, progress updates, status replies, keep-in-loop mail)
with what the outbox did with it, every one left unsent and why (an update suppressed, an
acknowledgement loop safety withheld, a status request unanswered, keep-in-loop mail barred),
and the next keep-in-loop mail; the maintainers' notice of each keep-in-loop mail is listed with
their mail. Each entry says its audience.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines, reminders
from intake.store.db import read_session
from intake.store.models import Outbox, Ticket
from intake.tickets import keep_in_loop
from intake.tickets.reads import find
from intake.vocabulary import QUEUED_EVENT, Audience, EventKind, MailKind, NotificationKind

_MAIL_KIND_OF_EVENT = {event: kind for kind, event in QUEUED_EVENT.items()}
# Events that record mail to the reporter left unsent, and the detail naming what it was.
_WITHHELD = {EventKind.UPDATE_SUPPRESSED: (MailKind.PROGRESS_UPDATE, "update"),
             EventKind.ACKNOWLEDGEMENT_SUPPRESSED: (MailKind.ACKNOWLEDGEMENT, None),
             EventKind.STATUS_REQUEST_UNANSWERED: (MailKind.STATUS_REPLY, None)}


@dataclass(frozen=True)
class ReporterMail:
    """One mail to the reporter: queued (with the outbox's status), or withheld (with why)."""

    kind: str  # MailKind
    what: str | None  # a progress update's kind
    at: datetime  # queued, or withheld
    to: list[str]
    status: str | None = None  # pending | sent | dead; None: withheld, or its outbox row purged
    why: str | None = None  # withheld: why
    maintainers_told: tuple[str, ...] = ()  # keep-in-loop mail: who got the notice of it


@dataclass(frozen=True)
class TicketMail:
    maintainers: reminders.TicketReminders
    to_reporter: list[ReporterMail]
    withheld: list[ReporterMail]
    keep_in_loop_period: str | None  # the policy's keep_in_loop
    keep_in_loop_at: datetime | None  # when the next keep-in-loop mail is due
    keep_in_loop_why_not: str | None
    now: datetime

    @property
    def keep_in_loop_due_now(self) -> bool:
        return self.keep_in_loop_at is not None and self.keep_in_loop_at <= self.now

    def as_dict(self) -> dict[str, Any]:
        """The maintainers' listing (its fields unchanged, each entry with its audience) with the
        reporter's entries beside theirs, and the keep-in-loop timing."""
        data = self.maintainers.as_dict()
        for entries in (data["sent"], data[NotificationKind.SUPPRESSED], data["due_now"], data["next"]):
            for entry in entries:
                entry["audience"] = Audience.MAINTAINERS
        data["sent"] += [{"key": None, "kind": mail.kind, "stage": None, "point": mail.what,
                          "at": mail.at.isoformat(), "queued_at": mail.at.isoformat(), "to": mail.to,
                          "status": mail.status, "audience": Audience.REPORTER} for mail in self.to_reporter]
        data["sent"] += [{"key": None, "kind": MailKind.KEEP_IN_LOOP_NOTICE, "stage": None, "point": None,
                          "at": mail.at.isoformat(), "queued_at": mail.at.isoformat(),
                          "to": list(mail.maintainers_told), "audience": Audience.MAINTAINERS}
                         for mail in self.to_reporter if mail.maintainers_told]
        data[NotificationKind.SUPPRESSED] += [{"key": None, "kind": mail.kind, "stage": None, "point": mail.what,
                                "at": mail.at.isoformat(), "recorded_at": mail.at.isoformat(), "why": mail.why,
                                "audience": Audience.REPORTER} for mail in self.withheld]
        if self.keep_in_loop_at is not None:
            entry = {"stage": None, "kind": MailKind.KEEP_IN_LOOP, "point": f"after {self.keep_in_loop_period}",
                     "at": self.keep_in_loop_at.isoformat(), "audience": Audience.REPORTER}
            data["due_now" if self.keep_in_loop_due_now else "next"].append(entry)
        data[MailKind.KEEP_IN_LOOP] = {"period": self.keep_in_loop_period, "why_not": self.keep_in_loop_why_not,
                                       "at": self.keep_in_loop_at.isoformat() if self.keep_in_loop_at else None}
        return data


def ticket_mail(engine: Engine, settings: Settings, reference: str, now: datetime) -> TicketMail:
    """Everything ticket *reference*'s maintainers and reporter were sent, were not sent, and get next."""
    for_maintainers = reminders.ticket_reminders(engine, settings, reference, now)
    with read_session(engine) as session:
        ticket = find(session, reference)
        to_reporter, withheld = _reporter_mail(session, ticket)
        policy = settings.policies.get(ticket.policy)
        period = policy.keep_in_loop if policy else None
        why_not = keep_in_loop.why_not(settings, ticket) if period else None
        next_at = keep_in_loop.next_mail(session, settings, ticket)
    return TicketMail(for_maintainers, to_reporter, withheld, period, next_at, why_not, now)


def _reporter_mail(session: Session, ticket: Ticket) -> tuple[list[ReporterMail], list[ReporterMail]]:
    """The mail queued to *ticket*'s reporter and the mail withheld from them, in order."""
    status = {row.message_id: row.status for row in session.execute(
        select(Outbox.message_id, Outbox.status).where(Outbox.ticket_id == ticket.id,
                                                       Outbox.kind.in_(_MAIL_KIND_OF_EVENT.values()))
        .order_by(Outbox.id))}  # a deferred recipient's row (later) says where the mail stands now
    queued, withheld = [], []
    for event in deadlines.ticket_events(session, ticket):
        if event.kind in _MAIL_KIND_OF_EVENT:
            detail = event.detail
            to = [detail["to"]] if isinstance(detail.get("to"), str) else []
            queued.append(ReporterMail(_MAIL_KIND_OF_EVENT[event.kind], detail.get("update"), event.at,
                                       to + list(detail.get("cc") or []), status.get(detail.get("message_id")),
                                       maintainers_told=tuple(detail.get("maintainers_told") or ())))
        elif event.kind in _WITHHELD:
            kind, what = _WITHHELD[event.kind]
            withheld.append(ReporterMail(kind, event.detail.get(what) if what else None, event.at, [ticket.reporter],
                                         why=str(event.detail.get("reason", ""))))
    return queued, withheld
