"""Triage: assign, severity with CVSS, labels, close and reopen, merging duplicates.

Each function changes one ticket (two for a merge) in the caller's transaction, records an event
with the actor, refreshes the stored deadlines where they can move, and raises
:class:`intake.tickets.milestones.Refused` with the reason when the change is not allowed. The CLI and
maintainers' mail commands (:mod:`intake.tickets.maintainer_mail`) call these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cvss import CVSS3, CVSS4
from cvss.exceptions import CVSSError
from sqlalchemy import delete, update
from sqlmodel import Session

from intake import language_tags
from intake.config.settings import Settings
from intake.send import composer
from intake.sla import deadlines
from intake.store.models import Deadline, InboundMessage, Outbox, ThreadEntry, Ticket
from intake.tickets import correspondence, milestones, records
from intake.tickets.milestones import Refused
from intake.vocabulary import (
    CLOSE_REASONS, FINISHED_STATES, SEVERITIES, CloseReason, EventKind, LinkKind, MailKind, Milestone, TicketState,
)


_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
_CVSS_PREFIXES = {"CVSS:3.0/": CVSS3, "CVSS:3.1/": CVSS3, "CVSS:4.0/": CVSS4}


def assign(session: Session, settings: Settings, ticket: Ticket, who: str, *, now: datetime, actor: str) -> str:
    """Assign *ticket* to the maintainer *who* names (email, name or login); returns their email."""
    maintainer = settings.find_maintainer(who)
    if maintainer is None:
        known = ", ".join(f"{m.name} <{m.email}>" for m in settings.maintainers) or "none configured"
        raise Refused(f"{who!r} is not a maintainer (known: {known}); add them under [[maintainers]]")
    if ticket.assignee != maintainer.email:
        records.add_event(session, ticket.id, EventKind.ASSIGNED, now, actor=actor, **{"from": ticket.assignee,
                                                                              "to": maintainer.email})
        ticket.assignee = maintainer.email
        ticket.updated_at = now
    return maintainer.email


def set_language(session: Session, settings: Settings, ticket: Ticket, tag: str, *, now: datetime,
                 actor: str) -> str:
    """Write *ticket*'s later mail to its reporter in *tag* (one of ``[intake] languages``,
    looked up as a report's is: de-AT finds de); returns the language set."""
    parsed = language_tags.parse(tag)
    found = language_tags.lookup([parsed], settings.intake.languages) if parsed else None
    if found is None:
        raise Refused(f"{tag!r} is not an offered language (intake.languages: {', '.join(settings.intake.languages)})")
    if ticket.language != found:
        records.add_event(session, ticket.id, EventKind.LANGUAGE_CHANGED, now, actor=actor,
                          **{"from": ticket.language, "to": found})
        ticket.language = found
        ticket.updated_at = now
    return found


@dataclass(frozen=True)
class CvssScore:
    vector: str
    score: float
    rating: str  # critical, high, medium, low, none


def score_cvss(vector: str) -> CvssScore:
    """Validate a CVSS v3.0/v3.1/v4.0 vector and compute its base score and rating."""
    text = vector.strip()
    version = next((cls for prefix, cls in _CVSS_PREFIXES.items() if text.startswith(prefix)), None)
    if version is None:
        raise Refused(f"not a CVSS v3.x or v4.0 vector: {vector!r} (it starts CVSS:3.1/ or CVSS:4.0/)")
    try:
        parsed = version(text)
    except CVSSError as exc:
        raise Refused(f"invalid CVSS vector {vector!r}: {exc}") from None
    if version is CVSS3:
        return CvssScore(parsed.clean_vector(), float(parsed.base_score), parsed.severities()[0].lower())
    return CvssScore(parsed.clean_vector(), float(parsed.base_score), parsed.severity.lower())


def set_severity(session: Session, settings: Settings, ticket: Ticket, severity: str, *, now: datetime, actor: str,
                 cvss_vector: str | None = None) -> tuple[list[deadlines.Change], str | None]:
    """Set the severity (and CVSS vector); returns the deadlines that moved and a warning when the
    severity given differs from the vector's own rating."""
    if severity not in SEVERITIES:
        raise Refused(f"unknown severity {severity!r}: use one of {', '.join(SEVERITIES)}")
    scored = score_cvss(cvss_vector) if cvss_vector else None
    milestones.set_severity(session, ticket, severity, now, actor,
                            cvss=(scored.vector, scored.score) if scored else None)
    warning = None
    if scored and scored.rating != severity:
        warning = f"the CVSS base score {scored.score} rates {scored.rating}, not {severity}"
    return deadlines.refresh(session, settings, ticket, now), warning


def label(session: Session, ticket: Ticket, add: tuple[str, ...], remove: tuple[str, ...], *, now: datetime,
          actor: str) -> list[str]:
    """Add and remove labels; returns the ticket's labels."""
    for name in (*add, *remove):
        if not _LABEL.fullmatch(name):
            raise Refused(f"invalid label {name!r}: lowercase letters, digits, '.', '_', '-'; at most 40")
    labels = [existing for existing in ticket.labels if existing not in remove]
    labels += [name for name in dict.fromkeys(add) if name not in labels]
    if labels != ticket.labels:
        records.add_event(session, ticket.id, EventKind.LABELLED, now, actor=actor,
                          added=[n for n in add if n not in ticket.labels],
                          removed=[n for n in remove if n in ticket.labels])
        ticket.labels = labels
        ticket.updated_at = now
    return labels


