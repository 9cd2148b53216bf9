"""Pure SLA engine: policies, their stages, and when each stage of a report's handling is due.

Nothing here touches a database, the network or the clock: every function takes
the instants it needs (``received_at``, ``now``, ...) as arguments. Every instant
must be timezone-aware; results are returned in UTC. Durations and calendars
(business time, working hours, holidays) are :mod:`intake.sla.calendars`.

Stages, severities and pauses
=============================
A stage's clock starts at receipt (``start = "received"``), when another stage
of the same policy is met (``"stage:<name>"``), or when an event such as
``released`` is recorded (``"event:<name>"``). Until that happens the stage is
*pending* and has no due instant.

Severity is one of ``critical, high, medium, low, none``. A stage's duration for
a severity is its ``by_severity`` entry, else its ``duration`` (a stage without
``duration`` must list all five severities). While severity
is unknown a severity-dependent stage uses its strictest duration, i.e. the one
giving the earliest due instant from this start on this calendar (durations are
compared by outcome, never as text), and says so in its basis.

When a policy has ``pause_while_waiting``, the clocks stop while the ticket
waits on the reporter. A pause counts for a stage only while that stage's clock
runs: from the stage's start until it is met, and only if the pause began
before the (already extended) due instant, so a pause can never rescue a stage
that had already breached. Each such pause is added back as *elapsed* time
after the duration has been computed, for business clocks too: simple and never
earlier, but it can credit non-working time (a Friday-to-Monday pause adds the
weekend) and can move a business deadline outside working time. While such a
pause is still open the stage is *paused* and its due instant is ``None``.

Whether the automatic acknowledgement meets the ``acknowledge`` stage is the
policy's ``auto_ack_counts``; ``acknowledge_met_at`` applies it. A stage is met
on time when met at or before its due instant (see ``stage_state``).
"""

from __future__ import annotations

import re  # config and CLI text only; senders' text goes through intake.patterns (RE2)
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from intake.sla.calendars import (
    BUILTIN_CALENDAR, CalendarConfig, add_duration, as_utc, builtin_calendars, format_skipped, format_span,
    parse_duration, resolve_calendar,
)
from intake.sla.reminder_points import valid_reminder_points
from intake.vocabulary import MILESTONES, MILESTONE_SPECS, SEVERITIES, UPDATE_KINDS, StageState

DEFAULT_DUE_SOON = "24 hours"
# When maintainers are reminded of an unmet stage, unless its policy or the stage says otherwise.
DEFAULT_REMIND = ("50%", "80%", "24 hours before")
# The milestone that meets a stage of one of these names unless the stage says ``met_by``.
DEFAULT_MET_BY = {spec.stage: spec.name for spec in MILESTONE_SPECS}

Pause = tuple[datetime, datetime | None]


# --------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _parse_start(text: str) -> tuple[Literal["received", "stage", "event"], str | None]:
    """Split a stage's ``start`` into its kind and the stage/event it names."""
    if text == "received":
        return "received", None
    kind, _, name = text.partition(":")
    if kind in ("stage", "event") and _NAME_RE.fullmatch(name):
        return kind, name  # type: ignore[return-value]
    raise ValueError(f"invalid start {text!r}: use 'received', 'stage:<name>' or 'event:<name>'")


