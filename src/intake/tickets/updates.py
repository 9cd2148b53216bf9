"""Progress updates to the reporter: assessed, fix released, disclosure scheduled, disclosed, closed.

Each is the template ``update-<kind>.txt.j2``, sent once per ticket and kind (the outbox dedupe key
``update:<reference>:<kind>``; "disclosure scheduled" once per date, ``…:disclosure-scheduled:<date>``,
so a moved date is announced again) as a mail from the intake address threaded under the reporter's mail
(:func:`intake.tickets.correspondence.mail_reporter`: encrypted where the reporter has a key). An
update its policy leaves out (``[policies.X] updates``), one a maintainer suppresses (``--quiet``),
one to an unreachable reporter, one that went already, or a "closed" for spam is not sent: an
``update-suppressed`` event says why. The functions below record a milestone or close a ticket
(:mod:`intake.tickets.milestones`, :mod:`intake.tickets.triage`) and then send its update, in the
caller's transaction; the CLI and the maintainers' mail commands call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.language_tags import ENGLISH
from intake.send import composer, localised
from intake.sla import deadlines
from intake.store.models import DisclosurePlan, Outbox, Ticket
from intake.tickets import correspondence, milestones, records, triage
from intake.understand.header_text import clean_text
from intake.vocabulary import CloseReason, EventKind, MailKind, Milestone, UpdateKind

# The policy stage whose due date the "disclosure scheduled" update gives.
DISCLOSE_STAGE = "disclose"


@dataclass(frozen=True)
class UpdateChoice:
    """What the maintainer asked of the update a change causes: none (*quiet*), or a personal line."""

    quiet: bool = False
    message: str | None = None


SEND = UpdateChoice()


def dedupe_key(ticket: Ticket, kind: str, variant: str | None = None) -> str:
    return f"update:{ticket.reference}:{kind}" + (f":{variant}" if variant else "")


def _already_queued(session: Session, key: str) -> bool:
    """Whether mail with dedupe *key* was ever queued (sent, pending or given up)."""
    return session.scalar(select(Outbox.id).where(Outbox.dedupe_key == key).limit(1)) is not None


def _suppressed_because(session: Session, settings: Settings, ticket: Ticket, kind: str,
                        choice: UpdateChoice, variant: str | None) -> str | None:
    """Why *kind* is not sent to *ticket*'s reporter now, or None when it is."""
    policy = settings.policies.get(ticket.policy)
    if policy is not None and kind not in policy.updates:
        return f"policy {ticket.policy} sends no {kind} update"
    if choice.quiet:
        return "--quiet"
    if ticket.reporter_unreachable_at is not None:
        return "reporter unreachable"
    if kind == UpdateKind.CLOSED and ticket.close_reason == CloseReason.SPAM:
        return "closed as spam"
    if _already_queued(session, dedupe_key(ticket, kind, variant)):
        return "already sent"
    return None


def send(session: Session, settings: Settings, ticket: Ticket, kind: str, *, now: datetime, actor: str,
         choice: UpdateChoice = SEND, variant: str | None = None, **facts: object) -> composer.OutgoingMail | None:
    """Send update *kind* (its template filled with *facts*) to *ticket*'s reporter, once per
    *variant* (the date a disclosure is scheduled for), or record why not; the mail queued, or None."""
    reason = _suppressed_because(session, settings, ticket, kind, choice, variant)
    if reason:
        records.add_event(session, ticket.id, EventKind.UPDATE_SUPPRESSED, now, actor=actor, update=kind,
                          reason=reason)
        return None
    policy = settings.policies.get(ticket.policy)
    body = composer.render(
        f"update-{kind}.txt.j2", settings.templates_path, settings.language_for(ticket.language),
        reference=ticket.reference, subject=clean_text(ticket.subject), message=(choice.message or "").strip(),
        policy=policy.public_title if policy else "", from_name=settings.intake.from_name,
        intake_address=ticket.intake_address, **facts)
    return correspondence.mail_reporter(session, settings, ticket, body, kind=MailKind.PROGRESS_UPDATE, now=now,
                                        actor=actor, dedupe_key=dedupe_key(ticket, kind, variant),
                                        detail={"update": kind, **({"for": variant} if variant else {})},
                                        language=settings.language_for(ticket.language))


