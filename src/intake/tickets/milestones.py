"""Milestones maintainers record on a ticket, and waiting on the reporter.

``acknowledged``, ``assessed`` (with the severity), ``released`` (a patched release is out),
``disclosed`` and ``resolved`` (declared in :data:`intake.vocabulary.MILESTONE_SPECS`) are each an
event with who recorded it and when it happened; a policy's stages are met by them and can start
at them (see :mod:`intake.sla.engine`). They come in order: recording one before the milestones it
follows, twice, or out of time order is refused unless forced, so a slip of the keyboard cannot
quietly meet a deadline. Waiting on the reporter stops the clocks of policies that say so. Every
function here refreshes the ticket's stored deadlines in the caller's transaction; the CLI and the
maintainers' mail commands call them.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla import deadlines
from intake.store.models import Ticket
from intake.tickets import records
from intake.vocabulary import (
    FINISHED_STATES, MILESTONES, MILESTONE_SPECS, SEVERITIES, EventKind, Milestone, TicketState,
)

FOLLOWS = {spec.name: spec.follows for spec in MILESTONE_SPECS}
_VERBS = {spec.name: spec.verb for spec in MILESTONE_SPECS}
# A milestone moves the ticket to the state of its name, forward only (see _advance); the finished
# one (resolved) comes last whatever follows it.
_STATE_ORDER = (TicketState.NEW, *sorted(MILESTONES, key=lambda milestone: milestone in FINISHED_STATES))


class Refused(ValueError):
    """The change is not recorded; the message says why and how to insist where one can."""


def record(session: Session, settings: Settings, ticket: Ticket, milestone: str, *, at: datetime, now: datetime,
           actor: str, force: bool = False, advance: bool = True, **detail: object) -> list[deadlines.Change]:
    """Record that *milestone* happened at *at*; returns the deadlines that moved. With *advance* the
    ticket's state moves forward to the milestone's (closing a ticket sets its own state instead)."""
    if milestone not in MILESTONES:
        raise Refused(f"unknown milestone {milestone!r}: use one of {', '.join(MILESTONES)}")
    if at.tzinfo is None:
        raise Refused("the time of a milestone needs a UTC offset")
    if at > now:
        raise Refused(f"{at.isoformat()} is in the future")
    if at < ticket.received_at:
        raise Refused(f"{at.isoformat()} is before {ticket.reference} was received ({ticket.received_at.isoformat()})")
    reached = _reached(session, settings, ticket)
    if not force:
        _check_order(ticket, milestone, at, reached)
    records.add_event(session, ticket.id, EventKind.MILESTONE, now, actor=actor, milestone=milestone,
                      at=at.isoformat(), **({"forced": True} if force else {}),
                      **{key: value for key, value in detail.items() if value is not None})
    if advance:
        _advance(session, ticket, milestone, now, actor)
    return deadlines.refresh(session, settings, ticket, now)


def _reached(session: Session, settings: Settings, ticket: Ticket) -> dict[str, datetime]:
    """The milestones *ticket* reached and when, the automatic acknowledgement included where its
    policy counts it."""
    policy = deadlines.policy_of(settings, ticket.policy)
    inputs = deadlines.sla_inputs(ticket, deadlines.ticket_events(session, ticket))
    found = dict(inputs.milestones)
    if Milestone.ACKNOWLEDGED not in found and policy.auto_ack_counts and inputs.auto_ack_at is not None:
        found[Milestone.ACKNOWLEDGED] = inputs.auto_ack_at
    return found


def reached(session: Session, settings: Settings, ticket: Ticket, milestone: str) -> bool:
    """Whether *ticket* reached *milestone* (by a maintainer, or the automatic acknowledgement
    where its policy counts it)."""
    return milestone in _reached(session, settings, ticket)


def _check_order(ticket: Ticket, milestone: str, at: datetime, reached: dict[str, datetime]) -> None:
    if milestone in reached:
        raise Refused(f"{ticket.reference} is already {milestone} (at {reached[milestone].isoformat()}); "
                      "use --force to record it again")
    for before in FOLLOWS[milestone]:
        if before not in reached:
            raise Refused(f"{ticket.reference} is not {before} yet: record that first (`intake {_VERBS[before]}`), "
                          "or use --force")
        if at < reached[before]:
            raise Refused(f"{milestone} at {at.isoformat()} would come before {before} at "
                          f"{reached[before].isoformat()}; use --force if that is right")


def _advance(session: Session, ticket: Ticket, state: str, now: datetime, actor: str) -> None:
    """Move the ticket's state forward to *state*; never back, and not while it waits on the reporter
    (resuming returns it to where it was)."""
    if ticket.state not in _STATE_ORDER or _STATE_ORDER.index(state) <= _STATE_ORDER.index(ticket.state):
        return
    records.change_state(session, ticket, state, now, actor=actor, why=f"{state} recorded")


def assess(session: Session, settings: Settings, ticket: Ticket, severity: str, *, at: datetime, now: datetime,
           actor: str, force: bool = False) -> list[deadlines.Change]:
    """Record the assessment with its *severity* (which sets the severity-dependent deadlines)."""
    if severity not in SEVERITIES:
        raise Refused(f"unknown severity {severity!r}: use one of {', '.join(SEVERITIES)}")
    set_severity(session, ticket, severity, now, actor)
    return record(session, settings, ticket, Milestone.ASSESSED, at=at, now=now, actor=actor, force=force,
                  severity=severity)


def set_severity(session: Session, ticket: Ticket, severity: str, now: datetime, actor: str,
                 cvss: tuple[str, float] | None = None) -> None:
    """Change the ticket's severity, and its CVSS vector and score if given (the caller refreshes
    its deadlines)."""
    if ticket.severity == severity and (cvss is None or (ticket.cvss_vector, ticket.cvss_score) == cvss):
        return
    detail: dict[str, object] = {"from": ticket.severity, "to": severity}
    if cvss is not None:
        ticket.cvss_vector, ticket.cvss_score = cvss
        detail.update(cvss_vector=cvss[0], cvss_score=cvss[1])
    records.add_event(session, ticket.id, EventKind.SEVERITY_CHANGED, now, actor=actor, **detail)
    ticket.severity = severity
    ticket.updated_at = now


def wait(session: Session, settings: Settings, ticket: Ticket, *, now: datetime, actor: str,
         why: str = "waiting on the reporter") -> list[deadlines.Change]:
    """The ticket waits on the reporter: clocks stop where the policy says so."""
    if ticket.state == TicketState.WAITING:
        raise Refused(f"{ticket.reference} is already waiting on the reporter")
    if ticket.state in FINISHED_STATES:
        raise Refused(f"{ticket.reference} is {ticket.state}")
    records.change_state(session, ticket, TicketState.WAITING, now, actor=actor, why=why)
    return deadlines.refresh(session, settings, ticket, now)


def resume(session: Session, settings: Settings, ticket: Ticket, *, now: datetime, actor: str,
           why: str = "resumed") -> list[deadlines.Change]:
    """The ticket no longer waits on the reporter: back to the state it was in, clocks running."""
    if ticket.state != TicketState.WAITING:
        raise Refused(f"{ticket.reference} is not waiting on the reporter (state {ticket.state})")
    records.leave_waiting(session, ticket, now, actor=actor, why=why)
    return deadlines.refresh(session, settings, ticket, now)