class StageConfig(BaseModel):
    """One deadline of a policy, e.g. ``acknowledge`` within "2 business days"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    duration: str | None = None
    by_severity: dict[str, str] = Field(default_factory=dict)
    start: str = "received"
    calendar: str | None = None
    # The milestone that meets this stage; defaults by name (see DEFAULT_MET_BY).
    met_by: str | None = None
    # Reminder points for this stage (see parse_reminder_point); unset: the policy's.
    remind: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid stage name {name!r}: letters, digits, '_', '-', '.'")
        return name

    @field_validator("duration")
    @classmethod
    def _valid_duration(cls, text: str | None) -> str | None:
        if text is not None:
            parse_duration(text)
        return text

    @field_validator("by_severity")
    @classmethod
    def _valid_by_severity(cls, table: dict[str, str]) -> dict[str, str]:
        unknown = [key for key in table if key not in SEVERITIES]
        if unknown:
            raise ValueError(f"unknown severities {unknown}: use {', '.join(SEVERITIES)}")
        for text in table.values():
            parse_duration(text)
        return table

    @field_validator("start")
    @classmethod
    def _valid_start(cls, text: str) -> str:
        _parse_start(text)
        return text

    @field_validator("remind")
    @classmethod
    def _valid_stage_remind(cls, points: list[str] | None) -> list[str] | None:
        return None if points is None else valid_reminder_points(points)

    @field_validator("met_by")
    @classmethod
    def _known_milestone(cls, milestone: str | None) -> str | None:
        if milestone is not None and milestone not in MILESTONES:
            raise ValueError(f"unknown milestone {milestone!r}: use one of {', '.join(MILESTONES)}")
        return milestone

    @property
    def milestone(self) -> str | None:
        """The milestone that meets this stage (None: none can; the config check refuses that)."""
        return self.met_by or DEFAULT_MET_BY.get(self.name)

    @model_validator(mode="after")
    def _every_severity_has_a_duration(self) -> StageConfig:
        if self.duration is None:
            missing = [severity for severity in SEVERITIES if severity not in self.by_severity]
            if missing:
                raise ValueError(
                    f"stage {self.name!r} has no duration for severities {missing}: "
                    "give 'duration' as the default or list them in 'by_severity'"
                )
        return self

    def duration_for(self, severity: str) -> str:
        return self.by_severity.get(severity) or self.duration  # type: ignore[return-value]


def _check_stage_references(stages: Iterable[StageConfig]) -> None:
    """Stage names are unique; ``stage:`` starts name another stage and form no cycle."""
    stages = list(stages)
    names = [stage.name for stage in stages]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate stage names {duplicates}")
    depends_on: dict[str, str] = {}
    for stage in stages:
        kind, other = _parse_start(stage.start)
        if kind != "stage":
            continue
        if other == stage.name:
            raise ValueError(f"stage {stage.name!r} cannot start when it is itself met")
        if other not in names:
            raise ValueError(f"stage {stage.name!r} starts at unknown stage {other!r} (known: {', '.join(names)})")
        depends_on[stage.name] = other
    # Each stage depends on at most one other, so a cycle is a chain that comes back.
    for first in depends_on:
        chain, current = [first], depends_on[first]
        while current in depends_on:
            if current in chain:
                cycle = [*chain[chain.index(current) :], current]
                raise ValueError(f"stage starts form a cycle: {' -> '.join(cycle)}")
            chain.append(current)
            current = depends_on[current]


class PolicyConfig(BaseModel):
    """A named set of stages with the calendar and rules that time them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    # How reporters see the policy named (the acknowledgement says it); unset: the description.
    title: str = ""
    # Where reporters can read the policy (https); unset: the acknowledgement gives no link.
    url: str | None = Field(default=None, pattern=r"^https://[^/\s]+\S*$")
    calendar: str = BUILTIN_CALENDAR
    auto_ack_counts: bool
    pause_while_waiting: bool = False
    # What a report scored low-quality gets: the normal acknowledgement, or the polite
    # out-of-scope reply (template out-of-scope.txt.j2). Either way it is a ticket.
    low_quality_reply: Literal["acknowledge", "out-of-scope"] = "acknowledge"
    updates: list[str] = Field(default_factory=lambda: list(UPDATE_KINDS))  # progress updates sent (UpdateKind)
    # After this long (elapsed time) without mail to the reporter, the sweep tells them the report is
    # still being worked on (see intake.tickets.keep_in_loop); unset or "": never.
    keep_in_loop: str | None = None
    # How long before its due instant an unmet stage counts as due soon (elapsed time).
    due_soon: str = DEFAULT_DUE_SOON
    # Reminder points of its stages (a stage may give its own): "N%" of the stage's time, or
    # "<N> minutes|hours|days before" it is due.
    remind: list[str] = Field(default_factory=lambda: list(DEFAULT_REMIND))
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("updates")
    @classmethod
    def _known_updates(cls, kinds: list[str]) -> list[str]:
        if unknown := [kind for kind in kinds if kind not in UPDATE_KINDS]:
            raise ValueError(f"unknown updates {', '.join(unknown)}: use some of {', '.join(UPDATE_KINDS)}")
        return kinds

    @field_validator("keep_in_loop")
    @classmethod
    def _valid_keep_in_loop(cls, text: str | None) -> str | None:
        if not text:
            return None
        duration = parse_duration(text)
        # Elapsed, as "no mail for 30 days" reads; under a day would mail the reporter more often
        # than a person could have news for them.
        if duration.business or duration.elapsed < timedelta(days=1):
            raise ValueError(f"keep_in_loop {text!r} must be elapsed time of at least 1 day (e.g. \"30 days\")")
        return text

    @property
    def keep_in_loop_span(self) -> timedelta | None:
        return parse_duration(self.keep_in_loop).elapsed if self.keep_in_loop else None

    @field_validator("remind")
    @classmethod
    def _valid_policy_remind(cls, points: list[str]) -> list[str]:
        return valid_reminder_points(points)

    def stage(self, name: str) -> StageConfig | None:
        return next((stage for stage in self.stages if stage.name == name), None)

    @property
    def public_title(self) -> str:
        """The policy's name as reporters read it: its title, else its description ('' when it has
        neither; its config key is ours, never shown to them)."""
        return self.title or self.description

    @field_validator("due_soon")
    @classmethod
    def _elapsed_due_soon(cls, text: str) -> str:
        if parse_duration(text).business:
            raise ValueError(f"due_soon {text!r} must be elapsed time (minutes, hours or days), not business time")
        return text

    @property
    def due_soon_span(self) -> timedelta:
        return parse_duration(self.due_soon).elapsed

    @model_validator(mode="after")
    def _consistent_stages(self) -> PolicyConfig:
        _check_stage_references(self.stages)
        return self


