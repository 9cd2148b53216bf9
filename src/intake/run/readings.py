"""Read-only figures from the database for the metrics endpoint and /readyz (see :mod:`intake.run.metrics`).

Read at scrape time, so they are right across restarts and the same on every node sharing a
PostgreSQL database. Each is one aggregate query on an indexed or small set of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, func, or_, select, text
from sqlmodel import Session

from intake.store.db import read_session
from intake.store.models import Deadline, InboundMessage, Outbox, Ticket
from intake.tickets import held
from intake.vocabulary import FINISHED_STATES, InboundStatus, OutboxStatus


@dataclass(frozen=True)
class Readings:
    tickets: int  # tickets ever opened (rows of `ticket`)
    inbound_pending: int  # stored messages not processed yet
    inbound_failed: int  # stored messages processing gave up on (`intake reprocess`)
    outbox_pending: int
    outbox_oldest_pending: datetime | None  # created_at of the oldest mail still to be sent
    outbox_dead: int
    breaches: int  # stages met late, plus unmet stages past due on open tickets
    open_breaches: int  # unmet stages past due on open tickets
    held: dict[str, int]  # messages held (made no ticket) in the last HELD_WINDOW, per decision


# The held-mail gauge's window: a week is long enough to see a weekend's spam wave, short enough
# that a rise shows, and unlike "since the database began" it neither grows without end nor drops
# when old held mail is purged ([retention] held).
HELD_WINDOW = timedelta(days=7)


def read(engine: Engine, now: datetime) -> Readings:
    """The figures as they stand at *now*."""
    with read_session(engine) as session:
        tickets = session.scalar(select(func.count()).select_from(Ticket)) or 0
        inbound = dict(session.execute(
            select(InboundMessage.status, func.count())
            .where(InboundMessage.status.in_([InboundStatus.PENDING, InboundStatus.FAILED]))
            .group_by(InboundMessage.status)).all())
        outbox = dict(session.execute(
            select(Outbox.status, func.count())
            .where(Outbox.status.in_([OutboxStatus.PENDING, OutboxStatus.DEAD])).group_by(Outbox.status)).all())
        oldest = _oldest_pending(session)
        open_ticket = Ticket.state.not_in(FINISHED_STATES)
        overdue = and_(Deadline.met_at.is_(None), Deadline.due_at < now, open_ticket)
        late = and_(Deadline.met_at.is_not(None), Deadline.met_at > Deadline.due_at)
        breaches, open_breaches = session.execute(
            select(func.count(), func.count().filter(overdue))
            .select_from(Deadline).join(Ticket, Ticket.id == Deadline.ticket_id)
            .where(Deadline.due_at.is_not(None), or_(late, overdue))).one()
        held_recently = held.counts(session, now - HELD_WINDOW, now)
    return Readings(tickets, inbound.get(InboundStatus.PENDING, 0), inbound.get(InboundStatus.FAILED, 0),
                    outbox.get(OutboxStatus.PENDING, 0), oldest, outbox.get(OutboxStatus.DEAD, 0),
                    breaches or 0, open_breaches or 0, held_recently)


def outbox_oldest_pending(engine: Engine) -> datetime | None:
    """When the oldest mail still waiting in the outbox was queued; None when none waits."""
    with read_session(engine) as session:
        return _oldest_pending(session)


def _oldest_pending(session: Session) -> datetime | None:
    return session.scalar(select(func.min(Outbox.created_at)).where(Outbox.status == OutboxStatus.PENDING))


def database_reachable(engine: Engine) -> None:
    """Raise unless a trivial query on *engine* answers."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
