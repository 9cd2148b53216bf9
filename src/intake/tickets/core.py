"""The read side of tickets: find one by reference, list them with their next deadline, show one
in full. Writes are :mod:`intake.tickets.opening`'s and :mod:`intake.tickets.records`' (which
names the other modules that write tickets).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines
from intake.store.db import read_session
from intake.store.models import Deadline, Event, InboundMessage, ThreadEntry, Ticket
from intake.vocabulary import FINISHED_STATES


class TicketNotFound(LookupError):
    pass


@dataclass(frozen=True)
class TicketDetail:
    ticket: Ticket
    entries: list[ThreadEntry]
    events: list[Event]
    messages: list[InboundMessage]


def find(session: Session, reference: str) -> Ticket:
    """The ticket known as *reference* (any case), for a change in *session*."""
    ticket = session.scalars(select(Ticket).where(Ticket.reference == reference.upper())).first()
    if ticket is None:
        raise TicketNotFound(reference)
    return ticket


@dataclass(frozen=True)
class Listed:
    """A ticket as `intake tickets` lists it, with its next unmet deadline."""

    ticket: Ticket
    next_stage: str | None
    next_due: datetime | None
    breached: bool
    due_soon: bool


@dataclass(frozen=True)
class TicketFilter:
    state: str | None = None
    severity: str | None = None
    assignee: str | None = None  # the maintainer's email
    label: str | None = None
    policy: str | None = None
    breached: bool = False
    due_soon: bool = False


def find_tickets(engine: Engine, settings: Settings, wanted: TicketFilter, now: datetime,
                 sort: str = "due") -> list[Listed]:
    """Tickets matching *wanted*, by next deadline (soonest first, then those with none, by receipt)
    or, with ``sort="received"``, oldest first."""
    query = select(Ticket).order_by(Ticket.received_at, Ticket.id)
    for column, value in ((Ticket.state, wanted.state), (Ticket.severity, wanted.severity),
                          (Ticket.assignee, wanted.assignee), (Ticket.policy, wanted.policy)):
        if value is not None:
            query = query.where(column == value)
    with read_session(engine) as session:
        found = [t for t in session.scalars(query) if wanted.label is None or wanted.label in t.labels]
        open_ids = [t.id for t in found if t.state not in FINISHED_STATES]
        next_due: dict[int, tuple[str, datetime]] = {}
        for start in range(0, len(open_ids), 500):  # bounded IN lists
            rows = session.execute(
                select(Deadline.ticket_id, Deadline.stage, Deadline.due_at)
                .where(Deadline.ticket_id.in_(open_ids[start:start + 500]), Deadline.met_at.is_(None),
                       Deadline.due_at.is_not(None))
                .order_by(Deadline.due_at))
            for ticket_id, stage, due in rows:
                next_due.setdefault(ticket_id, (stage, due))
    listed = []
    for ticket in found:
        stage, due = next_due.get(ticket.id, (None, None))
        soon = deadlines.due_soon(settings, ticket.policy)
        breached = due is not None and due < now
        listed.append(Listed(ticket, stage, due, breached, due is not None and not breached and due - now <= soon))
    listed = [item for item in listed if (not wanted.breached or item.breached)
              and (not wanted.due_soon or item.due_soon)]
    if sort == "due":
        listed.sort(key=lambda item: (item.next_due is None, item.next_due or item.ticket.received_at))
    return listed


def ticket_detail(engine: Engine, reference: str) -> TicketDetail:
    with read_session(engine) as session:
        ticket = find(session, reference)
        entries = session.scalars(select(ThreadEntry).where(ThreadEntry.ticket_id == ticket.id)
                                  .order_by(ThreadEntry.created_at, ThreadEntry.id))
        events = session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id))
        messages = session.scalars(select(InboundMessage).where(InboundMessage.ticket_id == ticket.id)
                                   .order_by(InboundMessage.id))
        return TicketDetail(ticket, list(entries), list(events), list(messages))
