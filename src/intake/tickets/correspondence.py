"""Mail maintainers send to a reporter, and internal notes that never leave.

A reply goes out from the ticket's intake address (never a maintainer's own) to the reporter, as
``Re: [SEC-2026-0001] <subject>`` threaded under the reporter's latest message, and is queued in
the outbox in the caller's transaction. It is recorded as correspondence on the ticket and, where
the ticket has no human acknowledgement yet, counts as one (see :mod:`intake.tickets.milestones`).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import insert, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.store import sealing
from intake.store.models import ThreadEntry, Ticket
from intake.tickets import milestones, records, reporter_keys
from intake.understand.header_text import clean_text
from intake.vocabulary import QUEUED_EVENT, REPORTER_REPLY, Direction, EntryKind, EventKind, MailKind, Milestone

# Thread entries that are the reporter's own mail: what a reply is threaded under.
REPORTER_KINDS = (EntryKind.REPORT, REPORTER_REPLY)


class EmptyMessage(ValueError):
    """Nothing to send: the text is empty once trimmed."""


def _check_body(body: str) -> str:
    text = body.strip("\n")
    if not text.strip():
        raise EmptyMessage("the message is empty: nothing sent")
    return text + "\n"


def _latest_from_reporter(session: Session, ticket: Ticket) -> ThreadEntry | None:
    return session.scalars(
        # The reporter's own mail only: a maintainer's Message-ID would name their domain.
        select(ThreadEntry).where(ThreadEntry.ticket_id == ticket.id, ThreadEntry.kind.in_(REPORTER_KINDS),
                                  ThreadEntry.message_id.is_not(None))
        .order_by(ThreadEntry.created_at.desc(), ThreadEntry.id.desc())
    ).first()


def mail_reporter(session: Session, settings: Settings, ticket: Ticket, body: str, *, kind: str, now: datetime,
                  actor: str, cc: tuple[str, ...] = (), attachments: tuple[composer.Attachment, ...] = (),
                  dedupe_key: str | None = None, detail: dict[str, object] | None = None,
                  language: str | None = None) -> composer.OutgoingMail:
    """Queue *body* to *ticket*'s reporter (and *cc*) from the intake address, threaded; record it
    (with *detail* in its event). A *body* rendered from a template names its *language*. Encrypted when every recipient has an OpenPGP key (see
    :mod:`intake.tickets.reporter_keys`). With a *dedupe_key* the caller has checked it is not
    queued yet (:func:`intake.send.outbox.is_queued`)."""
    text = _check_body(body)
    subject = f"Re: [{ticket.reference}] {clean_text(ticket.subject)}"
    parent = _latest_from_reporter(session, ticket)
    # A person's words: not automatic mail, so it goes from the intake address and bounces come back.
    mail = composer.compose(
        kind, sender=(settings.intake.from_name, ticket.intake_address), to=[ticket.reporter], cc=cc,
        subject=subject, text=text, attachments=attachments,
        ticket=ticket.reference, message_id_domain=settings.intake.message_id_domain, now=now, dedupe_key=dedupe_key,
        in_reply_to=parent.message_id if parent else None, references=parent.references if parent else (),
        encryption=reporter_keys.encryption_to(session, settings, [ticket.reporter, *cc]), language=language)
    outbox.enqueue(session, mail, ticket_id=ticket.id, now=now)
    session.execute(insert(ThreadEntry.__table__).values(
        ticket_id=ticket.id, direction=Direction.OUT, kind=kind, message_id=mail.message_id,
        in_reply_to=parent.message_id if parent else None, references=[], sender=ticket.intake_address,
        subject=subject, body_text=sealing.seal_for_ticket(session, ticket.id, now, "thread_entry", "body_text", text),
        warnings=[], created_at=now,
        attachments=[{"index": n, "filename": a.filename, "original_filename": a.filename,
                      "content_type": a.content_type, "size": len(a.data), "sha256": hashlib.sha256(a.data).hexdigest()}
                     for n, a in enumerate(attachments, start=1)]))
    records.add_event(session, ticket.id, QUEUED_EVENT[kind], now, actor=actor, to=ticket.reporter, cc=list(cc),
                      message_id=mail.message_id, **(detail or {}))
    ticket.updated_at = now
    return mail


def reply(session: Session, settings: Settings, ticket: Ticket, body: str, *, now: datetime, actor: str,
          cc: tuple[str, ...] = (), attachments: tuple[composer.Attachment, ...] = ()) -> composer.OutgoingMail:
    """A maintainer's reply to the reporter; the ticket's first counts as its human acknowledgement."""
    mail = mail_reporter(session, settings, ticket, body, kind=MailKind.CORRESPONDENCE, now=now, actor=actor, cc=cc,
                         attachments=attachments)
    if not milestones.reached(session, settings, ticket, Milestone.ACKNOWLEDGED):
        milestones.record(session, settings, ticket, Milestone.ACKNOWLEDGED, at=now, now=now, actor=actor, via="reply")
    return mail


def note(session: Session, ticket: Ticket, body: str, *, now: datetime, actor: str) -> None:
    """An internal note on the ticket: shown to maintainers, never sent."""
    text = _check_body(body)
    session.execute(insert(ThreadEntry.__table__).values(
        ticket_id=ticket.id, direction=Direction.INTERNAL, kind=EntryKind.NOTE, references=[], sender=actor, subject="",
        body_text=sealing.seal_for_ticket(session, ticket.id, now, "thread_entry", "body_text", text),
        attachments=[], warnings=[], created_at=now))
    records.add_event(session, ticket.id, EventKind.NOTE_ADDED, now, actor=actor)
    ticket.updated_at = now
