"""Ticket service functions: open, thread, acknowledge (the read side is :mod:`intake.tickets.reads`).

The processor, the CLI and (later) the scheduler all come through here; nothing else writes
tickets. Functions that change state take an open write session and ``now`` so a caller can
put several changes in one transaction and tests can fix the clock.

The processor routes and opens tickets a chunk of messages at a time (:class:`ChunkKnown`,
:func:`open_tickets`): a handful of set-based statements per chunk instead of a dozen per
message, the rows built exactly as opening them one by one would.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, true
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines
from intake.sla.engine import StageDeadline
from intake.store.inbound import StoredMessage
from intake.store.models import (
    Deadline, Event, Notification, Outbox, ReferenceCounter, ThreadEntry, Ticket,
)
from intake.tickets import credit
from intake.understand import reply_tokens, route
from intake.understand.parse import ParsedMail, clean_text
from intake.vocabulary import TicketState

SYSTEM_ACTOR = "intake"

# How the acknowledgement names each stage it promises; unnamed stages use their own name.
STAGE_LABELS = {
    "acknowledge": "Acknowledgement by a person",
    "assess": "Initial assessment",
    "fix": "Fix released (target)",
    "resolve": "Resolution (target)",
    "disclose": "Public disclosure",
}

# The new-ticket notice quotes the report up to this many characters (`intake show` has it all).
NOTICE_TEXT_LIMIT = 20_000

# Message-IDs of one message looked up for threading: In-Reply-To and the latest References.
_MESSAGE_IDS_LOOKED_UP = 50


@dataclass(frozen=True)
class OpenedTicket:
    id: int
    reference: str


class DependsOnPlanned(Exception):
    """A lookup's answer depends on a message routed earlier in the same chunk, not yet written."""


def records_on_ticket(decision: route.Decision) -> bool:
    """Whether *decision* adds its message to an existing ticket (a reply, a third party's mail, or
    automatic mail or a bounce that threads); a new ticket's report is added by :func:`open_tickets`."""
    return decision.ticket_id is not None and decision.kind not in (route.NEW_TICKET, route.DUPLICATE)


