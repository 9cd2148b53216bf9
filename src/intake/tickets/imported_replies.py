"""The organisation's own replies found in an imported mailbox count as acknowledgements.

An old security@ mailbox often holds what the team sent too (a Sent folder merged in, or copies
to the list): mail from the intake address answering a report. Routing holds such mail as a loop
(:func:`intake.understand.route.loop`), which is right for live mail; for history it is evidence
that a person answered the report. As a maintainer's reply through intake does
(:func:`intake.tickets.correspondence.reply`), the earliest such reply records the ticket's
``acknowledged`` milestone at its ``Date:``, unless the ticket has one already, so its
acknowledge stage shows as met (late or not) instead of breached.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from intake.config.settings import Settings
from intake.store.db import write_session
from intake.store.models import ThreadEntry, Ticket
from intake.tickets import milestones
from intake.vocabulary import Direction, Milestone

# Who recorded the milestone, in the ticket's events.
IMPORT_ACTOR = "intake import"
# Message-IDs one reply may name (In-Reply-To, References) that are looked up.
_IDS_PER_REPLY = 50


@dataclass(frozen=True)
class OwnReply:
    """A message of the imported box sent from an intake address."""

    message_id: str | None
    sent_at: datetime  # its Date:
    answers: tuple[str, ...]  # In-Reply-To and References, most relevant first


def acknowledge(engine: Engine, settings: Settings, replies: Iterable[OwnReply], now: datetime) -> list[str]:
    """Record each ticket's earliest of *replies* (by the received mail they answer) as its
    acknowledgement, where it has none and the reply is not older than the report; returns the
    references of the tickets acknowledged."""
    replies = [reply for reply in replies if reply.answers]
    if not replies:
        return []
    acknowledged = []
    with write_session(engine) as session:
        named = {message_id for reply in replies for message_id in reply.answers[:_IDS_PER_REPLY]}
        # Only mail the reporter sent: our own (automatic) mail answered again proves nothing.
        ticket_of = dict(session.execute(select(ThreadEntry.message_id, ThreadEntry.ticket_id)
                                         .where(ThreadEntry.message_id.in_(named),
                                                ThreadEntry.direction == Direction.IN)).all())
        earliest: dict[int, OwnReply] = {}
        for reply in replies:
            ticket_id = next((ticket_of[m] for m in reply.answers[:_IDS_PER_REPLY] if m in ticket_of), None)
            if ticket_id is not None and (ticket_id not in earliest or reply.sent_at < earliest[ticket_id].sent_at):
                earliest[ticket_id] = reply
        for ticket in session.scalars(select(Ticket).where(Ticket.id.in_(earliest)).order_by(Ticket.id)):
            reply = earliest[ticket.id]
            if reply.sent_at < ticket.received_at or reply.sent_at > now \
                    or milestones.reached(session, settings, ticket, Milestone.ACKNOWLEDGED):
                continue
            milestones.record(session, settings, ticket, Milestone.ACKNOWLEDGED, at=reply.sent_at, now=now,
                              actor=IMPORT_ACTOR, via="reply in the imported mailbox", message_id=reply.message_id)
            acknowledged.append(ticket.reference)
    return acknowledged
