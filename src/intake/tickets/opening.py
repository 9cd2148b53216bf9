"""Opening tickets: the new-ticket plan for a chunk's new reports, made ready without the write
lock (:func:`plan`), and written in a few set-based statements (:func:`open_tickets`).

A new ticket gets its public reference, its policy (from the address the report came in on),
its deadlines, the automatic reply to its reporter stating the promised dates (unless loop safety
or the rate limit forbid one) and the new-ticket notice to each maintainer; the replies are
rendered with the references that come next before the lock is taken. This module writes the
new ticket rows and their first thread entries, events, deadlines and notifications, and queues
their mail; writes on tickets once they exist are :mod:`intake.tickets.records`' and the modules
it names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session

from intake import language_tags, openpgp
from intake.language_tags import ENGLISH
from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines
from intake.sla.engine import StageDeadline
from intake.store import audit, sealing
from intake.store.inbound import StoredMessage
from intake.store.models import Deadline, Notification, ThreadEntry, Ticket
from intake.tickets import credit, promises, reporter_keys
from intake.tickets.records import entry_from_mail, event
from intake.tickets.references import allocate_references, next_references
from intake.understand import credit_words, reply_tokens, route
from intake.understand.header_text import clean_text
from intake.understand.lookups import routing_config
from intake.understand.parsed_mail import ParsedMail
from intake.vocabulary import (
    ACCEPT_LANGUAGE_HEADER, CONTENT_LANGUAGE_HEADER, LOW_QUALITY_LABEL, MILESTONE_SPECS, QUEUED_EVENT, Direction, EntryKind, EventKind, LinkKind, MailKind,
    NotificationKind, TicketState,
)

# How the acknowledgement names each stage it promises; unnamed stages use their own name.
STAGE_LABELS = {spec.stage: spec.stage_label for spec in MILESTONE_SPECS}

# Why a report imported as history (`intake import`) gets no automatic reply (nor notice).
HISTORY_REFUSAL = "imported history: nothing is sent for it"

# The new-ticket notice quotes the report up to this many characters (`intake show` has it all).
NOTICE_TEXT_LIMIT = 20_000


@dataclass(frozen=True)
class NewReport:
    """A message routed to a new ticket."""

    stored: StoredMessage
    incoming: route.Incoming
    decision: route.Decision
    quality: dict[str, Any]
    # When it arrived, for the SLA: when the trusted relay in front accepted it, else when intake
    # did (stored.received_at); see intake.understand.arrival_time.
    received_at: datetime
    credit: credit_words.Credit | None = None  # the credit the report states (read before any lock)
    # Why it gets no automatic reply whatever loop safety and the rate limit say (`intake promote
    # --no-ack`), or None.
    no_reply: str | None = None

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
    credit: credit_words.Credit | None = None  # how the report asks to be credited, if it says
    notices: tuple[composer.OutgoingMail, ...] = ()  # the new-ticket notice, one mail per maintainer
    language: str = ENGLISH  # what the reporter's mail is written in (see report_language)


@dataclass(frozen=True)
class NewTickets:
    """The tickets a chunk's new reports open, ready to be written (see :func:`plan`)."""

    openings: list[Opening]
    sent: Counter[str]  # automatic mails per recipient within the rate limit's window, as read
    reply_secret: bytes  # signs maintainers' reply addresses in the notices
    keys: dict[str, str] = field(default_factory=dict)  # OpenPGP keys mail is encrypted to, by lowercased address


@dataclass(frozen=True)
class OpenedTicket:
    id: int
    reference: str


@dataclass(frozen=True)
class PlanReads:
    """What planning new tickets reads from the database (see :func:`read_for_plan`)."""

    sent: Counter[str]  # automatic mails per recipient within the rate limit's window
    upcoming: list[str]  # the references that come next, one per report
    keys: dict[str, str] = field(default_factory=dict)  # OpenPGP keys mail is encrypted to, by lowercased address


def read_for_plan(session: Session, settings: Settings, reports: list[NewReport], now: datetime) -> PlanReads:
    """The reads :func:`plan` needs, in the caller's read session: rendering happens after it."""
    keys = (reporter_keys.keys_for(session, settings, [report.stored.mail_from for report in reports])
            if openpgp.org_key(settings) else {})
    return PlanReads(_automatic_mails_sent(session, settings, [report.incoming for report in reports], now),
                     next_references(session, settings.intake.reference_prefix,
                                     [report.received_at.year for report in reports]), keys)