class ChunkKnown:
    """The route stage's view of the database (see :class:`intake.understand.route.Known`) for a chunk of
    messages routed one after the other and written together afterwards.

    What the rules will ask is fetched up front with set-based queries: one for all the chunk's
    message keys, one per table for all the Message-IDs its messages refer to. Anything else is
    looked up when asked. Because nothing is written until the whole chunk is routed, a lookup
    whose answer a message routed earlier in the chunk would change (a second copy of it, a reply
    to it, a ticket reference it is about to be given) raises :class:`DependsOnPlanned`: the
    caller writes what it routed so far and routes that message again. The first message of a
    chunk never raises it.
    """

    def __init__(self, session: Session, incomings: list[route.Incoming]):
        self._session = session
        self._tickets_by_key: dict[str, int | None] = {}
        self._messages: dict[str, route.KnownMessage | None] = {}
        self._tickets_by_reference: dict[str, route.TicketRef | None] = {}
        self._planned_keys: set[str] = set()
        self._planned_message_ids: set[str] = set()
        self._plans_new_tickets = False
        self._fetch_keys({incoming.message_key for incoming in incomings})
        self._fetch_messages({m for incoming in incomings for m in _message_ids_referred_to(incoming.mail)})

    def planned(self, incoming: route.Incoming, decision: route.Decision) -> None:
        """Note that *decision* on *incoming* will be written with the chunk."""
        if decision.kind == route.NEW_TICKET or records_on_ticket(decision):
            self._planned_keys.add(incoming.message_key)
            if incoming.mail.message_id:
                self._planned_message_ids.add(incoming.mail.message_id)
        self._plans_new_tickets |= decision.kind == route.NEW_TICKET

    def ticket_for_message_key(self, message_key: str) -> int | None:
        if message_key in self._planned_keys:
            raise DependsOnPlanned(message_key)
        if message_key not in self._tickets_by_key:
            self._fetch_keys({message_key})
        return self._tickets_by_key[message_key]

    def ticket_by_reference(self, reference: str) -> route.TicketRef | None:
        reference = reference.upper()
        if reference not in self._tickets_by_reference:
            row = self._session.execute(select(Ticket.id, Ticket.reference, Ticket.reporter)
                                        .where(Ticket.reference == reference)).first()
            self._tickets_by_reference[reference] = route.TicketRef(*row) if row else None
        ticket = self._tickets_by_reference[reference]
        if ticket is None and self._plans_new_tickets:
            raise DependsOnPlanned(reference)  # it may be the reference a planned ticket is about to get
        return ticket

    def message_by_ids(self, message_ids: list[str], sent_only: bool = False) -> route.KnownMessage | None:
        """The first of *message_ids* (most relevant first) that we stored or (*sent_only*: only) sent."""
        candidates = [m for m in message_ids if m][:_MESSAGE_IDS_LOOKED_UP]
        if not sent_only and self._planned_message_ids.intersection(candidates):
            raise DependsOnPlanned(candidates)  # (what is planned is received mail, never sent)
        self._fetch_messages({m for m in candidates if m not in self._messages})
        found = (self._messages[m] for m in candidates)
        return next((known for known in found if known is not None and (known.sent or not sent_only)), None)

    def _fetch_keys(self, message_keys: set[str]) -> None:
        if not message_keys:
            return
        rows = self._session.execute(select(ThreadEntry.message_key, ThreadEntry.ticket_id)
                                     .where(ThreadEntry.message_key.in_(message_keys)))
        found = dict(rows.all())
        self._tickets_by_key.update({key: found.get(key) for key in message_keys})

    def _fetch_messages(self, message_ids: set[str]) -> None:
        if not message_ids:
            return
        rows = self._session.execute(
            select(ThreadEntry.message_id, ThreadEntry.kind, ThreadEntry.direction == "out", Ticket.id,
                   Ticket.reference, Ticket.reporter)
            .join(Ticket, Ticket.id == ThreadEntry.ticket_id).where(ThreadEntry.message_id.in_(message_ids))
        ).all()
        rows += self._session.execute(
            select(Outbox.message_id, Outbox.kind, true(), Ticket.id, Ticket.reference, Ticket.reporter)
            .join(Ticket, Ticket.id == Outbox.ticket_id).where(Outbox.message_id.in_(message_ids))
        ).all()
        found = {message_id: (kind, bool(sent), ticket) for message_id, kind, sent, *ticket in rows}  # sent wins
        for message_id in message_ids:
            kind, sent, ticket = found.get(message_id, (None, False, None))
            self._messages[message_id] = (route.KnownMessage(route.TicketRef(*ticket), message_id, kind, sent)
                                          if ticket else None)


def _message_ids_referred_to(mail: ParsedMail) -> list[str]:
    """The Message-IDs the threading rules will look up for *mail*, to fetch them all at once."""
    threading = [m for m in [mail.in_reply_to, *reversed(mail.references)] if m][:_MESSAGE_IDS_LOOKED_UP]
    report = mail.delivery_report
    return threading + ([report.original_message_id] if report and report.original_message_id else [])


def routing_config(settings: Settings, reply_secret: bytes | None = None,
                   now: datetime | None = None) -> route.RoutingConfig:
    """What the routing rules read; without *reply_secret* (and the *now* tokens are checked at) no
    reply address verifies."""
    return route.RoutingConfig(
        our_addresses=frozenset(settings.smtp.addresses),
        loop_marker=settings.intake.message_id_domain,
        reference_prefix=settings.intake.reference_prefix,
        is_maintainer=settings.is_maintainer,
        never_answered=settings.never_answered,
        check_reply_token=(lambda reference, token: reply_tokens.check(
            reply_secret, reference, token, [m.email for m in settings.maintainers], now,
            reply_tokens.max_age(settings)))
        if reply_secret and now else (lambda reference, token: reply_tokens.TokenCheck(reply_tokens.INVALID)),
    )


def next_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The references :func:`allocate_references` would hand out for *years* now, read only: what a
    reply can be rendered with before the write lock is taken."""
    table = ReferenceCounter.__table__
    query = select(table.c.year, table.c.last).where(table.c.prefix == prefix, table.c.year.in_(set(years)))
    return _numbered(prefix, years, dict(session.execute(query).all()))


def allocate_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The next public references, one for each of *years* in order (e.g. SEC-2026-0042): one atomic
    upsert per year, safe under concurrency."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = ReferenceCounter.__table__
    last_before = {}
    for year, count in Counter(years).items():
        statement = (
            insert(table)
            .values(prefix=prefix, year=year, last=count)
            .on_conflict_do_update(index_elements=["prefix", "year"], set_={"last": table.c.last + count})
            .returning(table.c.last)
        )
        last_before[year] = session.execute(statement).scalar_one() - count
    return _numbered(prefix, years, last_before)


def _numbered(prefix: str, years: list[int], last_before: dict[int, int]) -> list[str]:
    """References for *years* in order, numbered on from each year's last number (0: none yet)."""
    numbers = {year: itertools.count(last_before.get(year, 0) + 1) for year in set(years)}
    return [f"{prefix}-{year}-{next(numbers[year]):04d}" for year in years]


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
    session.execute(insert(Event.__table__), _event(ticket_id, kind, now, actor, **detail))


