"""Ticket service functions: open, thread, acknowledge, and the read side the CLI shows.

The processor, the CLI and (later) the scheduler all come through here; nothing else writes
tickets. Functions that change state take an open write session and ``now`` so a caller can
put several changes in one transaction and tests can fix the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake import outbox, replies, route
from intake.config import Settings
from intake.db import read_session
from intake.inbound import StoredMessage
from intake.models import Event, InboundMessage, Outbox, ReferenceCounter, ThreadEntry, Ticket, TicketState
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


@dataclass(frozen=True)
class OpenedTicket:
    id: int
    reference: str


class DatabaseKnown:
    """The route stage's view of the database (see :class:`intake.route.Known`)."""

    def __init__(self, session: Session):
        self._session = session

    def ticket_for_message_key(self, message_key: str) -> int | None:
        query = select(ThreadEntry.ticket_id).where(ThreadEntry.message_key == message_key)
        return self._session.scalars(query).first()

    def ticket_by_reference(self, reference: str) -> route.TicketRef | None:
        row = self._session.execute(select(Ticket.id, Ticket.reference, Ticket.reporter)
                                    .where(Ticket.reference == reference.upper())).first()
        return route.TicketRef(*row) if row else None

    def message_by_ids(self, message_ids: list[str]) -> route.KnownMessage | None:
        """The first of *message_ids* (most relevant first) that we stored or sent."""
        candidates = [m for m in message_ids if m][:50]
        if not candidates:
            return None
        rows = self._session.execute(
            select(ThreadEntry.message_id, ThreadEntry.kind, Ticket.id, Ticket.reference, Ticket.reporter)
            .join(Ticket, Ticket.id == ThreadEntry.ticket_id).where(ThreadEntry.message_id.in_(candidates))
        ).all()
        rows += self._session.execute(
            select(Outbox.message_id, Outbox.kind, Ticket.id, Ticket.reference, Ticket.reporter)
            .join(Ticket, Ticket.id == Outbox.ticket_id).where(Outbox.message_id.in_(candidates))
        ).all()
        by_id = {row[0]: row for row in rows}
        for message_id in candidates:
            if message_id in by_id:
                _, kind, *ticket = by_id[message_id]
                return route.KnownMessage(route.TicketRef(*ticket), message_id, kind)
        return None


def routing_config(settings: Settings) -> route.RoutingConfig:
    return route.RoutingConfig(
        our_addresses=frozenset(settings.smtp.addresses),
        loop_marker=settings.intake.message_id_domain,
        reference_prefix=settings.intake.reference_prefix,
        is_maintainer=settings.is_maintainer,
        never_answered=settings.never_answered,
    )


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
    # Core insert: building SQLModel objects costs more than the row on the processing hot path.
    session.execute(insert(Event.__table__).values(ticket_id=ticket_id, at=now, actor=actor, kind=kind,
                                                    detail=detail))


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


def automatic_reply_refusal(session: Session, settings: Settings, incoming: route.Incoming,
                            now: datetime) -> str | None:
    """Why *incoming*'s sender gets no automatic reply now (loop safety, rate limit), or None."""
    reason = route.auto_reply_suppressed(incoming, routing_config(settings))
    if reason:
        return reason
    window_start = now - timedelta(seconds=settings.autoreply.window)
    sent = outbox.automatic_mail_since(session, incoming.mail_from, window_start)
    if sent >= settings.autoreply.limit_per_recipient:
        return (f"rate limit: {sent} automatic mails to {incoming.mail_from} in the last "
                f"{settings.autoreply.window / 3600:g} h")
    return None