def assess(session: Session, settings: Settings, ticket: Ticket, severity: str, *, at: datetime, now: datetime,
           actor: str, force: bool = False, choice: UpdateChoice = SEND) -> list[deadlines.Change]:
    """Record the assessment (:func:`intake.tickets.milestones.assess`) and tell the reporter its severity."""
    moved = milestones.assess(session, settings, ticket, severity, at=at, now=now, actor=actor, force=force)
    send(session, settings, ticket, UpdateKind.ASSESSED, now=now, actor=actor, choice=choice, severity=severity)
    return moved


def released(session: Session, settings: Settings, ticket: Ticket, *, at: datetime, now: datetime, actor: str,
             version: str | None = None, force: bool = False, choice: UpdateChoice = SEND) -> list[deadlines.Change]:
    """Record the patched release and tell the reporter (with *version*), and, where the policy's
    disclose stage now has a date, when disclosure is planned."""
    moved = milestones.record(session, settings, ticket, Milestone.RELEASED, at=at, now=now, actor=actor,
                              force=force, version=version)
    send(session, settings, ticket, UpdateKind.FIX_RELEASED, now=now, actor=actor, choice=choice, version=version)
    agreed = agreed_disclosure(session, ticket)
    disclose = disclosure_date(session, settings, ticket, now)
    if agreed is not None:  # coordinated with the reporter: that date, not the policy's default
        send(session, settings, ticket, UpdateKind.DISCLOSURE_SCHEDULED, now=now, actor=actor, choice=choice,
             variant=agreed.isoformat(), date=date_words(agreed, settings.language_for(ticket.language)),
             accepted=False)
    elif disclose is not None:
        send(session, settings, ticket, UpdateKind.DISCLOSURE_SCHEDULED, now=now, actor=actor, choice=choice,
             variant=disclose.due.astimezone(ZoneInfo(disclose.timezone)).date().isoformat(),
             date=disclose.due_local, accepted=False)
    return moved


def agreed_disclosure(session: Session, ticket: Ticket) -> date | None:
    """The disclosure date agreed for *ticket* (``intake disclose-date``), if any."""
    plan = session.get(DisclosurePlan, ticket.id)
    return plan.agreed_date if plan else None


def date_words(day: date, language: str = ENGLISH) -> str:
    """A calendar date as reporters read it in *language*: "Mon 01 Mar 2027"."""
    return localised.calendar_date(day, language)


def disclosure_date(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> composer.PromisedDate | None:
    """When the policy's disclose stage of *ticket* is due, in the stage's time zone; None when it
    has none (or it is met already)."""
    status = next((status for status in deadlines.stage_statuses(session, settings, ticket, now)
                   if status.stage == DISCLOSE_STAGE), None)
    if status is None or status.due_at is None or status.met_at is not None:
        return None
    calendar = deadlines.stage_calendar(settings, ticket.policy, DISCLOSE_STAGE)
    return composer.PromisedDate("disclosure", status.due_at, calendar.timezone,
                                 language=settings.language_for(ticket.language))


def disclosed(session: Session, settings: Settings, ticket: Ticket, *, at: datetime, now: datetime, actor: str,
              advisory: str | None = None, force: bool = False,
              choice: UpdateChoice = SEND) -> list[deadlines.Change]:
    """Record the disclosure and tell the reporter where the *advisory* (id or URL) is."""
    moved = milestones.record(session, settings, ticket, Milestone.DISCLOSED, at=at, now=now, actor=actor,
                              force=force, advisory=advisory)
    send(session, settings, ticket, UpdateKind.DISCLOSED, now=now, actor=actor, choice=choice, advisory=advisory)
    return moved


def close(session: Session, settings: Settings, ticket: Ticket, reason: str, *, now: datetime, actor: str,
          force: bool = False, choice: UpdateChoice = SEND) -> list[deadlines.Change]:
    """Close the ticket (:func:`intake.tickets.triage.close`) and tell the reporter why, in plain words."""
    moved = triage.close(session, settings, ticket, reason, now=now, actor=actor, force=force)
    send(session, settings, ticket, UpdateKind.CLOSED, now=now, actor=actor, choice=choice, reason=reason)
    return moved