def _event(ticket_id: int, kind: str, now: datetime, actor: str = SYSTEM_ACTOR, **detail: object) -> dict[str, Any]:
    """An event row."""
    return dict(ticket_id=ticket_id, at=now, actor=actor, kind=kind, detail=detail)


def _initial_deadlines(settings: Settings, policy_name: str, received_at: datetime,
                       acknowledged_at: datetime | None) -> list[tuple[StageDeadline, datetime | None]]:
    """A new ticket's deadlines; *acknowledged_at*: when its automatic reply was queued, if it was."""
    inputs = deadlines.SlaInputs(received_at, None, {}, acknowledged_at, [])
    return deadlines.compute(settings, policy_name, inputs)


def promised_dates(settings: Settings, policy_name: str,
                   computed: list[tuple[StageDeadline, datetime | None]]) -> list[composer.PromisedDate]:
    """The dates a new report's acknowledgement states (from its *computed* deadlines), in the
    policy's own time zone."""
    policy = settings.policies[policy_name]
    calendars = settings.all_calendars
    promised = []
    for deadline, _ in computed:
        if deadline.due is None:
            continue
        stage = next(s for s in policy.stages if s.name == deadline.stage)
        zone = calendars[stage.calendar or policy.calendar].timezone
        note = "depends on severity; the earliest applies until we assess it" if deadline.severity_assumed else ""
        promised.append(composer.PromisedDate(STAGE_LABELS.get(deadline.stage, deadline.stage), deadline.due,
                                             zone, note))
    return promised


def automatic_mails_sent(session: Session, settings: Settings, incomings: list[route.Incoming],
                         now: datetime) -> Counter[str]:
    """How many automatic mails went to each of *incomings*' senders within the rate limit's window,
    by lowercased address."""
    window_start = now - timedelta(seconds=settings.autoreply.window)
    return outbox.automatic_mail_counts(session, [i.mail_from for i in incomings if i.mail_from], window_start)


@dataclass(frozen=True)
class NewReport:
    """A message routed to a new ticket."""

    stored: StoredMessage
    incoming: route.Incoming
    decision: route.Decision
    quality: dict[str, Any]
    credit: credit.Credit | None = None  # the credit the report states (read before any lock)

    @property
    def low_quality(self) -> bool:
        return bool(self.quality.get("low_quality"))


@dataclass(frozen=True)
class Opening:
    """A new ticket ready to be written: everything about it that needs no database, its automatic
    reply rendered (or why it gets none)."""

    report: NewReport
    reference: str
    address: str  # the intake address the report came in on; replies go out from it
    policy: str
    refusal: str | None  # why the reporter gets no automatic reply (loop safety, rate limit)
    reply: composer.OutgoingMail | None
    deadlines: list[tuple[StageDeadline, datetime | None]]  # every stage's deadline, and when met
    credit: credit.Credit | None = None  # how the report asks to be credited, if it says
    notices: tuple[composer.OutgoingMail, ...] = ()  # the new-ticket notice, one mail per maintainer


def prepare_openings(settings: Settings, reports: list[NewReport], references: list[str], sent: Counter[str],
                     now: datetime, reply_secret: bytes) -> list[Opening]:
    """The tickets *reports* open, under *references*, with their automatic replies rendered unless
    loop safety or the rate limit forbid them. *sent* is :func:`automatic_mails_sent` for the reports;
    each reply made here counts against the limit of the reports after it, as if they had been
    opened one by one."""
    config = routing_config(settings)
    sent = Counter(sent)
    openings = []
    for report, reference in zip(reports, references, strict=True):
        stored = report.stored
        address = intake_address(settings, stored.rcpt_tos)
        # The first recipient decides: a +tag mapped to a policy is more specific than the base address.
        policy = settings.policy_for(stored.rcpt_tos[0] if stored.rcpt_tos else address)
        refusal = _automatic_reply_refusal(settings, config, report.incoming, sent)
        computed = _initial_deadlines(settings, policy, stored.received_at, acknowledged_at=None if refusal else now)
        opening = Opening(report, reference, address, policy, refusal, None, computed, report.credit)
        if refusal is None:
            opening = replace(opening, reply=_automatic_reply(settings, opening, now))
            sent[stored.mail_from.lower()] += 1
        if settings.scheduler.new_ticket_notice and settings.notice_recipients:
            opening = replace(opening, notices=_new_ticket_notices(settings, opening, now, reply_secret))
        openings.append(opening)
    return openings


