"""``intake promote``: a held message made into a ticket, as if it had come in as a new report.

The message is parsed again and opened by the same path processing opens new reports by
(:func:`intake.tickets.opening.plan` and :func:`~intake.tickets.opening.open_tickets`): its
reference, deadlines, the maintainers' notice, and the acknowledgement to its sender unless loop
safety or the rate limit forbid one (or ``--no-ack``). Its stored row then says ``new-ticket``,
with a reason starting :data:`~intake.vocabulary.PROMOTED_REASON`, and names the ticket; a
``promoted`` event on the ticket names the maintainer. A message makes one ticket however often it
is promoted: a second promotion names the ticket the first made, and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from intake.config.settings import Settings
from intake.run import processor
from intake.store import inbound
from intake.store.db import read_session, write_session
from intake.store.inbound import StoredMessage
from intake.store.models import InboundMessage, Ticket
from intake.tickets import opening
from intake.tickets.records import add_event
from intake.understand import lookups, reply_tokens, route
from intake.vocabulary import HELD_DECISIONS, NEW_TICKET, PROMOTED_REASON, EventKind, InboundStatus


class PromoteRefused(Exception):
    """The message cannot be promoted: none such, still pending, or on a ticket processing made."""


@dataclass(frozen=True)
class Promoted:
    reference: str
    already: bool  # an earlier promotion made the ticket; nothing was written now
    acknowledgement: str  # what the sender gets: "queued", else why none


def promote(engine: Engine, settings: Settings, inbound_id: int, actor: str, now: datetime,
            acknowledge: bool = True) -> Promoted:
    """Open a ticket from held message *inbound_id* on behalf of *actor* (see the module docstring)."""
    with read_session(engine) as session:
        row = session.get(InboundMessage, inbound_id)
        already = _promoted_before(session, inbound_id, row)
        if already:
            return already
        raw = inbound.read_raw(session, row)
        trace = inbound.open_trace(session, row.trace, row.data_key)
    held_as = f"{row.decision or row.status}: {row.reason or row.error or ''}"
    stored = StoredMessage(row.id, row.mail_from, row.rcpt_tos, raw, row.sha256, row.received_at, row.relay, trace,
                           arrived_at=row.arrived_at)
    prepared = processor.prepare(settings, stored)
    if prepared.mail is None:
        raise PromoteRefused(f"message {inbound_id} cannot be parsed: {prepared.error}")
    incoming = route.Incoming(mail=prepared.mail, mail_from=stored.mail_from, rcpt_tos=stored.rcpt_tos,
                              message_key=lookups.message_key(prepared.mail, stored),
                              authentication=prepared.authentication)
    decision = route.Decision(NEW_TICKET, f"{PROMOTED_REASON}{actor}; held as {held_as}"[:2000])
    report = opening.NewReport(stored, incoming, decision, prepared.quality, prepared.arrived_at,
                               prepared.work.report_credit,
                               no_reply=None if acknowledge else f"{PROMOTED_REASON}{actor} with --no-ack")
    reply_secret = reply_tokens.secret(engine)
    with read_session(engine) as session:
        reads = opening.read_for_plan(session, settings, [report], now)
    planned = opening.plan(settings, [report], reads, now, reply_secret)
    try:
        with write_session(engine) as session:
            # Checked again under the write lock: another promotion (or a reprocess) may have won.
            current = session.get(InboundMessage, inbound_id, with_for_update=True)
            if already := _promoted_before(session, inbound_id, current):
                return already
            ticket = opening.open_tickets(session, settings, planned, {inbound_id}, now)[inbound_id]
            table = InboundMessage.__table__
            session.execute(update(table).where(table.c.id == inbound_id).values(
                status=InboundStatus.PROCESSED, decision=NEW_TICKET, reason=decision.reason, ticket_id=ticket.id,
                error=None, processed_at=now))
            add_event(session, ticket.id, EventKind.PROMOTED, now, actor=actor, inbound_id=inbound_id,
                      held_as=held_as[:500], acknowledge=acknowledge)
    except IntegrityError as exc:  # its Message-ID is on a ticket's thread already: a copy made it
        raise PromoteRefused(f"message {inbound_id}: a copy of it is on a ticket already ({exc.orig})") from None
    made = planned.openings[0]
    return Promoted(ticket.reference, False, "queued" if made.reply else f"none ({made.refusal})")


def _promoted_before(session: Session, inbound_id: int, row: InboundMessage | None) -> Promoted | None:
    """The ticket an earlier promotion of *row* (stored message *inbound_id*) made; None if it may
    be promoted now; else :class:`PromoteRefused` saying why not."""
    if row is None:
        raise PromoteRefused(f"no stored message {inbound_id}")
    if row.ticket_id is not None:
        reference = session.scalar(select(Ticket.reference).where(Ticket.id == row.ticket_id))
        if row.decision == NEW_TICKET and (row.reason or "").startswith(PROMOTED_REASON):
            return Promoted(reference, True, "none (promoted before)")
        raise PromoteRefused(f"message {row.id} is on ticket {reference} already ({row.decision})")
    if row.status == InboundStatus.PENDING:
        raise PromoteRefused(f"message {row.id} is pending: processing decides it first")
    if row.status != InboundStatus.FAILED and row.decision not in HELD_DECISIONS:
        raise PromoteRefused(f"message {row.id} is not held ({row.decision})")
    return None