def plan(settings: Settings, reports: list[NewReport], reads: PlanReads, now: datetime,
         reply_secret: bytes) -> NewTickets:
    """The tickets *reports* open, made ready before the write lock and outside any transaction:
    each under the reference that comes next, its automatic reply rendered unless loop safety or
    the rate limit forbid it, its notices signed with *reply_secret*."""
    return NewTickets(_prepare_openings(settings, reports, reads.upcoming, reads.sent, now, reply_secret, reads.keys),
                      reads.sent, reply_secret, reads.keys)


def open_tickets(session: Session, settings: Settings, planned: NewTickets, inbound_ids: Container[int],
                 now: datetime) -> dict[int, OpenedTicket]:
    """Write the tickets *planned* for the reports among *inbound_ids* (those still pending), in
    order: each with its report as first entry, its events, and its mail queued; in the caller's
    transaction, in a few statements for all. Returns the tickets opened by inbound message id.

    The references the openings were prepared with are allocated here. If another processor took
    some of them meanwhile (or a report planned is no longer pending), the openings are prepared
    again (with the counts of automatic mail sent, as before) under the references allocated, so
    a reference is never handed out twice and never skipped."""
    openings = [opening for opening in planned.openings if opening.report.stored.id in inbound_ids]
    if not openings:
        return {}
    reports = [opening.report for opening in openings]
    allocated = allocate_references(session, settings.intake.reference_prefix,
                                    [report.received_at.year for report in reports])
    if allocated != [opening.reference for opening in openings]:
        openings = _prepare_openings(settings, reports, allocated, planned.sent, now, planned.reply_secret,
                                     planned.keys)
    table = Ticket.__table__
    # One INSERT for all (ids in parameter order would take one per row on SQLite): the unique
    # reference says which id is whose.
    ids = dict(session.execute(insert(table).returning(table.c.reference, table.c.id),
                               [_ticket_row(opening, now) for opening in openings]).all())
    opened = [OpenedTicket(ids[opening.reference], opening.reference) for opening in openings]
    sealing.make_ticket_keys(session, [ticket.id for ticket in opened], now)  # one INSERT, not one per ticket
    queued = outbox.enqueue_many(session, [(mail, ticket.id) for opening, ticket in zip(openings, opened)
                                           for mail in (opening.reply, *opening.notices) if mail], now=now)
    # One notification per ticket, whichever maintainers' mails carry it.
    notified = [(opening, ticket.id) for opening, ticket in zip(openings, opened)
                if any(mail.dedupe_key in queued for mail in opening.notices)]
    if notified:
        session.execute(insert(Notification.__table__), [
            dict(key=f"new:{opening.reference}", kind=NotificationKind.NEW_TICKET, ticket_id=ticket_id, stage=None,
                 label=NotificationKind.NEW_TICKET, due_at=now, created_at=now,
                 recipients=[mail.recipients[0] for mail in opening.notices],
                 outbox_key=f"new:{opening.reference}") for opening, ticket_id in notified])
    entries: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for opening, ticket in zip(openings, opened):
        report, reply = opening.report, opening.reply
        entries.append(entry_from_mail(session, ticket.id, report.stored, report.incoming.mail,
                                       kind=EntryKind.REPORT, now=now))
        events += _opening_events(opening, ticket.id, now)
        if opening.refusal:
            events.append(event(ticket.id, EventKind.ACKNOWLEDGEMENT_SUPPRESSED, now, reason=opening.refusal))
        elif reply.dedupe_key in queued:
            entries.append(_automatic_entry(opening, ticket, reply, now))
            events.append(event(ticket.id, QUEUED_EVENT[reply.kind], now, to=report.stored.mail_from,
                                message_id=reply.message_id))
    session.execute(insert(ThreadEntry.__table__), entries)
    audit.add_events(session, events)
    session.execute(insert(Deadline.__table__), [
        {**row, "ticket_id": ticket.id}
        for opening, ticket in zip(openings, opened)
        for row in deadlines.rows(settings, opening.policy, None, _queued_deadlines(settings, opening, queued, now),
                                  now)])
    return {opening.report.stored.id: ticket for opening, ticket in zip(openings, opened)}


def _automatic_mails_sent(session: Session, settings: Settings, incomings: list[route.Incoming],
                          now: datetime) -> Counter[str]:
    """How many automatic mails went to each of *incomings*' senders within the rate limit's window,
    by lowercased address."""
    window_start = now - timedelta(seconds=settings.autoreply.window)
    return outbox.automatic_mail_counts(session, [i.mail_from for i in incomings if i.mail_from], window_start)