def _automatic_reply_refusal(settings: Settings, config: route.RoutingConfig, incoming: route.Incoming,
                             sent: Counter[str]) -> str | None:
    """Why *incoming*'s sender gets no automatic reply now (loop safety, rate limit), or None."""
    reason = route.auto_reply_suppressed(incoming, config)
    if reason:
        return reason
    count = sent[incoming.mail_from.lower()]
    if count >= settings.autoreply.limit_per_recipient:
        return (f"rate limit: {count} automatic mails to {incoming.mail_from} in the last "
                f"{settings.autoreply.window / 3600:g} h")
    return None


def _automatic_reply(settings: Settings, opening: Opening, now: datetime) -> composer.OutgoingMail:
    """The acknowledgement of a new report, or the out-of-scope reply if its policy answers low-quality ones so."""
    report = opening.report
    mail = report.incoming.mail
    out_of_scope = report.low_quality and settings.policies[opening.policy].low_quality_reply == "out-of-scope"
    return composer.automatic_reply(
        template="out-of-scope.txt.j2" if out_of_scope else "acknowledgement.txt.j2",
        kind="out-of-scope" if out_of_scope else "acknowledgement",
        reference=opening.reference,
        subject=mail.subject,
        reporter_address=report.stored.mail_from,
        reporter_name=mail.from_name,
        intake_address=opening.address,
        from_name=settings.intake.from_name,
        in_reply_to=mail.message_id,
        references=mail.references,
        deadlines=promised_dates(settings, opening.policy, opening.deadlines),
        policy=opening.policy,
        message_id_domain=settings.intake.message_id_domain,
        templates_dir=settings.templates_path,
        now=now,
    )


def _new_ticket_notices(settings: Settings, opening: Opening, now: datetime,
                        reply_secret: bytes) -> tuple[composer.OutgoingMail, ...]:
    """Tell the maintainers about a new ticket: the report's text, sender, decision and SLA dates;
    one mail each, replying to their own reply address for the ticket."""
    report = opening.report
    mail, stored = report.incoming.mail, report.stored
    subject = composer.strip_reply_prefixes(clean_text(mail.subject)) or "(no subject)"
    sender = clean_text(f"{mail.from_name} <{stored.mail_from or mail.from_address}>" if mail.from_name
                        else stored.mail_from or mail.from_address)
    context = dict(
        reference=opening.reference, subject=subject, sender=sender,
        received=f"{stored.received_at:%Y-%m-%d %H:%M:%S} UTC", intake_address=opening.address,
        decision=report.decision.kind, reason=report.decision.reason, policy=opening.policy,
        acknowledgement=(f"{opening.reply.kind} queued to {stored.mail_from}" if opening.reply
                         else f"none ({opening.refusal})"),
        labels=["low-quality"] if report.low_quality else [], warnings=mail.warnings,
        deadlines=promised_dates(settings, opening.policy, opening.deadlines),
        attachments=[a.as_dict() for a in mail.attachments],
        text=mail.body_text[:NOTICE_TEXT_LIMIT], truncated=len(mail.body_text) > NOTICE_TEXT_LIMIT,
        from_name=settings.intake.from_name)
    notices = []
    for recipient in settings.notice_recipients:
        reply_address = reply_tokens.reply_to(settings, reply_secret, opening.address, opening.reference, recipient,
                                              now)
        notices.append(composer.maintainer_mail(
            kind="new-ticket", dedupe_key=f"new:{opening.reference}>{recipient.lower()}", reference=opening.reference,
            subject=f"[{opening.reference}] New report: {subject}", recipients=[recipient],
            sender=(settings.intake.from_name, opening.address), reply_to=reply_address,
            text=composer.render("new-ticket.txt.j2", settings.templates_path, reply_address=reply_address, **context),
            message_id_domain=settings.intake.message_id_domain, now=now))
    return tuple(notices)