def open_ticket(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
                decision: route.Decision, now: datetime, quality: dict[str, Any] | None = None) -> OpenedTicket:
    """A new ticket from *incoming*: the report as first entry, events, and (unless loop safety or the
    rate limit forbid it) the automatic reply queued, all in the caller's transaction."""
    mail = incoming.mail
    address = intake_address(settings, stored.rcpt_tos)
    # The first recipient decides: a +tag mapped to a policy is more specific than the base address.
    policy_name = settings.policy_for(stored.rcpt_tos[0] if stored.rcpt_tos else address)
    reference = allocate_reference(session, settings.intake.reference_prefix, stored.received_at.year)
    low_quality = bool(quality and quality.get("low_quality"))
    table = Ticket.__table__
    ticket = OpenedTicket(reference=reference, id=session.execute(insert(table).values(
        reference=reference,
        subject=replies.strip_reply_prefixes(mail.subject) or "(no subject)",
        reporter=stored.mail_from or mail.from_address,
        reporter_name=mail.from_name,
        intake_address=address,
        state=TicketState.NEW,
        policy=policy_name,
        labels=["low-quality"] if low_quality else [],
        links=[{"kind": "mentions", "reference": r} for r in decision.mentions],
        quality=quality or {},
        received_at=stored.received_at,
        created_at=now,
        updated_at=now,
    ).returning(table.c.id)).scalar_one())
    session.execute(insert(ThreadEntry.__table__).values(_entry_from_mail(ticket.id, stored, mail, kind="report",
                                                                          now=now)))
    add_event(session, ticket.id, "opened", now, decision=decision.kind, inbound_id=stored.id,
              message_id=mail.message_id, policy=policy_name)
    for mentioned in decision.mentions:
        add_event(session, ticket.id, "linked", now, link="mentions", reference=mentioned)
    if low_quality:
        add_event(session, ticket.id, "labelled", now, label="low-quality", score=quality.get("score"),
                  matched=quality.get("matched"))
    refusal = automatic_reply_refusal(session, settings, incoming, now)
    if refusal:
        add_event(session, ticket.id, "acknowledgement-suppressed", now, reason=refusal)
        return ticket
    out_of_scope = low_quality and settings.policies[policy_name].low_quality_reply == "out-of-scope"
    reply = replies.automatic_reply(
        template="out-of-scope.txt.j2" if out_of_scope else "acknowledgement.txt.j2",
        kind="out-of-scope" if out_of_scope else "acknowledgement",
        reference=reference,
        subject=mail.subject,
        reporter_address=stored.mail_from,
        reporter_name=mail.from_name,
        intake_address=address,
        from_name=settings.intake.from_name,
        in_reply_to=mail.message_id,
        references=mail.references,
        deadlines=promised_dates(settings, policy_name, stored.received_at),
        policy=policy_name,
        message_id_domain=settings.intake.message_id_domain,
        templates_dir=settings.resolve_path(settings.intake.templates_dir) if settings.intake.templates_dir else None,
        now=now,
    )
    if outbox.enqueue(session, reply, ticket_id=ticket.id, now=now):
        session.execute(insert(ThreadEntry.__table__).values(
            ticket_id=ticket.id, direction="out", kind="automatic", message_id=reply.message_id,
            in_reply_to=mail.message_id, references=[], sender=address, subject=f"Re: [{reference}]",
            body_text="", attachments=[], warnings=[], created_at=now))
        add_event(session, ticket.id, f"{reply.kind}-queued", now, to=stored.mail_from,
                  message_id=reply.message_id)
    return ticket


def record_on_ticket(session: Session, stored: StoredMessage, incoming: route.Incoming, decision: route.Decision,
                     now: datetime) -> None:
    """Add a threaded message (reply, automatic mail, bounce) to its ticket; never answers it."""
    assert decision.ticket_id is not None
    ticket = session.get(Ticket, decision.ticket_id)
    assert ticket is not None
    entry = _entry_from_mail(ticket.id, stored, incoming.mail, kind=decision.kind, now=now)
    session.execute(insert(ThreadEntry.__table__).values({**entry, "threaded_by": decision.threaded_by}))
    ticket.updated_at = now
    add_event(session, ticket.id, f"{decision.kind}-received", now, inbound_id=stored.id,
              message_id=incoming.mail.message_id, threaded_by=decision.threaded_by, sender=incoming.sender)
    if decision.kind == route.REPORTER_REPLY and ticket.state == TicketState.WAITING:
        resume(session, ticket, now, actor=SYSTEM_ACTOR, why="the reporter replied")
    if decision.kind == route.BOUNCE and decision.bounced is not None:
        _record_bounce(session, ticket, incoming, decision.bounced, now)


def _record_bounce(session: Session, ticket: Ticket, incoming: route.Incoming, bounced: route.KnownMessage,
                   now: datetime) -> None:
    report = incoming.mail.delivery_report
    recipient = (report.recipient if report and report.recipient else ticket.reporter)
    diagnostic = " ".join(filter(None, [report and report.status, report and report.diagnostic])) or "no detail"
    what = bounced.kind.replace("-", " ")
    add_event(session, ticket.id, "bounced", now, summary=f"{what} to {recipient} bounced: {diagnostic}",
              message_id=bounced.message_id, recipient=recipient)
    failed = report is None or (report.action or "failed") == "failed"
    if failed and recipient.lower() == ticket.reporter.lower() and ticket.reporter_unreachable_at is None:
        ticket.reporter_unreachable_at = now
        add_event(session, ticket.id, "reporter-unreachable", now, address=recipient)


def resume(session: Session, ticket: Ticket, now: datetime, *, actor: str, why: str) -> None:
    """Leave the waiting state for the state the ticket was in before it."""
    previous = session.scalars(
        select(Event).where(Event.ticket_id == ticket.id, Event.kind == "state-changed")
        .order_by(Event.at.desc(), Event.id.desc())
    ).first()
    target = previous.detail.get("from", TicketState.NEW) if previous else TicketState.NEW
    change_state(session, ticket, target, now, actor=actor, why=why)


def change_state(session: Session, ticket: Ticket, state: str, now: datetime, *, actor: str, why: str) -> None:
    add_event(session, ticket.id, "state-changed", now, actor=actor, **{"from": ticket.state, "to": state, "why": why})
    ticket.state = state
    ticket.updated_at = now


def _entry_from_mail(ticket_id: int, stored: StoredMessage, mail: ParsedMail, *, kind: str,
                     now: datetime) -> dict[str, Any]:
    """A thread_entry row for an inbound message."""
    return dict(
        ticket_id=ticket_id,
        inbound_id=stored.id,
        direction="in",
        kind=kind,
        message_key=message_key(mail, stored),
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=mail.references,
        sender=stored.mail_from or mail.from_address,
        subject=mail.subject,
        body_text=mail.body_text,
        attachments=[a.as_dict() for a in mail.attachments],
        warnings=mail.warnings,
        encrypted=mail.encrypted,
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
