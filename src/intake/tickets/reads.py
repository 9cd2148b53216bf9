"""The read side of tickets: find one by reference, list them with their next deadline, show one in
full, and the attachments of its thread as ``intake show`` numbers them. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines
from intake.store import inbound
from intake.store.db import read_session
from intake.store.models import Deadline, Event, InboundMessage, ThreadEntry, Ticket
from intake.understand.parse import Attachment, extract_attachment
from intake.vocabulary import FINISHED_STATES


class TicketNotFound(LookupError):
    pass


class AttachmentMissing(LookupError):
    """The attachment asked for cannot be given; the message says why."""


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


def ticket_detail(engine: Engine, reference: str) -> TicketDetail:
    with read_session(engine) as session:
        ticket = find(session, reference)
        entries = session.scalars(select(ThreadEntry).where(ThreadEntry.ticket_id == ticket.id)
                                  .order_by(ThreadEntry.created_at, ThreadEntry.id))
        events = session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id))
        messages = session.scalars(select(InboundMessage).where(InboundMessage.ticket_id == ticket.id)
                                   .order_by(InboundMessage.id))
        return TicketDetail(ticket, list(entries), list(events), list(messages))


# -- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """A ticket as `intake tickets` lists it, with its next unmet deadline.

    *ticket* carries the ticket's columns (as :class:`Ticket` names them) without loading the
    ticket as an object: a listing reads thousands."""

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
    or, with ``sort="received"``, oldest first. One query: each ticket's columns and its next unmet
    deadline (finished tickets have none to show)."""
    first_due = (select(Deadline.ticket_id, func.min(Deadline.due_at).label("due_at"))
                 .where(Deadline.met_at.is_(None), Deadline.due_at.is_not(None))
                 .group_by(Deadline.ticket_id).subquery())
    next_due = (select(Deadline.ticket_id, func.min(Deadline.stage).label("stage"), first_due.c.due_at)
                .join(first_due, and_(Deadline.ticket_id == first_due.c.ticket_id,
                                      Deadline.due_at == first_due.c.due_at))
                .where(Deadline.met_at.is_(None))
                .group_by(Deadline.ticket_id, first_due.c.due_at).subquery())
    table = Ticket.__table__
    query = (select(table, next_due.c.stage.label("next_stage"), next_due.c.due_at.label("next_due"))
             .outerjoin(next_due, and_(next_due.c.ticket_id == table.c.id, table.c.state.not_in(FINISHED_STATES)))
             .order_by(table.c.received_at, table.c.id))
    for column, value in ((table.c.state, wanted.state), (table.c.severity, wanted.severity),
                          (table.c.assignee, wanted.assignee), (table.c.policy, wanted.policy)):
        if value is not None:
            query = query.where(column == value)
    if not wanted.finished:
        query = query.where(table.c.state.not_in(FINISHED_STATES))
    soon_by_policy: dict[str, Any] = {}
    listed = []
    with engine.connect() as connection:
        for row in connection.execute(query):
            if wanted.label is not None and wanted.label not in row.labels:
                continue
            due = row.next_due
            breached = due is not None and due < now
            soon = due is not None and not breached and due - now <= _due_soon(settings, row.policy, soon_by_policy)
            if (wanted.breached and not breached) or (wanted.due_soon and not soon):
                continue
            listed.append(Listed(row, row.next_stage if due is not None else None, due, breached, soon))
    if sort == "due":
        listed.sort(key=lambda item: (item.next_due is None, item.next_due or item.ticket.received_at))
    return listed


def _due_soon(settings: Settings, policy: str, known: dict[str, Any]) -> Any:
    if policy not in known:
        known[policy] = deadlines.due_soon(settings, policy)
    return known[policy]


# -- attachments -------------------------------------------------------------------------------


def numbered_attachments(detail: TicketDetail) -> dict[tuple[int, int], int]:
    """Ticket-wide attachment numbers (1, 2, …) in thread order, by (thread entry id, index in its
    message): what ``intake attachment REF N`` takes."""
    keys = [(entry.id, a["index"]) for entry in detail.entries for a in entry.attachments]
    return {key: number for number, key in enumerate(keys, start=1)}


def attachment(engine: Engine, reference: str, number: int) -> tuple[Attachment, bytes]:
    """Attachment *number* of ticket *reference* (as :func:`numbered_attachments` numbers them) and
    its bytes exactly as received, decoded from the transfer encoding, from the stored message.
    Raises :class:`TicketNotFound` or :class:`AttachmentMissing`."""
    detail = ticket_detail(engine, reference)
    located = {n: key for key, n in numbered_attachments(detail).items()}
    if number not in located:
        raise AttachmentMissing(f"{detail.ticket.reference} has {len(located)} attachment(s); "
                                f"there is no number {number}")
    entry_id, index = located[number]
    entry = next(e for e in detail.entries if e.id == entry_id)
    stored = inbound.get(engine, entry.inbound_id) if entry.inbound_id else None
    if stored is None:
        raise AttachmentMissing(f"the stored message of attachment {number} is gone")
    try:
        return extract_attachment(stored.raw, index)
    except LookupError:  # the parser no longer finds it where it was numbered: say so
        raise AttachmentMissing(f"attachment {number} can no longer be read from stored message {stored.id}") from None