def open_tickets(session: Session, settings: Settings, openings: list[Opening], sent: Counter[str],
                 now: datetime, reply_secret: bytes) -> list[OpenedTicket]:
    """Write the tickets of *openings*, in order: each with its report as first entry, its events,
    and its automatic reply queued; in the caller's transaction, in a few statements for all.

    The references the openings were prepared with are allocated here. If another processor took
    some of them meanwhile, the openings are prepared again (with *sent*, as before) under the
    references allocated, so a reference is never handed out twice and never skipped."""
    if not openings:
        return []
    reports = [opening.report for opening in openings]
    references = allocate_references(session, settings.intake.reference_prefix,
                                     [report.stored.received_at.year for report in reports])
    if references != [opening.reference for opening in openings]:
        openings = prepare_openings(settings, reports, references, sent, now, reply_secret)
    table = Ticket.__table__
    # One INSERT for all (ids in parameter order would take one per row on SQLite): the unique
    # reference says which id is whose.
    ids = dict(session.execute(insert(table).returning(table.c.reference, table.c.id),
                               [_ticket_row(opening, now) for opening in openings]).all())
    opened = [OpenedTicket(ids[opening.reference], opening.reference) for opening in openings]
    queued = outbox.enqueue_many(session, [(mail, ticket.id) for opening, ticket in zip(openings, opened)
                                           for mail in (opening.reply, *opening.notices) if mail], now=now)
    # One notification per ticket, whichever maintainers' mails carry it.
    notified = [(opening, ticket.id) for opening, ticket in zip(openings, opened)
                if any(mail.dedupe_key in queued for mail in opening.notices)]
    if notified:
        session.execute(insert(Notification.__table__), [
            dict(key=f"new:{opening.reference}", kind="new-ticket", ticket_id=ticket_id, stage=None,
                 label="new-ticket", due_at=now, created_at=now,
                 recipients=[mail.recipients[0] for mail in opening.notices],
                 outbox_key=f"new:{opening.reference}") for opening, ticket_id in notified])
    entries: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for opening, ticket in zip(openings, opened):
        report, reply = opening.report, opening.reply
        entries.append(_entry_from_mail(ticket.id, report.stored, report.incoming.mail, kind="report", now=now))
        events += _opening_events(opening, ticket.id, now)
        if opening.refusal:
            events.append(_event(ticket.id, "acknowledgement-suppressed", now, reason=opening.refusal))
        elif reply.dedupe_key in queued:
            entries.append(_automatic_entry(opening, ticket, reply, now))
            events.append(_event(ticket.id, f"{reply.kind}-queued", now, to=report.stored.mail_from,
                                 message_id=reply.message_id))
    session.execute(insert(ThreadEntry.__table__), entries)
    session.execute(insert(Event.__table__), events)
    session.execute(insert(Deadline.__table__), [
        {**row, "ticket_id": ticket.id}
        for opening, ticket in zip(openings, opened)
        for row in deadlines.rows(settings, opening.policy, None, _queued_deadlines(settings, opening, queued, now),
                                  now)])
    return opened


def _queued_deadlines(settings: Settings, opening: Opening, queued: set[str],
                      now: datetime) -> list[tuple[StageDeadline, datetime | None]]:
    """The opening's deadlines, unless they counted an automatic reply that turned out to be queued
    already (by another processor: its dedupe key was taken), which this ticket did not send."""
    if opening.reply is None or opening.reply.dedupe_key in queued:
        return opening.deadlines
    return _initial_deadlines(settings, opening.policy, opening.report.stored.received_at, acknowledged_at=None)


def _ticket_row(opening: Opening, now: datetime) -> dict[str, Any]:
    report = opening.report
    mail = report.incoming.mail
    return dict(
        reference=opening.reference,
        subject=composer.strip_reply_prefixes(mail.subject) or "(no subject)",
        reporter=report.stored.mail_from or mail.from_address,
        reporter_name=mail.from_name,
        intake_address=opening.address,
        state=TicketState.NEW,
        policy=opening.policy,
        labels=["low-quality"] if report.low_quality else [],
        links=[{"kind": "mentions", "reference": r} for r in report.decision.mentions],
        quality=report.quality,
        credit=opening.credit.as_dict() if opening.credit else None,
        received_at=report.stored.received_at,
        created_at=now,
        updated_at=now,
    )


