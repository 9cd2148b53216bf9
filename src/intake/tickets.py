"""Ticket service functions: open, thread, acknowledge, and the read side the CLI shows.

The processor, the CLI and (later) the scheduler all come through here; nothing else writes
tickets. Functions that change state take an open write session and ``now`` so a caller can
put several changes in one transaction and tests can fix the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake import outbox, replies
from intake.config import Settings
from intake.db import read_session
from intake.inbound import StoredMessage
from intake.models import Event, InboundMessage, ReferenceCounter, ThreadEntry, Ticket, TicketState
from intake.parse import ParsedMail
from intake.sla import compute_deadlines

SYSTEM_ACTOR = "intake"

# How the acknowledgement names each stage it promises; unnamed stages use their own name.
STAGE_LABELS = {
    "acknowledge": "Acknowledgement by a person",
    "assess": "Initial assessment",
    "fix": "Fix released (target)",
    "resolve": "Resolution (target)",
    "disclose": "Public disclosure",
}


class TicketNotFound(LookupError):
    pass


class DatabaseKnown:
    """The route stage's view of the database (see :class:`intake.route.Known`)."""

    def __init__(self, session: Session):
        self._session = session

    def ticket_for_message_key(self, message_key: str) -> int | None:
        query = select(ThreadEntry.ticket_id).where(ThreadEntry.message_key == message_key)
        return self._session.scalars(query).first()


def allocate_reference(session: Session, prefix: str, year: int) -> str:
    """Next public reference, e.g. SEC-2026-0042; an atomic upsert, safe under concurrency."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = ReferenceCounter.__table__
    statement = (
        insert(table)
        .values(prefix=prefix, year=year, last=1)
        .on_conflict_do_update(index_elements=["prefix", "year"], set_={"last": table.c.last + 1})
        .returning(table.c.last)
    )
    number = session.execute(statement).scalar_one()
    return f"{prefix}-{year}-{number:04d}"


def message_key(mail: ParsedMail, stored: StoredMessage) -> str:
    """What makes two deliveries 'the same message': its Message-ID, else its bytes."""
    return mail.message_id or f"sha256:{stored.sha256}"


def intake_address(settings: Settings, rcpt_tos: list[str]) -> str:
    """The configured address the mail came in on (its +tag removed)."""
    ours = (settings.our_address(recipient) for recipient in rcpt_tos)
    return next((address for address in ours if address), settings.smtp.addresses[0])


def add_event(session: Session, ticket_id: int, kind: str, now: datetime, actor: str = SYSTEM_ACTOR,
              **detail: object) -> None:
    session.add(Event(ticket_id=ticket_id, at=now, actor=actor, kind=kind, detail=detail))


def promised_dates(settings: Settings, policy_name: str, received_at: datetime) -> list[replies.PromisedDate]:
    """The dates a new report's acknowledgement states, in the policy's own time zone."""
    policy = settings.policies[policy_name]
    calendars = settings.all_calendars
    promised = []
    for deadline in compute_deadlines(policy, calendars, received_at=received_at):
        if deadline.due is None:
            continue
        stage = next(s for s in policy.stages if s.name == deadline.stage)
        zone = calendars[stage.calendar or policy.calendar].timezone
        note = "depends on severity; the earliest applies until we assess it" if deadline.severity_assumed else ""
        promised.append(replies.PromisedDate(STAGE_LABELS.get(deadline.stage, deadline.stage), deadline.due,
                                             zone, note))
    return promised


def open_ticket(session: Session, settings: Settings, stored: StoredMessage, mail: ParsedMail,
                decision: str, now: datetime) -> Ticket:
    """A new ticket from *mail*: the report as first entry, an event, and the acknowledgement queued."""
    address = intake_address(settings, stored.rcpt_tos)
    # The first recipient decides: a +tag mapped to a policy is more specific than the base address.
    policy = settings.policy_for(stored.rcpt_tos[0] if stored.rcpt_tos else address)
    reference = allocate_reference(session, settings.intake.reference_prefix, stored.received_at.year)
    reporter = stored.mail_from
    ticket = Ticket(
        reference=reference,
        subject=replies.strip_reply_prefixes(mail.subject) or "(no subject)",
        reporter=reporter,
        reporter_name=mail.from_name,
        intake_address=address,
        state=TicketState.NEW,
        policy=policy,
        received_at=stored.received_at,
        created_at=now,
        updated_at=now,
    )
    session.add(ticket)
    session.flush()
    assert ticket.id is not None
    session.add(_entry_from_mail(ticket.id, stored, mail, kind="report", now=now))
    add_event(session, ticket.id, "opened", now, decision=decision, inbound_id=stored.id,
              message_id=mail.message_id, policy=policy)
    ack = replies.acknowledgement(
        reference=reference,
        subject=mail.subject,
        reporter_address=reporter,
        reporter_name=mail.from_name,
        intake_address=address,
        from_name=settings.intake.from_name,
        in_reply_to=mail.message_id,
        references=mail.references,
        deadlines=promised_dates(settings, policy, stored.received_at),
        policy=policy,
        message_id_domain=settings.intake.message_id_domain,
        templates_dir=settings.resolve_path(settings.intake.templates_dir) if settings.intake.templates_dir else None,
        now=now,
    )
    if outbox.enqueue(session, ack, ticket_id=ticket.id, now=now):
        session.add(ThreadEntry(ticket_id=ticket.id, direction="out", kind="automatic", message_id=ack.message_id,
                                in_reply_to=mail.message_id, sender=address, subject=f"Re: [{reference}]",
                                body_text="", created_at=now))
        add_event(session, ticket.id, "acknowledgement-queued", now, to=reporter, message_id=ack.message_id)
    return ticket


def _entry_from_mail(ticket_id: int, stored: StoredMessage, mail: ParsedMail, *, kind: str,
                     now: datetime) -> ThreadEntry:
    return ThreadEntry(
        ticket_id=ticket_id,
        inbound_id=stored.id,
        direction="in",
        kind=kind,
        message_key=message_key(mail, stored),
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=mail.references,
        sender=stored.mail_from,
        subject=mail.subject,
        body_text=mail.body_text,
        attachments=[a.as_dict() for a in mail.attachments],
        warnings=mail.warnings,
        created_at=now,
    )


# -- read side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TicketDetail:
    ticket: Ticket
    entries: list[ThreadEntry]
    events: list[Event]
    messages: list[InboundMessage]


def list_tickets(engine: Engine, state: str | None = None) -> list[Ticket]:
    with read_session(engine) as session:
        query = select(Ticket).order_by(Ticket.received_at, Ticket.id)
        if state:
            query = query.where(Ticket.state == state)
        return list(session.scalars(query))


def ticket_detail(engine: Engine, reference: str) -> TicketDetail:
    with read_session(engine) as session:
        ticket = session.scalars(select(Ticket).where(Ticket.reference == reference.upper())).first()
        if ticket is None:
            raise TicketNotFound(reference)
        entries = session.scalars(select(ThreadEntry).where(ThreadEntry.ticket_id == ticket.id)
                                  .order_by(ThreadEntry.created_at, ThreadEntry.id))
        events = session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id))
        messages = session.scalars(select(InboundMessage).where(InboundMessage.ticket_id == ticket.id)
                                   .order_by(InboundMessage.id))
        return TicketDetail(ticket, list(entries), list(events), list(messages))
