"""Tickets' stage deadlines, computed by :mod:`intake.sla.engine` and kept in the ``deadline`` table.

A ticket's SLA inputs are all on its record: when it was received, its severity, and its events
(milestones maintainers recorded, the automatic acknowledgement, waits on the reporter). Every
change to those calls :func:`refresh` in the same transaction, so the stored rows always match
the ticket, and the scheduler finds due work through the index on unmet ``due_at`` without
recomputing anything. ``intake sla recompute`` runs :func:`refresh` on every ticket after the
policies in the config changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.sla.calendars import CalendarConfig, parse_duration
from intake.sla.engine import (
    DEFAULT_DUE_SOON, Pause, PolicyConfig, StageDeadline, acknowledge_met_at, compute_deadlines, stage_state,
)
from intake.sla.reminder_schedule import reminder_times
from intake.store import schema
from intake.store.db import read_session, write_session
from intake.store.models import Deadline, Event, Ticket
from intake.vocabulary import FINISHED_STATES, QUEUED_EVENT, EventKind, MailKind, Milestone, StageState, TicketState

# Events that are the automatic reply to a new report: it acknowledges receipt where the policy
# lets it count (``auto_ack_counts``), whichever template it used.
AUTOMATIC_ACKNOWLEDGEMENTS = (QUEUED_EVENT[MailKind.ACKNOWLEDGEMENT], QUEUED_EVENT[MailKind.OUT_OF_SCOPE])


class PolicyMissing(LookupError):
    """The ticket's policy is no longer in the configuration."""


@dataclass(frozen=True)
class SlaInputs:
    """What a ticket's deadlines depend on besides its policy, as read from its record."""

    received_at: datetime
    severity: str | None
    milestones: dict[str, datetime]  # the latest time each milestone was recorded for
    auto_ack_at: datetime | None
    pauses: list[Pause]


def sla_inputs(ticket: Ticket, events: Iterable[Event]) -> SlaInputs:
    """Read *ticket*'s SLA inputs from its *events* (in the order they happened)."""
    milestones: dict[str, datetime] = {}
    auto_ack_at: datetime | None = None
    pauses: list[Pause] = []
    for event in events:
        if event.kind == EventKind.MILESTONE:
            milestones[event.detail["milestone"]] = datetime.fromisoformat(event.detail["at"])
        elif event.kind == EventKind.REOPENED:
            milestones.pop(Milestone.RESOLVED, None)  # a reopened ticket is not resolved any more
        elif event.kind in AUTOMATIC_ACKNOWLEDGEMENTS and auto_ack_at is None:
            auto_ack_at = event.at
        elif event.kind == EventKind.STATE_CHANGED:
            if event.detail.get("to") == TicketState.WAITING and (not pauses or pauses[-1][1] is not None):
                pauses.append((event.at, None))
            elif event.detail.get("from") == TicketState.WAITING and pauses and pauses[-1][1] is None:
                pauses[-1] = (pauses[-1][0], event.at)
    return SlaInputs(ticket.received_at, ticket.severity, milestones, auto_ack_at, pauses)


def ticket_events(session: Session, ticket: Ticket) -> list[Event]:
    """*ticket*'s events in the order they were recorded."""
    return list(session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id)))


def met_stages(policy: PolicyConfig, inputs: SlaInputs) -> dict[str, datetime]:
    """When each stage of *policy* was met: by its milestone, and for the stage met by
    ``acknowledged`` by the automatic acknowledgement too where the policy counts it."""
    met = {}
    for stage in policy.stages:
        if stage.milestone == Milestone.ACKNOWLEDGED:
            at = acknowledge_met_at(policy, auto_ack_sent_at=inputs.auto_ack_at,
                                    first_human_reply_at=inputs.milestones.get(Milestone.ACKNOWLEDGED))
        else:
            at = inputs.milestones.get(stage.milestone) if stage.milestone else None
        if at is not None:
            met[stage.name] = at
    return met


def policy_of(settings: Settings, name: str) -> PolicyConfig:
    try:
        return settings.policies[name]
    except KeyError:
        raise PolicyMissing(f"policy {name!r} is not in the configuration (known: "
                            f"{', '.join(sorted(settings.policies))})") from None


def stage_calendar(settings: Settings, policy_name: str, stage_name: str) -> CalendarConfig:
    """The calendar a stage of a policy counts in (the stage's own, else the policy's)."""
    policy = settings.policies[policy_name]
    stage = policy.stage(stage_name)
    return settings.all_calendars[(stage.calendar if stage and stage.calendar else None) or policy.calendar]


def compute(settings: Settings, policy_name: str, inputs: SlaInputs) -> list[tuple[StageDeadline, datetime | None]]:
    """Every stage's deadline and when it was met, in policy order."""
    policy = policy_of(settings, policy_name)
    met = met_stages(policy, inputs)
    deadlines = compute_deadlines(policy, settings.all_calendars, received_at=inputs.received_at,
                                  severity=inputs.severity, met=met, events=inputs.milestones, pauses=inputs.pauses)
    return [(deadline, met.get(deadline.stage)) for deadline in deadlines]


