"""Writes on existing tickets: events, state changes, and inbound mail recorded in a thread.

Who writes tickets (each in the caller's transaction, taking ``now``):

- :mod:`intake.tickets.opening` creates them, with their first entries, events and deadlines;
- this module appends events (:func:`add_event`, for the modules below but credit), changes state
  (:func:`change_state`, :func:`leave_waiting`) and records inbound mail that threads into a ticket
  (:func:`record_on_ticket`, as :mod:`intake.understand.decisions` says per decision);
- :mod:`intake.tickets.triage` assignment, labels, closing, reopening and merging;
- :mod:`intake.tickets.milestones` milestones, severity and waiting on the reporter;
- :mod:`intake.tickets.credit` the credit preference;
- :mod:`intake.tickets.correspondence` outgoing replies and internal notes in the thread;
- :mod:`intake.sla.deadlines` the stored deadlines, :mod:`intake.tickets.references` the
  reference counter.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines
from intake.store import audit, sealing
from intake.store.inbound import StoredMessage
from intake.store.models import Event, Outbox, ThreadEntry, Ticket
from intake.tickets import credit
from intake.understand import credit_words, decisions, route
from intake.understand.header_text import clean_text
from intake.understand.lookups import message_key
from intake.understand.parsed_mail import ParsedMail
from intake.vocabulary import RECEIVED_EVENT, SYSTEM_ACTOR, Direction, EventKind, TicketState

_MAX_REASON = 600


def add_event(session: Session, ticket_id: int, kind: str, now: datetime, actor: str = SYSTEM_ACTOR,
              **detail: object) -> None:
    """Write one event (and queue it for the audit chain)."""
    audit.add_events(session, [event(ticket_id, kind, now, actor, **detail)])


def event(ticket_id: int, kind: str, now: datetime, actor: str = SYSTEM_ACTOR, **detail: object) -> dict[str, Any]:
    """An event row, for :func:`intake.store.audit.add_events` (the one way events are written)."""
    return dict(ticket_id=ticket_id, at=now, actor=actor, kind=kind, detail=detail)


def record_on_ticket(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
                     decision: route.Decision, now: datetime, reply_credit: credit_words.Credit | None) -> None:
    """Add a threaded message (reply, automatic mail, bounce) to its ticket; never answers it. What
    else it changes is its decision's :class:`~intake.understand.decisions.OnTicket`: only the
    reporter's own reply changes the ticket (a third party's is recorded and nothing else), a
    bounce may flag the reporter unreachable. *reply_credit* is the credit the message states as
    a reply, read before the write lock."""
    assert decision.ticket_id is not None
    ticket = session.get(Ticket, decision.ticket_id)
    assert ticket is not None
    entry = entry_from_mail(session, ticket.id, stored, incoming.mail, kind=decision.kind, now=now,
                            threaded_by=decision.threaded_by)
    session.execute(insert(ThreadEntry.__table__), entry)
    ticket.updated_at = now
    add_event(session, ticket.id, RECEIVED_EVENT[decision.kind], now, inbound_id=stored.id,
              message_id=incoming.mail.message_id, threaded_by=decision.threaded_by, sender=incoming.sender)
    effect = decisions.handling(decision).on_ticket
    if effect is decisions.OnTicket.REPORTER_BACK:
        if reply_credit:
            credit.set_credit(session, ticket, reply_credit, now, actor=SYSTEM_ACTOR)
        if ticket.state == TicketState.WAITING:
            leave_waiting(session, ticket, now, actor=SYSTEM_ACTOR, why="the reporter replied")
            deadlines.refresh(session, settings, ticket, now)  # the clocks run again
    elif effect is decisions.OnTicket.BOUNCE and decision.bounced is not None:
        _record_bounce(session, ticket, incoming, decision.bounced, now)


def _record_bounce(session: Session, ticket: Ticket, incoming: route.Incoming, bounced: route.KnownMessage,
                   now: datetime) -> None:
    """A bounce of mail we sent (routing matched its Message-ID): an event and, if the mail went to
    the reporter and failed for them, the reporter flagged unreachable (a maintainer's notice
    bouncing says nothing about the reporter)."""
    report = incoming.mail.delivery_report
    # Every row of that message: recipients deferred by the relay were sent it from a row of their own.
    sent_to = [r.lower() for recipients in session.scalars(select(Outbox.recipients)
                                                           .where(Outbox.message_id == bounced.message_id))
               for r in recipients]
    recipient = report.recipient if report and report.recipient else (sent_to[0] if sent_to else ticket.reporter)
    diagnostic = " ".join(filter(None, [report and report.status, report and report.diagnostic])) or "no detail"
    what = bounced.kind.replace("-", " ")
    summary = f"{what} to {recipient} bounced: {diagnostic}"
    add_event(session, ticket.id, EventKind.BOUNCED, now, summary=summary,
              message_id=bounced.message_id, recipient=recipient)
    failed = report is None or (report.action or "failed") == "failed"
    to_reporter = recipient.lower() == ticket.reporter.lower() and (not sent_to or recipient.lower() in sent_to)
    if failed and to_reporter and ticket.reporter_unreachable_at is None:
        ticket.reporter_unreachable_at = now
        # The reason as maintainers see it (show, digest, notices): one bounded line.
        add_event(session, ticket.id, EventKind.REPORTER_UNREACHABLE, now, address=recipient,
                  reason=clean_text(summary, _MAX_REASON))


def leave_waiting(session: Session, ticket: Ticket, now: datetime, *, actor: str, why: str) -> None:
    """Leave the waiting state for the state the ticket was in before it."""
    previous = session.scalars(
        select(Event).where(Event.ticket_id == ticket.id, Event.kind == EventKind.STATE_CHANGED)
        .order_by(Event.at.desc(), Event.id.desc())
    ).first()
    target = previous.detail.get("from", TicketState.NEW) if previous else TicketState.NEW
    change_state(session, ticket, target, now, actor=actor, why=why)


def change_state(session: Session, ticket: Ticket, state: str, now: datetime, *, actor: str, why: str) -> None:
    add_event(session, ticket.id, EventKind.STATE_CHANGED, now, actor=actor,
              **{"from": ticket.state, "to": state, "why": why})
    ticket.state = state
    ticket.updated_at = now


def entry_from_mail(session: Session, ticket_id: int, stored: StoredMessage, mail: ParsedMail, *, kind: str,
                    now: datetime, threaded_by: str | None = None) -> dict[str, Any]:
    """A thread_entry row for an inbound message, its text sealed under the ticket's data key."""
    return dict(
        ticket_id=ticket_id,
        inbound_id=stored.id,
        direction=Direction.IN,
        kind=kind,
        message_key=message_key(mail, stored),
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=mail.references,
        sender=stored.mail_from or mail.from_address,
        subject=mail.subject,
        body_text=sealing.seal_for_ticket(session, ticket_id, now, "thread_entry", "body_text", mail.body_text),
        attachments=[a.as_dict() for a in mail.attachments],
        warnings=mail.warnings,
        threaded_by=threaded_by,
        encrypted=mail.encrypted,
        pgp=mail.pgp.as_dict() if mail.pgp else None,
        created_at=now,
    )
