"""Coordinated disclosure: the date a reporter proposes and the date a maintainer agrees.

The reporter proposes by mail from their own address on the ticket's thread (routing's
``reporter-reply``: envelope sender and From: theirs, authenticated where their domain publishes
DMARC), with ``#disclose 2027-03-01`` or plain words (:mod:`intake.understand.disclosure_words`).
The proposal is stored on the ticket's :class:`~intake.store.models.DisclosurePlan` and as a
``disclosure-proposed`` event; the reporter gets one short automatic acknowledgement per proposed
date (threaded, automatic mail under the same loop safety and rate limit as the status reply,
encrypted where a key is on file), and the maintainers read it in the forwarded reply. A date
someone else names in the thread is only noted (``disclosure-proposal-noted``), never taken as the
reporter's; so is a date not after the day the mail came, or one for a closed ticket.

A maintainer agrees a date (``intake disclose-date REF DATE``, or ``#disclose-date DATE`` by mail):
accepting the reporter's, or countering with another. A date before today is refused; one later
than :func:`limit` (the policy's disclose stage due date once it runs, else receipt plus
``[disclosure] max_embargo``) is refused unless forced. The reporter then gets the "disclosure
scheduled" update, once per date (:mod:`intake.tickets.updates`). The sweep's reminders 7 and 1 days
before come from :mod:`intake.sla.disclosure_reminders`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines
from intake.store.db import read_session
from intake.store.models import DisclosurePlan, Ticket
from intake.tickets import milestones, records, status_reply, updates
from intake.understand import route
from intake.understand.header_text import clean_text
from intake.vocabulary import FINISHED_STATES, EventKind, MailKind, Milestone, TicketState, UpdateKind


@dataclass(frozen=True)
class Limit:
    """The latest disclosure date a maintainer agrees without forcing it, and where it comes from."""

    latest: date
    why: str


@dataclass(frozen=True)
class Shown:
    """A ticket's disclosure dates as ``show``, notices and the digest give them."""

    agreed: date | None
    agreed_by: str | None
    agreed_at: datetime | None
    proposed: date | None
    proposed_by: str | None
    proposed_at: datetime | None
    limit: Limit | None = None  # the policy's limit for an agreed date; None for a finished ticket

    def as_dict(self) -> dict[str, object]:
        return {"disclosure_limit": self.limit.latest.isoformat() if self.limit else None,
                "disclosure_date": self.agreed.isoformat() if self.agreed else None,
                "disclosure_date_agreed_by": self.agreed_by,
                "disclosure_date_agreed_at": self.agreed_at.isoformat() if self.agreed_at else None,
                "proposed_disclosure_date": self.proposed.isoformat() if self.proposed else None,
                "disclosure_date_proposed_by": self.proposed_by,
                "disclosure_date_proposed_at": self.proposed_at.isoformat() if self.proposed_at else None}

    def line(self) -> str | None:
        """One line for maintainers, or None when no date was proposed or agreed."""
        parts = []
        if self.agreed:
            parts.append(f"agreed {self.agreed.isoformat()} (by {self.agreed_by})")
        if self.proposed and self.proposed != self.agreed:
            parts.append(f"the reporter proposes {self.proposed.isoformat()}"
                         + ("" if self.agreed else ": accept or counter with `intake disclose-date`"))
        elif self.proposed:
            parts.append("as the reporter proposed")
        return "; ".join(parts) or None