def rows(settings: Settings, policy_name: str, severity: str | None,
         computed: list[tuple[StageDeadline, datetime | None]], now: datetime) -> list[dict[str, Any]]:
    """Deadline rows (without ``ticket_id``) for what :func:`compute` returned."""
    return [dict(stage=deadline.stage, position=position, due_at=deadline.due, started_at=deadline.start,
                 met_at=met_at, basis=deadline.basis, severity_assumed=deadline.severity_assumed, computed_at=now,
                 notify_at=first_notice_at(settings, policy_name, severity, deadline, met_at))
            for position, (deadline, met_at) in enumerate(computed)]


def reminded(deadline: StageDeadline, met_at: datetime | None) -> bool:
    """Whether the sweep tells maintainers about the stage (reminders, then its breach): it is
    unmet, and its clock runs (started, not paused)."""
    return met_at is None and deadline.due is not None and deadline.start is not None


def first_notice_at(settings: Settings, policy_name: str, severity: str | None, deadline: StageDeadline,
                    met_at: datetime | None) -> datetime | None:
    """When the sweep first looks at a stage whose deadline was (re)computed: its earliest reminder
    point, else its due instant; None when there is nothing to remind of. The sweep works out from
    what was already sent which of the points passed by then still needs telling."""
    if not reminded(deadline, met_at):
        return None
    times = reminder_times(policy_of(settings, policy_name), deadline.stage, settings.all_calendars,
                           start=deadline.start, due=deadline.due, severity=severity)
    return times[0][1] if times else deadline.due


@dataclass(frozen=True)
class Change:
    """A stored deadline that :func:`refresh` moved, added or removed."""

    reference: str
    stage: str
    due_before: datetime | None
    due_after: datetime | None
    met_before: datetime | None
    met_after: datetime | None


_COMPARED = ("position", "due_at", "started_at", "met_at", "basis", "severity_assumed")


def refresh(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> list[Change]:
    """Recompute *ticket*'s deadlines from its record and store them; returns what changed."""
    assert ticket.id is not None
    inputs = sla_inputs(ticket, ticket_events(session, ticket))
    computed = compute(settings, ticket.policy, inputs)
    wanted = {row["stage"]: row for row in rows(settings, ticket.policy, ticket.severity, computed, now)}
    stored = {d.stage: d for d in session.scalars(select(Deadline).where(Deadline.ticket_id == ticket.id))}
    changes = []
    for stage, row in wanted.items():
        current = stored.get(stage)
        if current is None:
            session.add(Deadline(ticket_id=ticket.id, **row))
            changes.append(Change(ticket.reference, stage, None, row["due_at"], None, row["met_at"]))
        elif any(getattr(current, key) != row[key] for key in _COMPARED):
            changes.append(Change(ticket.reference, stage, current.due_at, row["due_at"], current.met_at,
                                  row["met_at"]))
            for key, value in row.items():
                setattr(current, key, value)
        elif current.notify_at is None and row["notify_at"] is not None:
            # The sweep moves notify_at on by itself; a row without one (stored before the
            # scheduler existed) gets its first here, so `intake sla recompute` brings it in.
            current.notify_at = row["notify_at"]
    gone = [stage for stage in stored if stage not in wanted]  # the policy lost the stage
    if gone:
        session.execute(delete(Deadline).where(Deadline.ticket_id == ticket.id, Deadline.stage.in_(gone)))
        changes += [Change(ticket.reference, stage, stored[stage].due_at, None, stored[stage].met_at, None)
                    for stage in gone]
    session.flush()
    return changes


@dataclass(frozen=True)
class RecomputeResult:
    tickets: int
    changes: list[Change]
    errors: dict[str, str]  # reference -> why its deadlines could not be computed


def recompute_all(engine: Engine, settings: Settings, now: datetime, batch: int = 200) -> RecomputeResult:
    """Refresh every ticket's deadlines (after a policy change), *batch* tickets per transaction."""
    return _refresh_each(engine, settings, now, batch, every=True)


def backfill(engine: Engine, settings: Settings, now: datetime, batch: int = 200) -> RecomputeResult:
    """Compute and store the deadlines of tickets that have none: those opened before deadlines
    were stored (migration 0002). A migration cannot read the policies, so this runs after the
    schema upgrade, at every start; with nothing to fill it is one indexed query."""
    return _refresh_each(engine, settings, now, batch, every=False)


def _refresh_each(engine: Engine, settings: Settings, now: datetime, batch: int, every: bool) -> RecomputeResult:
    """Refresh every ticket (or, unless *every*, those without deadlines), in id order, *batch* per
    transaction; a ticket that cannot be computed is reported and left as it was."""
    changes: list[Change] = []
    errors: dict[str, str] = {}
    count, after = 0, 0
    query = select(Ticket)
    if not every:
        query = query.where(~select(Deadline.id).where(Deadline.ticket_id == Ticket.id).exists())
    while True:
        with write_session(engine) as session:
            found = list(session.scalars(query.where(Ticket.id > after).order_by(Ticket.id).limit(batch)))
            for ticket in found:
                try:
                    with session.begin_nested():
                        changes += refresh(session, settings, ticket, now)
                except (PolicyMissing, ValueError) as exc:
                    errors[ticket.reference] = str(exc)
        if not found:
            return RecomputeResult(count, changes, errors)
        count += len(found)
        after = found[-1].id or after


@dataclass(frozen=True)
class Backlog:
    """Of some tickets: how many are open, and how many of their stages are past due and unmet."""

    open_tickets: int
    stages_past_due: int


def backlog(engine: Engine, ticket_ids: Iterable[int], now: datetime) -> Backlog:
    """The :class:`Backlog` of *ticket_ids* at *now* (what `intake import` reports it opened)."""
    wanted = sorted(set(ticket_ids))
    open_ids: set[int] = set()
    past_due = 0
    with read_session(engine) as session:
        for start in range(0, len(wanted), _BACKLOG_CHUNK):
            chunk = wanted[start:start + _BACKLOG_CHUNK]
            found = set(session.scalars(select(Ticket.id).where(Ticket.id.in_(chunk),
                                                                Ticket.state.not_in(FINISHED_STATES))))
            open_ids |= found
            past_due += session.scalar(select(func.count()).select_from(Deadline).where(
                Deadline.ticket_id.in_(found), Deadline.met_at.is_(None), Deadline.due_at <= now)) or 0
    return Backlog(len(open_ids), past_due)


# Tickets per IN (...) lookup of :func:`backlog`: well under the databases' bound-parameter limits.
_BACKLOG_CHUNK = 500


@dataclass(frozen=True)
class StageStatus:
    """One stage of a ticket as ``intake show`` gives it."""

    stage: str
    due_at: datetime | None
    met_at: datetime | None
    state: str  # a StageState
    basis: str
    severity_assumed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "due": self.due_at.isoformat() if self.due_at else None,
                "met_at": self.met_at.isoformat() if self.met_at else None, "state": self.state,
                "basis": self.basis, "severity_assumed": self.severity_assumed}