def _prepare_openings(settings: Settings, reports: list[NewReport], references: list[str], sent: Counter[str],
                      now: datetime, reply_secret: bytes, keys: dict[str, str]) -> list[Opening]:
    """The tickets *reports* open, under *references*, with their automatic replies rendered unless
    loop safety or the rate limit forbid them. *sent* is :func:`_automatic_mails_sent` for the reports;
    each reply made here counts against the limit of the reports after it, as if they had been
    opened one by one. Mail goes encrypted to the OpenPGP *keys* (see :func:`_reply_keys`)."""
    config = routing_config(settings)
    sent = Counter(sent)
    openings = []
    for report, reference in zip(reports, references, strict=True):
        stored = report.stored
        address = intake_address(settings, stored.rcpt_tos)
        # The first recipient decides: a +tag mapped to a policy is more specific than the base address.
        policy = settings.policy_for(stored.rcpt_tos[0] if stored.rcpt_tos else address)
        refusal = HISTORY_REFUSAL if stored.history else (
            report.no_reply or _automatic_reply_refusal(settings, config, report.incoming, sent))
        computed = promises.initial_deadlines(settings, policy, report.received_at,
                                              acknowledged_at=None if refusal else now)
        opening = Opening(report, reference, address, policy, refusal, None, computed, report.credit,
                          language=report_language(settings, report.incoming.mail))
        if refusal is None:
            opening = replace(opening, reply=_automatic_reply(settings, opening, now, _reply_keys(report, keys)))
            sent[stored.mail_from.lower()] += 1
        if settings.scheduler.new_ticket_notice and settings.notice_recipients and not stored.history:
            opening = replace(opening, notices=_new_ticket_notices(settings, opening, now, reply_secret, keys))
        openings.append(opening)
    return openings


def report_language(settings: Settings, mail: ParsedMail) -> str:
    """The offered language the report asks to be answered in (its Content-Language, its text
    part's, else its Accept-Language); English when it names none we offer."""
    return language_tags.choose(settings.intake.languages,
                                content=mail.headers.get(CONTENT_LANGUAGE_HEADER.lower(), ""),
                                part_content=mail.body_language,
                                accept=mail.headers.get(ACCEPT_LANGUAGE_HEADER.lower(), ""))


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


def _reply_keys(report: NewReport, keys: dict[str, str]) -> dict[str, str]:
    """The key the automatic reply to *report* is encrypted to: one on file for its sender, else,
    when the report came encrypted and was decrypted, the newest key it carries (a key sent in
    clear is kept for later mail, but the reply to a report sent in clear goes in clear)."""
    address = report.stored.mail_from.lower()
    mail = report.incoming.mail
    if address in keys:
        return {address: keys[address]}
    if mail.pgp is not None and mail.pgp.decrypted and mail.public_keys:
        return {address: mail.public_keys[-1]}
    return {}


def _automatic_reply(settings: Settings, opening: Opening, now: datetime,
                     keys: dict[str, str]) -> composer.OutgoingMail:
    """The acknowledgement of a new report, or the out-of-scope reply if its policy answers low-quality ones so;
    encrypted when its reporter has a key in *keys*."""
    report = opening.report
    mail = report.incoming.mail
    return promises.automatic_reply(
        settings, policy_name=opening.policy, computed=opening.deadlines,
        out_of_scope=report.low_quality and settings.policies[opening.policy].low_quality_reply == MailKind.OUT_OF_SCOPE,
        reference=opening.reference, subject=mail.subject, reporter_address=report.stored.mail_from,
        reporter_name=mail.from_name, intake_address=opening.address, in_reply_to=mail.message_id,
        references=mail.references, now=now, language=opening.language,
        encryption=reporter_keys.encryption_for(settings, keys, [report.stored.mail_from]))