def shown(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> Shown:
    """*ticket*'s disclosure dates, and the policy's limit while it is open under a configured policy."""
    plan = session.get(DisclosurePlan, ticket.id) or DisclosurePlan(ticket_id=ticket.id)
    open_ = ticket.state not in FINISHED_STATES and ticket.policy in settings.policies
    return Shown(plan.agreed_date, plan.agreed_by, plan.agreed_at, plan.proposed_date, plan.proposed_by,
                 plan.proposed_at, limit(session, settings, ticket, now) if open_ else None)


def lines(session: Session, ticket_ids: set[int]) -> dict[int, str]:
    """The maintainers' disclosure line (:meth:`Shown.line`) of each of *ticket_ids* that has one
    (the sweep's notices)."""
    plans = session.scalars(select(DisclosurePlan).where(DisclosurePlan.ticket_id.in_(ticket_ids))) if ticket_ids else []
    shown_ = {plan.ticket_id: Shown(plan.agreed_date, plan.agreed_by, plan.agreed_at, plan.proposed_date,
                                    plan.proposed_by, plan.proposed_at).line() for plan in plans}
    return {ticket_id: line for ticket_id, line in shown_.items() if line}


def ticket_shown(engine: Engine, settings: Settings, ticket: Ticket, now: datetime) -> Shown:
    """:func:`shown`, read in a session of its own (``intake show``)."""
    with read_session(engine) as session:
        return shown(session, settings, ticket, now)


def _plan(session: Session, ticket: Ticket) -> DisclosurePlan:
    plan = session.get(DisclosurePlan, ticket.id)
    if plan is None:
        plan = DisclosurePlan(ticket_id=ticket.id)
        session.add(plan)
    return plan


def limit(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> Limit:
    """The latest date *ticket* may be disclosed on without forcing it: the policy's disclose
    stage's due date (in its zone) once that stage runs, else receipt + ``max_embargo``."""
    stage = updates.disclosure_date(session, settings, ticket, now)
    if stage is not None:
        return Limit(stage.due.astimezone(ZoneInfo(stage.timezone)).date(),
                     f"the policy's disclose stage is due {stage.due_local}")
    embargo = settings.disclosure.embargo(ticket.policy)
    return Limit((ticket.received_at + embargo).date(),
                 f"{embargo.days} days after the report was received ({ticket.received_at:%Y-%m-%d}), "
                 f"the limit for policy {ticket.policy}")


def noted(session: Session, ticket: Ticket, proposed: date, incoming: route.Incoming, now: datetime,
          why: str) -> None:
    """A date named in mail that is not the reporter's proposal: recorded as a note only."""
    records.add_event(session, ticket.id, EventKind.DISCLOSURE_PROPOSAL_NOTED, now, date=proposed.isoformat(),
                      sender=incoming.sender, message_id=incoming.mail.message_id, reason=why)


def not_taken_because(ticket: Ticket, proposed: date, now: datetime) -> str | None:
    """Why the reporter's *proposed* date is only noted, not recorded as their proposal, or None."""
    if ticket.state == TicketState.CLOSED:
        return "the ticket is closed"
    return "not a date in the future" if proposed <= now.date() else None


def propose(session: Session, settings: Settings, ticket: Ticket, proposed: date, incoming: route.Incoming,
            now: datetime) -> bool:
    """Record the reporter's proposal *proposed* from their mail *incoming* (already recorded in
    the thread) and acknowledge it; True when it was recorded as theirs."""
    why_not = not_taken_because(ticket, proposed, now)
    if why_not:
        noted(session, ticket, proposed, incoming, now, why_not)
        return False
    plan = _plan(session, ticket)
    plan.proposed_date, plan.proposed_by, plan.proposed_at = proposed, ticket.reporter, now
    records.add_event(session, ticket.id, EventKind.DISCLOSURE_PROPOSED, now, actor=ticket.reporter,
                      date=proposed.isoformat(), message_id=incoming.mail.message_id)
    _acknowledge(session, settings, ticket, proposed, incoming, now)
    return True


def _acknowledge(session: Session, settings: Settings, ticket: Ticket, proposed: date, incoming: route.Incoming,
                 now: datetime) -> None:
    """"We received your proposed date": once per proposed date (the outbox's dedupe key), unless
    the reporter is unreachable, loop safety forbids it or the rate limit is reached."""
    if status_reply.automatic_refusal(session, settings, ticket, incoming, now):
        return  # the proposal stands; the maintainers see it in the forwarded reply either way
    language = settings.language_for(ticket.language)
    text = composer.render(
        "disclosure-received.txt.j2", settings.templates_path, language, reference=ticket.reference,
        subject=composer.shorten(clean_text(ticket.subject)), date=updates.date_words(proposed, language),
        from_name=settings.intake.from_name, intake_address=ticket.intake_address)
    mail = status_reply.automatic_answer(session, settings, ticket, incoming, text, now,
                                         kind=MailKind.DISCLOSURE_RECEIVED,
                                         dedupe_key=f"disclosure-received:{ticket.reference}:{proposed.isoformat()}")
    if outbox.enqueue(session, mail, ticket_id=ticket.id, now=now):
        status_reply.record_automatic_reply(session, ticket, incoming, mail, text, now, date=proposed.isoformat())


def agree(session: Session, settings: Settings, ticket: Ticket, when: date, *, now: datetime, actor: str,
          force: bool = False, choice: updates.UpdateChoice = updates.SEND) -> tuple[list[deadlines.Change], list[str]]:
    """Set *when* as *ticket*'s agreed disclosure date (accepting the reporter's proposal or
    countering it) and tell the reporter; returns no moved deadlines and the lines to show."""
    if ticket.state == TicketState.CLOSED:
        raise milestones.Refused(f"{ticket.reference} is closed: no disclosure to schedule")
    if milestones.reached(session, settings, ticket, Milestone.DISCLOSED):
        raise milestones.Refused(f"{ticket.reference} is disclosed already")
    if when < now.date():
        raise milestones.Refused(f"{when.isoformat()} is in the past")
    latest = limit(session, settings, ticket, now)
    if when > latest.latest and not force:
        raise milestones.Refused(f"{when.isoformat()} is after the policy's limit {latest.latest.isoformat()} "
                                 f"({latest.why}); use --force to agree it anyway")
    plan = _plan(session, ticket)
    previous, accepted = plan.agreed_date, plan.proposed_date == when
    plan.agreed_date, plan.agreed_by, plan.agreed_at = when, actor, now
    records.add_event(session, ticket.id, EventKind.DISCLOSURE_DATE_SET, now, actor=actor, date=when.isoformat(),
                      previous=previous.isoformat() if previous else None, accepted_proposal=accepted,
                      limit=latest.latest.isoformat(), **({"forced": True} if when > latest.latest else {}))
    ticket.updated_at = now
    updates.send(session, settings, ticket, UpdateKind.DISCLOSURE_SCHEDULED, now=now, actor=actor, choice=choice,
                 variant=when.isoformat(), date=updates.date_words(when, settings.language_for(ticket.language)),
                 accepted=accepted)
    if accepted:
        what = "the reporter's proposed date"
    elif plan.proposed_date:
        what = f"countering the reporter's {plan.proposed_date.isoformat()}"
    else:
        what = "no proposal from the reporter"
    return [], [f"disclosure date {when.isoformat()} ({what}); limit {latest.latest.isoformat()}"]