def stage_statuses(session: Session, settings: Settings, ticket: Ticket, now: datetime) -> list[StageStatus]:
    """*ticket*'s stored deadlines and the state of each at *now*."""
    stored = session.scalars(select(Deadline).where(Deadline.ticket_id == ticket.id).order_by(Deadline.position))
    return statuses_of(settings, ticket, stored, now)


def due_soon(settings: Settings, policy_name: str) -> timedelta:
    """How long before its due time an unmet stage of *policy_name* counts as due soon; the
    default for a ticket whose policy left the config (it still shows what was stored for it)."""
    policy = settings.policies.get(policy_name)
    return policy.due_soon_span if policy else parse_duration(DEFAULT_DUE_SOON).elapsed


def statuses_of(settings: Settings, ticket: Ticket, stored: Iterable[Deadline], now: datetime) -> list[StageStatus]:
    """The state at *now* of each of *ticket*'s *stored* deadlines (in the order given). A finished
    ticket's unmet stages are ``closed``, never ``breached``: nothing is left to meet (as the sweep,
    the digest and ``intake stats`` count them)."""
    soon = due_soon(settings, ticket.policy)
    finished = ticket.state in FINISHED_STATES
    statuses = []
    for row in stored:
        deadline = StageDeadline(row.stage, row.due_at, row.basis, row.started_at, row.severity_assumed)
        state = (StageState.CLOSED if finished and row.met_at is None
                 else stage_state(deadline, row.met_at, now, soon))
        statuses.append(StageStatus(row.stage, row.due_at, row.met_at, state, row.basis, row.severity_assumed))
    return statuses


def ticket_stage_statuses(engine: Engine, settings: Settings, ticket: Ticket, now: datetime) -> list[StageStatus]:
    with read_session(engine) as session:
        return stage_statuses(session, settings, ticket, now)


def explain(settings: Settings, policy_name: str, received: datetime, severity: str | None,
            released: datetime | None) -> list[tuple[StageDeadline, CalendarConfig]]:
    """Every stage's deadline under *policy_name* for a report received at *received* (of
    *severity*, if known; with a patched release out at *released*, if any), each with the calendar
    it counts in: what ``intake sla explain`` shows."""
    milestones = {Milestone.RELEASED: released} if released else {}
    computed = compute(settings, policy_name, SlaInputs(received, severity, milestones, None, []))
    return [(deadline, stage_calendar(settings, policy_name, deadline.stage)) for deadline, _ in computed]


@dataclass(frozen=True)
class BroughtUp:
    upgraded: schema.Upgraded
    filled: RecomputeResult | None  # None: the schema is not at head, so no deadlines were computed


def upgrade_and_backfill(engine: Engine, settings: Settings, now: datetime, revision: str = "head") -> BroughtUp:
    """Migrate the database to *revision* and, at head, compute the deadlines a migration could not
    (:func:`backfill`): what ``intake serve`` does at start and ``intake db upgrade`` does.
    Raises :class:`intake.store.schema.SchemaRefused`."""
    upgraded = schema.upgrade(engine, revision)
    at_head = upgraded.after == schema.head()
    return BroughtUp(upgraded, backfill(engine, settings, now) if at_head else None)