def _opening_events(opening: Opening, ticket_id: int, now: datetime) -> list[dict[str, Any]]:
    report = opening.report
    events = [_event(ticket_id, "opened", now, decision=report.decision.kind, inbound_id=report.stored.id,
                     message_id=report.incoming.mail.message_id, policy=opening.policy)]
    events += [_event(ticket_id, "linked", now, link="mentions", reference=mentioned)
               for mentioned in report.decision.mentions]
    if report.low_quality:
        events.append(_event(ticket_id, "labelled", now, label="low-quality", score=report.quality.get("score"),
                             matched=report.quality.get("matched")))
    if opening.credit:
        events.append(_event(ticket_id, credit.CREDIT_EVENT, now, **credit.event_detail(opening.credit)))
    return events


def _automatic_entry(opening: Opening, ticket: OpenedTicket, reply: composer.OutgoingMail,
                     now: datetime) -> dict[str, Any]:
    """The thread entry of an automatic reply to a new report."""
    return dict(
        ticket_id=ticket.id,
        inbound_id=None,
        direction="out",
        kind="automatic",
        message_key=None,
        message_id=reply.message_id,
        in_reply_to=opening.report.incoming.mail.message_id,
        references=[],
        sender=opening.address,
        subject=f"Re: [{ticket.reference}]",
        body_text="",
        attachments=[],
        warnings=[],
        threaded_by=None,
        encrypted=None,
        created_at=now,
    )


def record_on_ticket(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
                     decision: route.Decision, now: datetime, reply_credit: credit.Credit | None) -> None:
    """Add a threaded message (reply, automatic mail, bounce) to its ticket; never answers it. Only
    the reporter's own reply changes the ticket: a third party's is recorded (kind
    ``third-party-reply``) and nothing else. *reply_credit* is the credit the message states as a
    reply, read before the write lock."""
    assert decision.ticket_id is not None
    ticket = session.get(Ticket, decision.ticket_id)
    assert ticket is not None
    entry = _entry_from_mail(ticket.id, stored, incoming.mail, kind=decision.kind, now=now,
                             threaded_by=decision.threaded_by)
    session.execute(insert(ThreadEntry.__table__), entry)
    ticket.updated_at = now
    add_event(session, ticket.id, f"{decision.kind}-received", now, inbound_id=stored.id,
              message_id=incoming.mail.message_id, threaded_by=decision.threaded_by, sender=incoming.sender)
    if decision.kind == route.REPORTER_REPLY:
        if reply_credit:
            credit.set_credit(session, ticket, reply_credit, now, actor=SYSTEM_ACTOR)
    if decision.kind == route.REPORTER_REPLY and ticket.state == TicketState.WAITING:
        resume(session, ticket, now, actor=SYSTEM_ACTOR, why="the reporter replied")
        deadlines.refresh(session, settings, ticket, now)  # the clocks run again
    if decision.kind == route.BOUNCE and decision.bounced is not None:
        _record_bounce(session, ticket, incoming, decision.bounced, now)


def _record_bounce(session: Session, ticket: Ticket, incoming: route.Incoming, bounced: route.KnownMessage,
                   now: datetime) -> None:
    """A bounce of mail we sent (routing matched its Message-ID): an event and, if the mail went to
    the reporter and failed for them, the reporter flagged unreachable (a maintainer's notice
    bouncing says nothing about the reporter)."""
    report = incoming.mail.delivery_report
    sent_to = [r.lower() for r in session.scalars(select(Outbox.recipients)
                                                  .where(Outbox.message_id == bounced.message_id)).first() or []]
    recipient = report.recipient if report and report.recipient else (sent_to[0] if sent_to else ticket.reporter)
    diagnostic = " ".join(filter(None, [report and report.status, report and report.diagnostic])) or "no detail"
    what = bounced.kind.replace("-", " ")
    add_event(session, ticket.id, "bounced", now, summary=f"{what} to {recipient} bounced: {diagnostic}",
              message_id=bounced.message_id, recipient=recipient)
    failed = report is None or (report.action or "failed") == "failed"
    to_reporter = recipient.lower() == ticket.reporter.lower() and (not sent_to or recipient.lower() in sent_to)
    if failed and to_reporter and ticket.reporter_unreachable_at is None:
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


def _entry_from_mail(ticket_id: int, stored: StoredMessage, mail: ParsedMail, *, kind: str, now: datetime,
                     threaded_by: str | None = None) -> dict[str, Any]:
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
        threaded_by=threaded_by,
        encrypted=mail.encrypted,
        created_at=now,
    )