def validate_policies(policies: Mapping[str, PolicyConfig], calendars: Mapping[str, CalendarConfig]) -> None:
    """Raise ValueError naming the policy and stage that reference an unknown calendar or stage."""
    known = builtin_calendars() | dict(calendars)
    for policy_name, policy in policies.items():
        try:
            _check_stage_references(policy.stages)
        except ValueError as exc:
            raise ValueError(f"policy {policy_name!r}: {exc}") from None
        if policy.calendar not in known:
            raise ValueError(
                f"policy {policy_name!r}: calendar {policy.calendar!r} is not defined "
                f"(known: {', '.join(sorted(known))})"
            )
        for stage in policy.stages:
            # The engine takes any stage; a configured one must be one a maintainer can meet.
            if stage.milestone is None:
                raise ValueError(f"policy {policy_name!r} stage {stage.name!r} needs met_by: the milestone that "
                                 f"meets it ({', '.join(MILESTONES)})")
            kind, event = _parse_start(stage.start)
            if kind == "event" and event not in MILESTONES:
                raise ValueError(f"policy {policy_name!r} stage {stage.name!r} starts at unknown event {event!r}: "
                                 f"use one of {', '.join(MILESTONES)}")
            if stage.calendar is not None and stage.calendar not in known:
                raise ValueError(
                    f"policy {policy_name!r} stage {stage.name!r}: calendar {stage.calendar!r} "
                    f"is not defined (known: {', '.join(sorted(known))})"
                )


def acknowledge_met_at(
    policy: PolicyConfig, *, auto_ack_sent_at: datetime | None, first_human_reply_at: datetime | None
) -> datetime | None:
    """When the ``acknowledge`` stage was met: the automatic mail counts only if the policy says so."""
    candidates = [first_human_reply_at]
    if policy.auto_ack_counts:
        candidates.append(auto_ack_sent_at)
    present = [as_utc("acknowledgement", instant) for instant in candidates if instant is not None]
    return min(present, default=None)


# --------------------------------------------------------------------------
# Stage deadlines
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageDeadline:
    stage: str
    due: datetime | None  # None while pending (start not happened) or paused
    basis: str  # one-line human reason for `due`
    start: datetime | None  # None while pending
    severity_assumed: bool  # strictest duration used because severity is unknown (False while pending)


def compute_deadlines(
    policy: PolicyConfig,
    calendars: Mapping[str, CalendarConfig],
    *,
    received_at: datetime,
    severity: str | None = None,
    met: Mapping[str, datetime] | None = None,
    events: Mapping[str, datetime] | None = None,
    pauses: Iterable[Pause] = (),
) -> list[StageDeadline]:
    """Deadline of every stage of ``policy``, in the policy's stage order.

    ``met`` maps stage names to when they were met; ``events`` maps event names
    (e.g. ``released``) to when they were recorded; ``pauses`` are the
    ``(paused_at, resumed_at | None)`` intervals the ticket waited on the
    reporter, ignored unless the policy has ``pause_while_waiting``.
    """
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}: use {', '.join(SEVERITIES)} or None")
    received_at = as_utc("received_at", received_at)
    met_at = {name: as_utc(f"met[{name!r}]", at) for name, at in (met or {}).items()}
    event_at = {name: as_utc(f"events[{name!r}]", at) for name, at in (events or {}).items()}
    waits = _merge_pauses(pauses) if policy.pause_while_waiting else []

    deadlines = []
    for stage in policy.stages:
        start, origin = _stage_start(stage, received_at, met_at, event_at)
        if start is None:
            deadlines.append(StageDeadline(stage.name, None, f"starts when {origin}", None, False))
            continue
        calendar = resolve_calendar(stage.calendar or policy.calendar, calendars)
        stage_met_at = met_at.get(stage.name)
        deadlines.append(_timed_stage(stage, calendar, start, origin, severity, stage_met_at, waits))
    return deadlines


