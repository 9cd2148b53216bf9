"""Status on request: a reporter who writes "status" to their ticket gets an automatic answer.

A reporter's reply (routing already said it is theirs: envelope sender and From: their address,
authenticated where their domain publishes DMARC) whose subject, once ``Re:`` and ``[tags]`` are
stripped, or whose first non-empty line is the one word "status" asks for it (:func:`is_request`;
prose that mentions the status is not a request). The answer states the ticket's state in plain
words and the next date we promised: the earliest unmet stage the sweep reminds maintainers of,
in its calendar's zone. It is automatic mail (RFC 3834, null sender, counted against the
reporter's limit on automatic mail, as the acknowledgement is), threaded, encrypted when the
reporter has a key on file, and recorded in the thread and as an event.

No answer goes to an unreachable reporter, to mail loop safety forbids answering, nor twice per
ticket within :data:`STATUS_WINDOW`: the window is read from the ticket's events and the outbox's
dedupe key (one per ticket and UTC day) holds it against another node answering at the same
moment. A request left unanswered is recorded with the reason. Maintainers see the request either
way: it is forwarded to them like any reply of the reporter's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import insert, select
from sqlmodel import Session

from intake import patterns
from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines
from intake.store import sealing
from intake.store.models import Deadline, Event, ThreadEntry, Ticket
from intake.tickets import records, reporter_keys
from intake.understand import route
from intake.understand.header_text import clean_text
from intake.understand.lookups import routing_config
from intake.vocabulary import (
    FINISHED_STATES, MILESTONE_SPEC, QUEUED_EVENT, CloseReason, Direction, EventKind, MailKind, Milestone, TicketState,
)

# At most one status reply per ticket within this span; later requests in it are only recorded.
STATUS_WINDOW = timedelta(hours=24)

_REQUEST_WORD = "status"
_TAGS = patterns.compile(r"\[[^\]]*\]")  # [SEC-2026-0001], [External], ...: not what the reporter wrote
_TRAILING_MARKS = ".?!: "

# A ticket's state as a reporter reads it.
_STATE_WORDS = {
    TicketState.NEW: "received; our team has not assessed it yet",
    Milestone.ACKNOWLEDGED: "acknowledged by our team; we are assessing it",
    Milestone.ASSESSED: "assessed{severity}; we are working on a fix",
    Milestone.RELEASED: "fixed: a release with the fix is out",
    Milestone.RESOLVED: "resolved: our work on it is finished",
    Milestone.DISCLOSED: "fixed and publicly disclosed",
    TicketState.WAITING: "waiting for an answer from you to our last question",
}
_CLOSE_WORDS = {
    CloseReason.FIXED: "closed: fixed",
    CloseReason.INVALID: "closed: we found it is not a vulnerability",
    CloseReason.DUPLICATE: "closed: a duplicate of an earlier report",
    CloseReason.OUT_OF_SCOPE: "closed: out of scope of our security policy",
}


def is_request(subject: str, text: str) -> bool:
    """Whether a reporter's mail asks for the status: its subject without reply prefixes and
    bracketed tags, or its first non-empty line, is the word "status" alone (a trailing ``?`` or
    ``.`` allowed). Conservative: a sentence about the status is a reply for a person."""
    bare_subject = _TAGS.sub(" ", composer.strip_reply_prefixes(subject))
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    return any(_is_the_word(candidate) for candidate in (bare_subject, first_line))


def _is_the_word(text: str) -> bool:
    return text.strip().rstrip(_TRAILING_MARKS).strip().lower() == _REQUEST_WORD


def state_words(ticket: Ticket) -> str:
    """*ticket*'s state in plain words, as the status reply gives it."""
    if ticket.state == TicketState.CLOSED:
        return _CLOSE_WORDS.get(ticket.close_reason or "", "no longer open")
    severity = f" (severity {ticket.severity})" if ticket.severity else ""
    return _STATE_WORDS.get(ticket.state, ticket.state).format(severity=severity)


def next_promised(session: Session, settings: Settings, ticket: Ticket) -> composer.PromisedDate | None:
    """The next date we promised the reporter: the earliest unmet stage with a due date that the
    sweep reminds maintainers of (a stored ``notify_at``), in its calendar's zone; None when none
    is (finished, waiting, or a policy no longer configured)."""
    if ticket.state in FINISHED_STATES or ticket.policy not in settings.policies:
        return None
    row = session.scalars(select(Deadline).where(
        Deadline.ticket_id == ticket.id, Deadline.met_at.is_(None), Deadline.due_at.is_not(None),
        Deadline.notify_at.is_not(None)).order_by(Deadline.due_at, Deadline.position)).first()
    if row is None or row.due_at is None:
        return None
    policy = settings.policies[ticket.policy]
    stage = next((stage for stage in policy.stages if stage.name == row.stage), None)
    label = MILESTONE_SPEC[stage.milestone].stage_label if stage and stage.milestone else row.stage
    zone = deadlines.stage_calendar(settings, ticket.policy, row.stage).timezone
    return composer.PromisedDate(label, row.due_at, zone, milestone=stage.milestone if stage else None,
                                 language=settings.language_for(ticket.language))


