"""Keep-in-loop: a reporter who has heard nothing for a while is told the report is still worked on.

A policy's ``keep_in_loop`` ("30 days") is the longest a reporter goes without mail from us while
their report is being worked on (:data:`intake.vocabulary.WORKED_ON_STATES`: not waiting on them,
not finished, not disclosed). The period counts from the last mail queued to the reporter on the
ticket, whatever it was (acknowledgement, reply, progress update, status reply, an earlier
keep-in-loop mail: every :data:`intake.vocabulary.QUEUED_EVENT`), else from the ticket's opening
(for an imported ticket, its import: history is not our silence). When it ends, the SLA sweep
sends the template ``keep-in-loop.txt.j2`` (the next promised date, or honestly none) from the
intake address, threaded and encrypted where the reporter has a key
(:func:`intake.tickets.correspondence.mail_reporter`), and tells the ticket's assignee, else the
notice recipients, that it did; the ``keep-in-loop-queued`` event names them. Since that mail is
itself mail to the reporter, the next one is due a full period later.

Never to an unreachable reporter, nor to a reporter that is one of intake's own addresses.
Exactly once per period: the outbox key ``keep-in-loop:<ref>:<end of period>`` is the same on
every node, and each ticket is sent for in its own transaction that first locks the ticket's
row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's writer lock runs sweeps one after the
other) and then reads again when the reporter last got mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, case, func, literal, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla.calendars import parse_duration
from intake.store.db import read_session, write_session
from intake.store.models import Event, Outbox, Ticket, UTCDateTime
from intake.tickets import correspondence, reporter_keys, status_reply
from intake.understand import reply_tokens
from intake.understand.header_text import clean_text
from intake.understand.lookups import routing_config
from intake.vocabulary import QUEUED_EVENT, SYSTEM_ACTOR, WORKED_ON_STATES, MailKind

log = logging.getLogger(__name__)

# A bound on one sweep's keep-in-loop mail; the rest waits for the next sweep.
MAX_PER_SWEEP = 1000
# Every mail to the reporter is recorded with one of these events.
REPORTER_MAIL_EVENTS = tuple(QUEUED_EVENT.values())


@dataclass(frozen=True)
class Planned:
    """One keep-in-loop mail: due because the reporter has had no mail since *silent_since*."""

    ticket_id: int
    reference: str
    reporter: str
    silent_since: datetime  # the last mail to the reporter, or the opening (import)
    due_at: datetime  # silent_since + the policy's period
    next_date: composer.PromisedDate | None
    maintainers: list[str]

    @property
    def key(self) -> str:
        return dedupe_key(self.reference, self.due_at)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "ticket": self.reference, "to": [self.reporter],
                "silent_since": self.silent_since.isoformat(), "due_at": self.due_at.isoformat(),
                "next_date": _date_dict(self.next_date), "maintainers_told": self.maintainers}


def dedupe_key(reference: str, due_at: datetime) -> str:
    return f"keep-in-loop:{reference}:{due_at:%Y-%m-%dT%H:%M:%SZ}"


def _date_dict(date: composer.PromisedDate | None) -> dict[str, str] | None:
    return {"label": date.label, "due": date.due.isoformat(), "due_local": date.due_local} if date else None


def last_reporter_mail(session: Session, ticket_id: int) -> datetime | None:
    """When mail to the reporter of ticket *ticket_id* was last queued (None: never)."""
    return session.scalar(select(func.max(Event.at)).where(Event.ticket_id == ticket_id,
                                                           Event.kind.in_(REPORTER_MAIL_EVENTS)))


def silent_since(ticket: Ticket, last_mail: datetime | None) -> datetime:
    """The instant *ticket*'s period counts from: its last mail to the reporter, else its opening;
    never before an import."""
    return max(at for at in (last_mail, ticket.created_at, ticket.imported_at) if at is not None)


def why_not(settings: Settings, ticket: Ticket) -> str | None:
    """Why *ticket*'s reporter gets no keep-in-loop mail at all now, or None when they do in time."""
    policy = settings.policies.get(ticket.policy)
    if policy is None or policy.keep_in_loop_span is None:
        return f"policy {ticket.policy} sets no keep_in_loop"
    if ticket.state not in WORKED_ON_STATES:
        return f"the ticket is {ticket.state}: not being worked on"
    if ticket.reporter_unreachable_at is not None:
        return f"the reporter is unreachable (since {ticket.reporter_unreachable_at:%Y-%m-%d %H:%M} UTC)"
    if routing_config(settings).is_ours(ticket.reporter):
        return "the reporter is one of intake's own addresses"
    return None


def due_at(session: Session, settings: Settings, ticket: Ticket) -> tuple[datetime, datetime] | None:
    """(silent since, due at) of *ticket*'s next keep-in-loop mail; None when it gets none (:func:`why_not`)."""
    if why_not(settings, ticket) is not None:
        return None
    span = settings.policies[ticket.policy].keep_in_loop_span
    assert span is not None
    since = silent_since(ticket, last_reporter_mail(session, ticket.id))
    return since, since + span


