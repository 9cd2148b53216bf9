"""The read side of tickets: find one by reference, list them with their next deadline, show one in
full, and number its attachments. Nothing here writes; an attachment's bytes are read by
:mod:`intake.tickets.attachments`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, and_, func, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines
from intake.store import sealing
from intake.store.db import read_session
from intake.store.models import Deadline, Event, InboundMessage, ThreadEntry, Ticket
from intake.vocabulary import FINISHED_STATES


class TicketNotFound(LookupError):
    pass


@dataclass(frozen=True)
class TicketDetail:
    """A ticket, its thread (entries' text opened, see :mod:`intake.store.sealing`), events and
    stored messages (their content as stored: sealed when sealing is on)."""

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


def ticket_detail(engine: Engine, reference: str) -> TicketDetail:
    with read_session(engine) as session:
        ticket = find(session, reference)
        entries = session.scalars(select(ThreadEntry).where(ThreadEntry.ticket_id == ticket.id)
                                  .order_by(ThreadEntry.created_at, ThreadEntry.id))
        events = session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id))
        messages = session.scalars(select(InboundMessage).where(InboundMessage.ticket_id == ticket.id)
                                   .order_by(InboundMessage.id))
        detail = TicketDetail(ticket, list(entries), list(events), list(messages))
        session.expunge_all()  # the entries' text is opened below: nothing of it is written back
        for entry in detail.entries:
            entry.body_text = sealing.open_or_note(session, "thread_entry", "body_text", entry.body_text)
        return detail


# -- listing ---------------------------------------------------------------------------------


# What a listing shows of each ticket (``intake tickets`` and its JSON).
LISTED_COLUMNS = ("id", "reference", "subject", "reporter", "state", "severity", "policy", "assignee", "received_at",
                  "imported_at", "close_reason", "cvss_vector", "cvss_score", "labels")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # sorts before any deadline: stands for "none"


@dataclass(frozen=True)
class Listed:
    """A ticket as `intake tickets` lists it, with its next unmet deadline.

    *ticket* has the :data:`LISTED_COLUMNS` as attributes (named as on :class:`Ticket`), read
    without loading the ticket as an object: a listing reads thousands."""

    ticket: Any
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
    finished: bool = True  # False: only tickets with something left to meet (not in FINISHED_STATES)


def find_tickets(engine: Engine, settings: Settings, wanted: TicketFilter, now: datetime,
                 sort: str = "due") -> list[Listed]:
    """Tickets matching *wanted*, by next deadline (soonest first, then those with none, by receipt)
    or, with ``sort="received"``, oldest first. One query: each ticket's listed columns and its next
    unmet deadline (finished tickets have none to show)."""
    table = Ticket.__table__
    unmet = and_(Deadline.met_at.is_(None), Deadline.due_at.is_not(None))
    first_due = (select(Deadline.ticket_id, func.min(Deadline.due_at).label("due_at"))
                 .where(unmet).group_by(Deadline.ticket_id).subquery())
    # The stage due then (the first by name when two are due at the same instant).
    next_due = (select(Deadline.ticket_id, func.min(Deadline.stage).label("stage"), first_due.c.due_at)
                .join(first_due, and_(Deadline.ticket_id == first_due.c.ticket_id,
                                      Deadline.due_at == first_due.c.due_at))
                .where(unmet).group_by(Deadline.ticket_id, first_due.c.due_at).subquery())
    query = (select(*(table.c[name] for name in LISTED_COLUMNS), next_due.c.stage.label("next_stage"),
                    next_due.c.due_at.label("next_due"))
             .outerjoin(next_due, and_(next_due.c.ticket_id == table.c.id, table.c.state.not_in(FINISHED_STATES)))
             .order_by(table.c.received_at, table.c.id))
    for column, value in ((table.c.state, wanted.state), (table.c.severity, wanted.severity),
                          (table.c.assignee, wanted.assignee), (table.c.policy, wanted.policy)):
        if value is not None:
            query = query.where(column == value)
    if not wanted.finished:
        query = query.where(table.c.state.not_in(FINISHED_STATES))
    soon_by_policy: dict[str, timedelta] = {}
    listed = []
    with engine.connect() as connection:
        for row in connection.execute(query):
            ticket, stage, due = row, row.next_stage, row.next_due
            if wanted.label is not None and wanted.label not in ticket.labels:
                continue
            breached = due is not None and due < now
            if due is not None and not breached:
                if ticket.policy not in soon_by_policy:
                    soon_by_policy[ticket.policy] = deadlines.due_soon(settings, ticket.policy)
                soon = due - now <= soon_by_policy[ticket.policy]
            else:
                soon = False
            if (wanted.breached and not breached) or (wanted.due_soon and not soon):
                continue
            listed.append(Listed(ticket, stage, due, breached, soon))
    if sort == "due":  # received_at order is kept among those due together, and those with none
        listed.sort(key=lambda item: (item.next_due is None, item.next_due or _EPOCH))
    return listed


def numbered_attachments(detail: TicketDetail) -> dict[tuple[int, int], int]:
    """Ticket-wide attachment numbers (1, 2, …) in thread order, by (thread entry id, index in its
    message): what ``intake attachment REF N`` takes."""
    keys = [(entry.id, a["index"]) for entry in detail.entries for a in entry.attachments]
    return {key: number for number, key in enumerate(keys, start=1)}