def refusal(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming,
            now: datetime) -> str | None:
    """Why the reporter's status request gets no answer now, or None."""
    unanswerable = _unanswerable(settings, ticket, incoming)
    if unanswerable:
        return unanswerable
    answered = session.scalars(select(Event.at).where(
        Event.ticket_id == ticket.id, Event.kind == QUEUED_EVENT[MailKind.STATUS_REPLY],
        Event.at > now - STATUS_WINDOW).order_by(Event.at.desc())).first()
    if answered is not None:
        return f"answered already at {answered:%Y-%m-%d %H:%M} UTC: one status reply per {STATUS_WINDOW}"
    return _rate_limited(session, settings, ticket, now)


def automatic_refusal(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming,
                      now: datetime) -> str | None:
    """Why the reporter's mail *incoming* gets no automatic answer of any kind now (unreachable,
    loop safety, the rate limit on automatic mail), or None."""
    return _unanswerable(settings, ticket, incoming) or _rate_limited(session, settings, ticket, now)


def _unanswerable(settings: Settings, ticket: Ticket, incoming: route.Incoming) -> str | None:
    if ticket.reporter_unreachable_at is not None:
        return f"the reporter is unreachable (since {ticket.reporter_unreachable_at:%Y-%m-%d %H:%M} UTC)"
    suppressed = route.auto_reply_suppressed(incoming, routing_config(settings))
    return f"loop safety: {suppressed}" if suppressed else None


def _rate_limited(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> str | None:
    count = outbox.automatic_mail_counts(session, [ticket.reporter],
                                         now - timedelta(seconds=settings.autoreply.window))[ticket.reporter.lower()]
    if count >= settings.autoreply.limit_per_recipient:
        return (f"rate limit: {count} automatic mails to {ticket.reporter} in the last "
                f"{settings.autoreply.window / 3600:g} h")
    return None


def answer(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming, now: datetime) -> bool:
    """Answer the reporter's status request *incoming* on *ticket* (already recorded in its thread)
    unless :func:`refusal` forbids it; either way record what happened. True when a reply was queued."""
    why_not = refusal(session, settings, ticket, incoming, now)
    if why_not is None:
        text = composer.render("status.txt.j2", settings.templates_path, settings.language_for(ticket.language),
                               **_context(session, settings, ticket))
        mail = _status_mail(session, settings, ticket, incoming, text, now)
        if outbox.enqueue(session, mail, ticket_id=ticket.id, now=now):
            record_automatic_reply(session, ticket, incoming, mail, text, now)
            return True
        why_not = "answered already today by another node (the outbox's dedupe key)"
    records.add_event(session, ticket.id, EventKind.STATUS_REQUEST_UNANSWERED, now,
                      message_id=incoming.mail.message_id, reason=why_not)
    return False


def record_automatic_reply(session: Session, ticket: Ticket, incoming: route.Incoming, mail: composer.OutgoingMail,
                           text: str, now: datetime, **detail: object) -> None:
    """A queued automatic answer to *incoming* (the status reply, or another of its kind) in the
    ticket's thread (its text sealed) and as an event (with *detail*)."""
    session.execute(insert(ThreadEntry.__table__).values(
        ticket_id=ticket.id, direction=Direction.OUT, kind=mail.kind, message_id=mail.message_id,
        in_reply_to=incoming.mail.message_id or None, references=[], sender=ticket.intake_address,
        subject=reply_subject(ticket), attachments=[], warnings=[], created_at=now,
        body_text=sealing.seal_for_ticket(session, ticket.id, now, "thread_entry", "body_text", text)))
    records.add_event(session, ticket.id, QUEUED_EVENT[mail.kind], now, to=ticket.reporter,
                      message_id=mail.message_id, **detail)


def reply_subject(ticket: Ticket) -> str:
    return f"Re: [{ticket.reference}] {composer.shorten(clean_text(ticket.subject))}"


def _context(session: Session, settings: Settings, ticket: Ticket) -> dict[str, object]:
    return dict(reference=ticket.reference, subject=composer.shorten(clean_text(ticket.subject)),
                reporter_name=clean_text(ticket.reporter_name or ""), state=state_words(ticket),
                # What state_words says, for templates in another language to word themselves.
                state_code=ticket.state, close_reason=ticket.close_reason or "", severity=ticket.severity or "",
                next_date=next_promised(session, settings, ticket),
                window_hours=int(STATUS_WINDOW.total_seconds() // 3600),
                from_name=settings.intake.from_name, intake_address=ticket.intake_address)


def _status_mail(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming, text: str,
                 now: datetime) -> composer.OutgoingMail:
    """The status reply saying *text*, one per ticket and UTC day by its dedupe key."""
    return automatic_answer(session, settings, ticket, incoming, text, now, kind=MailKind.STATUS_REPLY,
                            dedupe_key=f"status:{ticket.reference}:{now:%Y-%m-%d}")


def automatic_answer(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming, text: str,
                     now: datetime, *, kind: str, dedupe_key: str) -> composer.OutgoingMail:
    """An automatic answer of *kind* saying *text* to the reporter's mail *incoming*: auto-replied,
    null sender, rate limited, threaded under it, encrypted to the reporter's key if any."""
    return composer.compose(
        kind, sender=(settings.intake.from_name, ticket.intake_address), to=[ticket.reporter],
        subject=reply_subject(ticket), text=text, ticket=ticket.reference,
        message_id_domain=settings.intake.message_id_domain, now=now, dedupe_key=dedupe_key,
        in_reply_to=incoming.mail.message_id or None, references=incoming.mail.references,
        automatic=composer.AUTO_REPLIED, rate_limited=True,
        encryption=reporter_keys.encryption_to(session, settings, [ticket.reporter]),
        language=settings.language_for(ticket.language))