def _candidates(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Tickets that may be due at *now* (each is checked again under its lock): being worked on,
    under a policy with a period, reporter reachable, and nothing queued to them for that long.
    One statement for every policy; a ticket opened less than its period ago is ruled out before
    its events are looked at."""
    spans = {name: policy.keep_in_loop_span for name, policy in settings.policies.items() if policy.keep_in_loop_span}
    if not spans:
        return []
    cutoff = case({name: literal(now - span, UTCDateTime()) for name, span in spans.items()}, value=Ticket.policy)
    last_mail = (select(func.max(Event.at)).where(Event.ticket_id == Ticket.id, Event.kind.in_(REPORTER_MAIL_EVENTS))
                 .correlate(Ticket).scalar_subquery())
    return list(session.scalars(
        select(Ticket.id).where(Ticket.policy.in_(spans), Ticket.state.in_(WORKED_ON_STATES),
                                Ticket.reporter_unreachable_at.is_(None), Ticket.created_at <= cutoff,
                                func.coalesce(last_mail, Ticket.imported_at, Ticket.created_at) <= cutoff)
        .order_by(Ticket.id).limit(MAX_PER_SWEEP)))


def maintainers_to_tell(settings: Settings, ticket: Ticket) -> list[str]:
    """The ticket's assignee, else those who get its SLA notices."""
    return [ticket.assignee] if ticket.assignee else settings.notice_recipients


def plan(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> Planned | None:
    """*ticket*'s keep-in-loop mail if it is due at *now* and was not queued yet; else None."""
    timing = due_at(session, settings, ticket)
    if timing is None or timing[1] > now:
        return None
    since, due = timing
    if session.scalar(select(Outbox.id).where(Outbox.dedupe_key == dedupe_key(ticket.reference, due))) is not None:
        return None
    return Planned(ticket.id, ticket.reference, ticket.reporter, since, due,  # type: ignore[arg-type]
                   status_reply.next_promised(session, settings, ticket), maintainers_to_tell(settings, ticket))


def sweep(engine: Engine, settings: Settings, now: datetime, dry_run: bool, reply_secret: bytes) -> list[Planned]:
    """Send (unless *dry_run*) every keep-in-loop mail due at *now*, each once; the mails planned."""
    with read_session(engine) as session:
        candidates = _candidates(session, settings, now)
    sent = []
    for ticket_id in candidates:
        with (read_session(engine) if dry_run else write_session(engine)) as session:
            ticket = _locked(session, ticket_id, lock=not dry_run)
            planned = plan(session, settings, ticket, now) if ticket is not None else None
            if planned is not None and not dry_run:
                _send(session, settings, ticket, planned, now, reply_secret)  # type: ignore[arg-type]
        if planned is not None:
            sent.append(planned)
    if sent and not dry_run:
        log.info("event=keep-in-loop-sent mails=%d", len(sent))
    return sent


def _locked(session: Session, ticket_id: int, lock: bool) -> Ticket | None:
    """The ticket, its row locked against another node's sweep (None: that node has it now)."""
    query = select(Ticket).where(Ticket.id == ticket_id)
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return session.scalars(query).first()


def _send(session: Session, settings: Settings, ticket: Ticket, planned: Planned, now: datetime,
          reply_secret: bytes) -> None:
    """Queue the keep-in-loop mail to the reporter and the notice to *planned*'s maintainers."""
    duration = parse_duration(settings.policies[ticket.policy].keep_in_loop or "")
    period = str(duration)  # "30 days", as configured
    context = dict(reference=ticket.reference, subject=composer.shorten(clean_text(ticket.subject)), period=period,
                   next_date=planned.next_date, from_name=settings.intake.from_name)
    language = settings.language_for(ticket.language)
    # The period as amount and unit too, for templates in another language to word it themselves.
    text = composer.render("keep-in-loop.txt.j2", settings.templates_path, language, **context,
                           period_amount=duration.amount, period_unit=duration.unit,
                           reporter_name=clean_text(ticket.reporter_name or ""), intake_address=ticket.intake_address)
    correspondence.mail_reporter(session, settings, ticket, text, kind=MailKind.KEEP_IN_LOOP, now=now,
                                 actor=SYSTEM_ACTOR, dedupe_key=planned.key, language=language,
                                 detail={"silent_since": planned.silent_since.isoformat(),
                                         "next_date": _date_dict(planned.next_date),
                                         "maintainers_told": planned.maintainers})
    notice = composer.render("keep-in-loop-notice.txt.j2", settings.templates_path, **context,
                             since=f"{planned.silent_since:%Y-%m-%d %H:%M} UTC",
                             next_at=f"{now + (planned.due_at - planned.silent_since):%Y-%m-%d %H:%M} UTC")
    outbox.enqueue_many(session, [(composer.notice(
        MailKind.KEEP_IN_LOOP_NOTICE, dedupe_key=f"{planned.key}>{recipient.lower()}", ticket=ticket.reference,
        subject=f"[{ticket.reference}] Reporter kept in the loop ({period} without mail)", recipients=[recipient],
        sender=(settings.intake.from_name, ticket.intake_address),
        reply_to=reply_tokens.reply_to(settings, reply_secret, ticket.intake_address, ticket.reference, recipient,
                                       now),
        text=notice, message_id_domain=settings.intake.message_id_domain, now=now,
        encryption=reporter_keys.to_maintainer(settings, recipient)), ticket.id)
        for recipient in planned.maintainers], now=now)


def next_mail(session: Session, settings: Settings, ticket: Ticket) -> datetime | None:
    """When *ticket*'s next keep-in-loop mail is due (None: it gets none; see :func:`why_not`)."""
    timing = due_at(session, settings, ticket)
    return timing[1] if timing else None