def _stage_start(
    stage: StageConfig,
    received_at: datetime,
    met_at: Mapping[str, datetime],
    event_at: Mapping[str, datetime],
) -> tuple[datetime | None, str]:
    """The stage's start instant (None if it has not happened) and a phrase describing it."""
    kind, name = _parse_start(stage.start)
    if kind == "received":
        return received_at, "receipt"
    if kind == "stage":
        start = met_at.get(name)  # type: ignore[arg-type]
        return start, f"stage {name!r} is met" if start is None else f"stage {name!r} met"
    start = event_at.get(name)  # type: ignore[arg-type]
    return start, f"event {name!r} is recorded" if start is None else f"event {name!r}"


def _timed_stage(
    stage: StageConfig,
    calendar: CalendarConfig,
    start: datetime,
    origin: str,
    severity: str | None,
    met_at: datetime | None,
    waits: list[Pause],
) -> StageDeadline:
    if severity is not None:
        duration_text = stage.duration_for(severity)
        due, skipped = add_duration(start, duration_text, calendar)
        assumed = False
    else:
        candidates = list(dict.fromkeys(stage.duration_for(each) for each in SEVERITIES))
        outcomes = [(add_duration(start, text, calendar), text) for text in candidates]
        (due, skipped), duration_text = min(outcomes, key=lambda outcome: outcome[0][0])
        assumed = len(candidates) > 1

    duration = parse_duration(duration_text)
    basis = str(duration)
    if assumed:
        basis += " (severity unknown: strictest)"
    if duration.business:
        basis += f" in {calendar.timezone}"
    basis += f" from {origin}"
    if skipped:
        basis += f"; skipped {format_skipped(skipped)}"

    extended_due, credited, paused_since = _apply_pauses(start, due, met_at, waits)
    if paused_since is not None:
        basis += f"; clock paused since {_format_instant(paused_since)} while waiting on the reporter"
    elif credited:
        basis += f"; +{format_span(credited)} paused"
    return StageDeadline(stage.name, extended_due, basis, start, assumed)


def _merge_pauses(pauses: Iterable[Pause]) -> list[Pause]:
    """Sorted, non-overlapping pauses; an open pause swallows everything after it."""
    merged: list[Pause] = []
    waits = [(as_utc("paused_at", p), None if r is None else as_utc("resumed_at", r)) for p, r in pauses]
    for paused_at, resumed_at in sorted(waits, key=lambda wait: wait[0]):
        if resumed_at is not None and resumed_at < paused_at:
            raise ValueError(f"pause resumed at {resumed_at} before it began at {paused_at}")
        if merged and (merged[-1][1] is None or paused_at <= merged[-1][1]):
            last_start, last_end = merged[-1]
            open_ended = last_end is None or resumed_at is None
            merged[-1] = (last_start, None if open_ended else max(last_end, resumed_at))
        else:
            merged.append((paused_at, resumed_at))
    return merged


def _apply_pauses(
    start: datetime, due: datetime, met_at: datetime | None, waits: list[Pause]
) -> tuple[datetime | None, timedelta, datetime | None]:
    """Push ``due`` back by the waits that fall while the stage's clock runs.

    Returns the new due (None while paused), the time added, and since when the
    clock is paused (None unless a wait is still open).
    """
    credited = timedelta(0)
    for paused_at, resumed_at in waits:
        clock_stops = due if met_at is None else min(due, met_at)
        if paused_at >= clock_stops:
            break  # sorted: every later wait begins after the clock stopped too
        if met_at is not None and (resumed_at is None or resumed_at > met_at):
            resumed_at = met_at  # meeting the stage stops its clock for good
        counted_from = max(paused_at, start)
        if resumed_at is None:
            return None, credited, counted_from
        if resumed_at > counted_from:
            due += resumed_at - counted_from
            credited += resumed_at - counted_from
    return due, credited, None


def stage_state(deadline: StageDeadline, met_at: datetime | None, now: datetime, due_soon: timedelta) -> str:
    """Classify a stage of an open ticket at ``now`` (see :data:`intake.vocabulary.StageState`).

    ``pending``: its start has not happened (``deadline.start`` is None).
    ``paused``: started but its clock is stopped (``deadline.due`` is None).
    ``met`` / ``met-late``: met at or before / after the due instant (``met`` if
    it has no due). Otherwise ``breached`` once ``now`` is past the due
    instant, ``due-soon`` within ``due_soon`` of it, else ``ok``.
    """
    now = as_utc("now", now)
    if met_at is not None:
        met_at = as_utc("met_at", met_at)
        return StageState.MET_LATE if deadline.due is not None and met_at > deadline.due else StageState.MET
    if deadline.start is None:
        return StageState.PENDING
    if deadline.due is None:
        return StageState.PAUSED
    if now > deadline.due:
        return StageState.BREACHED
    if deadline.due - now <= due_soon:
        return StageState.DUE_SOON
    return StageState.OK


def _format_instant(instant: datetime) -> str:
    return f"{instant:%Y-%m-%d %H:%M} UTC"