def _new_ticket_notices(settings: Settings, opening: Opening, now: datetime, reply_secret: bytes,
                        keys: dict[str, str]) -> tuple[composer.OutgoingMail, ...]:
    """Tell the maintainers about a new ticket: the report's text (unless
    ``notices_include_report`` is off), sender, decision and SLA dates; one mail each, replying
    to their own reply address for the ticket, encrypted to their key if they have one."""
    report = opening.report
    mail, stored = report.incoming.mail, report.stored
    subject = composer.strip_reply_prefixes(clean_text(mail.subject)) or "(no subject)"
    sender = clean_text(f"{mail.from_name} <{stored.mail_from or mail.from_address}>" if mail.from_name
                        else stored.mail_from or mail.from_address)
    context = dict(
        reference=opening.reference, subject=subject, sender=sender,
        received=f"{report.received_at:%Y-%m-%d %H:%M:%S} UTC", intake_address=opening.address,
        decision=report.decision.kind, reason=report.decision.reason, policy=opening.policy,
        acknowledgement=(f"{opening.reply.kind} queued to {stored.mail_from}" if opening.reply
                         else f"none ({opening.refusal})"),
        labels=[LOW_QUALITY_LABEL] if report.low_quality else [], warnings=mail.warnings,
        deadlines=stage_dates(settings, opening.policy, opening.deadlines),
        attachments=[a.as_dict() for a in mail.attachments],
        include_report=settings.scheduler.notices_include_report,
        text=mail.body_text[:NOTICE_TEXT_LIMIT] if settings.scheduler.notices_include_report else "",
        truncated=len(mail.body_text) > NOTICE_TEXT_LIMIT, from_name=settings.intake.from_name)
    notices = []
    for recipient in settings.notice_recipients:
        reply_address = reply_tokens.reply_to(settings, reply_secret, opening.address, opening.reference, recipient,
                                              now)
        notices.append(composer.notice(
            MailKind.NEW_TICKET, dedupe_key=f"new:{opening.reference}>{recipient.lower()}",
            ticket=opening.reference,
            subject=f"[{opening.reference}] New report: {subject}", recipients=[recipient],
            sender=(settings.intake.from_name, opening.address), reply_to=reply_address,
            text=composer.render("new-ticket.txt.j2", settings.templates_path, reply_address=reply_address, **context),
            message_id_domain=settings.intake.message_id_domain, now=now,
            encryption=reporter_keys.encryption_for(settings, keys, [recipient])))
    return tuple(notices)


def stage_dates(settings: Settings, policy_name: str,
                computed: list[tuple[StageDeadline, datetime | None]]) -> list[composer.PromisedDate]:
    """Every dated stage of a new ticket (from its *computed* deadlines), in the policy's own time
    zone, as the maintainers' new-ticket notice lists them (the reporter's acknowledgement states
    only :func:`intake.tickets.promises.promised_dates`)."""
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


def _queued_deadlines(settings: Settings, opening: Opening, queued: set[str],
                      now: datetime) -> list[tuple[StageDeadline, datetime | None]]:
    """The opening's deadlines, unless they counted an automatic reply that turned out to be queued
    already (by another processor: its dedupe key was taken), which this ticket did not send."""
    if opening.reply is None or opening.reply.dedupe_key in queued:
        return opening.deadlines
    return promises.initial_deadlines(settings, opening.policy, opening.report.received_at, acknowledged_at=None)


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
        labels=[LOW_QUALITY_LABEL] if report.low_quality else [],
        links=[{"kind": LinkKind.MENTIONS, "reference": r} for r in report.decision.mentions],
        quality=report.quality,
        credit=opening.credit.as_dict() if opening.credit else None,
        received_at=report.received_at,
        created_at=now,
        updated_at=now,
        imported_at=now if report.stored.history else None,
        language=opening.language,
    )


def _opening_events(opening: Opening, ticket_id: int, now: datetime) -> list[dict[str, Any]]:
    report = opening.report
    events = [event(ticket_id, EventKind.OPENED, now, decision=report.decision.kind, inbound_id=report.stored.id,
                    message_id=report.incoming.mail.message_id, policy=opening.policy)]
    events += [event(ticket_id, EventKind.LINKED, now, link=LinkKind.MENTIONS, reference=mentioned)
               for mentioned in report.decision.mentions]
    if report.low_quality:
        events.append(event(ticket_id, EventKind.LABELLED, now, label=LOW_QUALITY_LABEL, score=report.quality.get("score"),
                            matched=report.quality.get("matched")))
    if opening.credit:
        events.append(event(ticket_id, EventKind.CREDIT_SET, now, **credit.event_detail(opening.credit)))
    return events


def _automatic_entry(opening: Opening, ticket: OpenedTicket, reply: composer.OutgoingMail,
                     now: datetime) -> dict[str, Any]:
    """The thread entry of an automatic reply to a new report."""
    return dict(
        ticket_id=ticket.id,
        inbound_id=None,
        direction=Direction.OUT,
        kind=EntryKind.AUTOMATIC,
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
        pgp=None,
        created_at=now,
    )


def intake_address(settings: Settings, rcpt_tos: list[str]) -> str:
    """The configured address the mail came in on (its +tag removed)."""
    ours = (settings.our_address(recipient) for recipient in rcpt_tos)
    return next((address for address in ours if address), settings.smtp.addresses[0])