def close(session: Session, settings: Settings, ticket: Ticket, reason: str, *, now: datetime, actor: str,
          force: bool = False) -> list[deadlines.Change]:
    """Close *ticket* for *reason*; it counts as resolved. ``fixed`` wants a recorded release."""
    if reason not in CLOSE_REASONS:
        raise Refused(f"unknown reason {reason!r}: use one of {', '.join(CLOSE_REASONS)}")
    if ticket.state == TicketState.CLOSED:
        raise Refused(f"{ticket.reference} is already closed ({ticket.close_reason})")
    if reason == CloseReason.FIXED and not force \
            and not milestones.reached(session, settings, ticket, Milestone.RELEASED):
        raise Refused(f"{ticket.reference} has no release recorded: `intake released` first, or use --force")
    if not milestones.reached(session, settings, ticket, Milestone.RESOLVED):
        # Closing is the maintainer's decision, whatever milestones came before.
        milestones.record(session, settings, ticket, Milestone.RESOLVED, at=now, now=now, actor=actor, force=True,
                          advance=False, via=f"close {reason}")
    records.change_state(session, ticket, TicketState.CLOSED, now, actor=actor, why=f"closed: {reason}")
    ticket.close_reason = reason
    return deadlines.refresh(session, settings, ticket, now)


def reopen(session: Session, settings: Settings, ticket: Ticket, *, now: datetime, actor: str) -> list[deadlines.Change]:
    """Reopen a closed or resolved ticket: back to the state it had before, not resolved any more."""
    if ticket.state not in FINISHED_STATES:
        raise Refused(f"{ticket.reference} is not closed or resolved (state {ticket.state})")
    records.add_event(session, ticket.id, EventKind.REOPENED, now, actor=actor, close_reason=ticket.close_reason)
    records.leave_waiting(session, ticket, now, actor=actor, why="reopened")
    if ticket.state in FINISHED_STATES:  # it was resolved, then closed: go back before both
        records.change_state(session, ticket, Milestone.ASSESSED, now, actor=actor, why="reopened")
    ticket.close_reason = None
    return deadlines.refresh(session, settings, ticket, now)


def merge(session: Session, settings: Settings, duplicate: Ticket, into: Ticket, *, now: datetime,
          actor: str) -> None:
    """Merge *duplicate* into *into*: its thread, messages and mail move over, *into* keeps the
    earlier receipt (the stricter promise), the duplicate's reporter is told, and the duplicate is
    closed as ``duplicate`` with a link both ways."""
    if duplicate.id == into.id:
        raise Refused("a ticket cannot be merged into itself")
    for ticket in (duplicate, into):
        if ticket.state == TicketState.CLOSED:
            raise Refused(f"{ticket.reference} is closed; reopen it first")
    # Told first, on its own thread, so the notice moves over with the rest and replies to it
    # land in the merged ticket.
    correspondence.mail_reporter(session, settings, duplicate, composer.render(
        "duplicate.txt.j2", settings.templates_path, settings.language_for(duplicate.language),
        reference=duplicate.reference, into=into.reference, from_name=settings.intake.from_name),
        kind=MailKind.DUPLICATE_NOTICE, now=now, actor=actor, language=settings.language_for(duplicate.language))
    for table in (ThreadEntry.__table__, InboundMessage.__table__, Outbox.__table__):
        session.execute(update(table).where(table.c.ticket_id == duplicate.id).values(ticket_id=into.id))
    if duplicate.received_at < into.received_at:
        records.add_event(session, into.id, EventKind.RECEIVED_AT_CHANGED, now, actor=actor,
                          **{"from": into.received_at.isoformat(), "to": duplicate.received_at.isoformat(),
                             "why": f"merged {duplicate.reference}, received earlier"})
        into.received_at = duplicate.received_at
    into.links = [*into.links, {"kind": LinkKind.DUPLICATE, "reference": duplicate.reference}]
    duplicate.links = [*duplicate.links, {"kind": LinkKind.DUPLICATE_OF, "reference": into.reference}]
    records.add_event(session, into.id, EventKind.MERGED, now, actor=actor, duplicate=duplicate.reference)
    records.add_event(session, duplicate.id, EventKind.MERGED_INTO, now, actor=actor, into=into.reference)
    records.change_state(session, duplicate, TicketState.CLOSED, now, actor=actor, why=f"duplicate of {into.reference}")
    duplicate.close_reason = CloseReason.DUPLICATE
    into.updated_at = duplicate.updated_at = now
    # The duplicate's promises are the merged ticket's now.
    session.execute(delete(Deadline).where(Deadline.ticket_id == duplicate.id))
    session.flush()
    deadlines.refresh(session, settings, into, now)
