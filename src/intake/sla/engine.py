"""Pure SLA engine: when is each stage of a report's handling due?

Nothing here touches a database, the network or the clock: every function takes
the instants it needs (``received_at``, ``now``, ...) as arguments. Every instant
must be timezone-aware; results are returned in UTC. A calendar carries its own
IANA zone and all wall-clock reasoning (working hours, what "a day" on a
calendar is) happens in that zone.

Duration contract
=================
A duration is ``"<N> <unit>"`` with N a non-negative integer and at most ten
years; singular units are accepted ("1 day"), case and extra spaces are not
significant.

``N minutes`` / ``N hours`` / ``N days``
    Elapsed time. A day is exactly 24 hours, also across a DST change, so
    "1 day" and "24 hours" always give the same instant. No calendar is used.

``N business hours``
    Only time inside the calendar's working hours on working days counts. The
    working hours are wall-clock times in the calendar's zone, applied to each
    day separately, so an opening at 09:00 stays at 09:00 local time across DST.
    Hours are ``"HH:MM-HH:MM"`` within one day (no overnight span, no 24:00).
    A clock started outside working hours starts at the next opening. A
    deadline that lands exactly on a closing time stays at that closing time
    (it does not roll over to the next opening).

``N business days``
    Only working days count, and a working day counts all of its hours: it is
    one local calendar day in the calendar's zone (23 or 25 elapsed hours on a
    DST-change day). The deadline is therefore the same local wall-clock time N
    working days later: received Friday 15:00 + "2 business days" is Tuesday
    15:00 (Mon-Fri calendar). A clock started on a non-working day starts at
    00:00 of the next working day: received Saturday 10:00 + "2 business days"
    is Wednesday 00:00. A clock that starts at 00:00 of a working day ends at
    00:00 right after its N-th working day, i.e. it never rolls over the
    following non-working days. If the deadline's wall-clock time does not
    exist that day (a spring-forward gap) it resolves as zoneinfo does with
    ``fold=0``: shifted forward by the gap.

A working day is a day whose weekday is in the calendar's ``workdays``, that is
not a public holiday of ``holidays_country``/``holidays_subdivision`` (per the
``holidays`` package, observed days included), and that is not listed in
``extra_holidays``. A zero duration returns the start unchanged, even when the
start is outside working time.

Days passed over are reported as ``(date, reason)`` pairs, the reason being
"weekend" for a weekday not in ``workdays`` (even if it is also a holiday), the
holiday's name for a public holiday, or "extra holiday" for a configured one.

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
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from intake.vocabulary import MILESTONE_SPECS, MILESTONES, SEVERITIES

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
STAGE_STATES = ("pending", "paused", "ok", "due-soon", "breached", "met", "met-late")
BUILTIN_CALENDAR = "utc"
DEFAULT_DUE_SOON = "24 hours"
# When maintainers are reminded of an unmet stage, unless its policy or the stage says otherwise.
DEFAULT_REMIND = ("50%", "80%", "24 hours before")
# The milestone that meets a stage of one of these names unless the stage says ``met_by``.
DEFAULT_MET_BY = {spec.stage: spec.name for spec in MILESTONE_SPECS}

# The basis is one line for a human: past this many skipped days, summarise.
_MAX_SKIPPED_IN_BASIS = 8
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

Pause = tuple[datetime, datetime | None]


# --------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+)\s+(business\s+)?(minute|hour|day)s?")
# Longer is surely a typo, and far longer would overflow datetime arithmetic.
_LONGEST_DURATION = timedelta(days=3653)


@dataclass(frozen=True)
class Duration:
    amount: int
    unit: Literal["minute", "hour", "day"]
    business: bool

    def __str__(self) -> str:
        plural = "" if self.amount == 1 else "s"
        business = "business " if self.business else ""
        return f"{self.amount} {business}{self.unit}{plural}"

    @property
    def elapsed(self) -> timedelta:
        """The duration as plain elapsed time (business hours: hours of working time)."""
        return timedelta(**{f"{self.unit}s": self.amount})


@lru_cache(maxsize=256)
def parse_duration(text: str) -> Duration:
    """Parse "72 hours", "2 business days", "1 day", ... (see the module docstring)."""
    match = _DURATION_RE.fullmatch(" ".join(str(text).lower().split()))
    if match is None:
        raise ValueError(f"invalid duration {text!r}: expected '<N> minutes|hours|days' or '<N> business hours|days'")
    amount, business, unit = int(match[1]), bool(match[2]), match[3]
    if business and unit == "minute":
        raise ValueError(f"invalid duration {text!r}: business time is counted in hours or days")
    duration = Duration(amount, unit, business)
    if duration.elapsed > _LONGEST_DURATION:
        raise ValueError(f"invalid duration {text!r}: longer than ten years")
    return duration


# --------------------------------------------------------------------------
# Reminder points
# --------------------------------------------------------------------------

_PERCENT_RE = re.compile(r"(\d+)\s*%")


@dataclass(frozen=True)
class ReminderPoint:
    """When, before a stage is due, maintainers are reminded of it.

    ``"N%"`` (1-99): once N percent of the stage's time has passed, counted as the stage counts
    it (business time for a business duration, so "50%" of "2 business days" is one working day
    in). ``"<N> minutes|hours|days before"``: that much elapsed time before the due instant."""

    label: str  # normalised: "50%", "24 hours before"; part of the reminder's dedupe key
    fraction: float | None
    before: timedelta | None


@lru_cache(maxsize=256)
def parse_reminder_point(text: str) -> ReminderPoint:
    normal = " ".join(str(text).lower().split())
    if match := _PERCENT_RE.fullmatch(normal):
        percent = int(match[1])
        if not 0 < percent < 100:
            raise ValueError(f"invalid reminder point {text!r}: a percentage is between 1% and 99%")
        return ReminderPoint(f"{percent}%", percent / 100, None)
    if normal.endswith(" before"):
        duration = parse_duration(normal.removesuffix(" before"))
        if duration.business:
            raise ValueError(f"invalid reminder point {text!r}: time before a due instant is elapsed time "
                             "(minutes, hours or days)")
        if duration.amount == 0:
            raise ValueError(f"invalid reminder point {text!r}: '0 ... before' is the due instant itself")
        return ReminderPoint(f"{duration} before", None, duration.elapsed)
    raise ValueError(f"invalid reminder point {text!r}: expected 'N%' (of the stage's time) or "
                     "'<N> minutes|hours|days before'")


def _valid_reminder_points(points: list[str]) -> list[str]:
    labels = [parse_reminder_point(point).label for point in points]
    if len(set(labels)) != len(labels):
        raise ValueError(f"reminder points {points} name one point twice")
    return points


# --------------------------------------------------------------------------
# Calendars
# --------------------------------------------------------------------------

_HOURS_RE = re.compile(r"(\d{2}):(\d{2})\s*-\s*(\d{2}):(\d{2})")


@lru_cache(maxsize=64)
def _parse_working_hours(text: str) -> tuple[time, time]:
    match = _HOURS_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid working_hours {text!r}: expected 'HH:MM-HH:MM', e.g. '09:00-17:00'")
    try:
        opening = time(int(match[1]), int(match[2]))
        closing = time(int(match[3]), int(match[4]))
    except ValueError as exc:
        raise ValueError(f"invalid working_hours {text!r}: {exc}") from None
    if opening >= closing:
        raise ValueError(f"invalid working_hours {text!r}: opening must be before closing")
    return opening, closing


@cache
def _public_holidays(country: str, subdivision: str | None, year: int) -> Mapping[date, str]:
    # Building a year of holidays costs milliseconds; deadlines ask per day.
    return dict(holidays.country_holidays(country, subdiv=subdivision, years=year))


class CalendarConfig(BaseModel):
    """Working days and hours in one IANA zone, with public and extra holidays."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str
    workdays: list[str] = Field(default_factory=lambda: list(WEEKDAYS[:5]))
    working_hours: str = "09:00-17:00"
    holidays_country: str | None = None
    holidays_subdivision: str | None = None
    extra_holidays: list[date] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {name!r} (e.g. 'Australia/Brisbane')") from None
        return name

    @field_validator("workdays")
    @classmethod
    def _known_weekdays(cls, days: list[str]) -> list[str]:
        days = [day.strip().lower() for day in days]
        if not days:
            raise ValueError("workdays must name at least one day")
        unknown = [day for day in days if day not in WEEKDAYS]
        if unknown:
            raise ValueError(f"unknown workdays {unknown}: use {', '.join(WEEKDAYS)}")
        if len(set(days)) != len(days):
            raise ValueError(f"workdays {days} lists a day twice")
        return days

    @field_validator("working_hours")
    @classmethod
    def _valid_hours(cls, text: str) -> str:
        _parse_working_hours(text)
        return text

    @field_validator("holidays_country")
    @classmethod
    def _known_country(cls, country: str | None) -> str | None:
        if country is None:
            return None
        country = country.strip().upper()
        if country not in holidays.list_supported_countries():
            raise ValueError(f"holidays_country {country!r} is not known to the holidays package")
        return country

    @model_validator(mode="after")
    def _known_subdivision(self) -> CalendarConfig:
        if self.holidays_subdivision is None:
            return self
        if self.holidays_country is None:
            raise ValueError("holidays_subdivision needs holidays_country")
        try:
            holidays.country_holidays(self.holidays_country, subdiv=self.holidays_subdivision)
        except NotImplementedError:
            known = holidays.list_supported_countries()[self.holidays_country]
            raise ValueError(
                f"holidays_subdivision {self.holidays_subdivision!r} is not a subdivision of "
                f"{self.holidays_country} (known: {', '.join(known) or 'none'})"
            ) from None
        return self

    # Derived values are recomputed rather than cached on the instance, so a
    # model_copy(update=...) can never carry a stale zone or holiday set.
    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # zoneinfo caches zones itself

    def non_working_reason(self, day: date) -> str | None:
        """Why ``day`` is not a working day ("weekend", a holiday's name, ...), or None."""
        if WEEKDAYS[day.weekday()] not in self.workdays:
            return "weekend"
        if self.holidays_country is not None:
            name = _public_holidays(self.holidays_country, self.holidays_subdivision, day.year).get(day)
            if name is not None:
                return name
        if day in self.extra_holidays:
            return "extra holiday"
        return None

    def working_window(self, day: date) -> tuple[datetime, datetime]:
        """Opening and closing of ``day``'s working hours as UTC instants (DST-correct)."""
        opening, closing = _parse_working_hours(self.working_hours)
        return (
            datetime.combine(day, opening, self.zone).astimezone(UTC),
            datetime.combine(day, closing, self.zone).astimezone(UTC),
        )

    def next_working_instant(self, instant: datetime) -> datetime:
        """``instant`` if it falls inside working hours on a working day, else the next opening."""
        instant = _as_utc("instant", instant)
        day = instant.astimezone(self.zone).date()
        for _ in range(_LONGEST_DURATION.days + 366):  # bounded: workdays is never empty
            if self.non_working_reason(day) is None:
                opening, closing = self.working_window(day)
                if instant < closing:
                    return max(instant, opening)
            day += timedelta(days=1)
        raise ValueError(f"calendar in {self.timezone} has no working time in ten years")


_BUILTIN_CALENDARS = {BUILTIN_CALENDAR: CalendarConfig(timezone="UTC")}


def builtin_calendars() -> dict[str, CalendarConfig]:
    """Calendars that exist without configuration; a configured one of the same name wins."""
    return dict(_BUILTIN_CALENDARS)


def _resolve_calendar(name: str, calendars: Mapping[str, CalendarConfig]) -> CalendarConfig:
    known = _BUILTIN_CALENDARS | dict(calendars)
    if name not in known:
        raise ValueError(f"calendar {name!r} is not defined (known: {', '.join(sorted(known))})")
    return known[name]


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
        return None if points is None else _valid_reminder_points(points)

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
    calendar: str = BUILTIN_CALENDAR
    auto_ack_counts: bool
    pause_while_waiting: bool = False
    # What a report scored low-quality gets: the normal acknowledgement, or the polite
    # out-of-scope reply (template out-of-scope.txt.j2). Either way it is a ticket.
    low_quality_reply: Literal["acknowledge", "out-of-scope"] = "acknowledge"
    # How long before its due instant an unmet stage counts as due soon (elapsed time).
    due_soon: str = DEFAULT_DUE_SOON
    # Reminder points of its stages (a stage may give its own): "N%" of the stage's time, or
    # "<N> minutes|hours|days before" it is due.
    remind: list[str] = Field(default_factory=lambda: list(DEFAULT_REMIND))
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("remind")
    @classmethod
    def _valid_policy_remind(cls, points: list[str]) -> list[str]:
        return _valid_reminder_points(points)

    def stage(self, name: str) -> StageConfig | None:
        return next((stage for stage in self.stages if stage.name == name), None)

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
    known = _BUILTIN_CALENDARS | dict(calendars)
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
    present = [_as_utc("acknowledgement", instant) for instant in candidates if instant is not None]
    return min(present, default=None)


# --------------------------------------------------------------------------
# Deadline arithmetic
# --------------------------------------------------------------------------


def _as_utc(name: str, instant: datetime) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {instant!r}")
    return instant.astimezone(UTC)


def add_duration(
    start: datetime, duration_text: str, calendar: CalendarConfig | None = None
) -> tuple[datetime, list[tuple[date, str]]]:
    """Return the instant ``duration_text`` after ``start`` (in UTC) and the non-working days passed over.

    ``calendar`` only matters for business durations; it defaults to the built-in UTC calendar.
    """
    start = _as_utc("start", start)
    duration = parse_duration(duration_text)
    if duration.amount == 0:
        return start, []
    if not duration.business:
        return start + duration.elapsed, []
    calendar = calendar or _BUILTIN_CALENDARS[BUILTIN_CALENDAR]
    if duration.unit == "day":
        return _add_business_days(start, duration.amount, calendar)
    return _add_business_time(start, duration.elapsed, calendar)


def _add_business_days(start: datetime, days: int, calendar: CalendarConfig) -> tuple[datetime, list[tuple[date, str]]]:
    local = start.astimezone(calendar.zone)
    day, time_of_day = local.date(), local.time()
    skipped: list[tuple[date, str]] = []

    def next_working_day(after: date) -> date:
        candidate = after + timedelta(days=1)
        while (reason := calendar.non_working_reason(candidate)) is not None:
            skipped.append((candidate, reason))
            candidate += timedelta(days=1)
        return candidate

    if (reason := calendar.non_working_reason(day)) is not None:
        skipped.append((day, reason))
        day, time_of_day = next_working_day(day), time(0)

    if time_of_day == time(0):
        # The clock owns the whole of `day`: N whole working days end at the
        # midnight that closes the N-th, before any non-working days after it.
        for _ in range(days - 1):
            day = next_working_day(day)
        due_local = datetime.combine(day + timedelta(days=1), time(0), calendar.zone)
    else:
        for _ in range(days):
            day = next_working_day(day)
        due_local = datetime.combine(day, time_of_day, calendar.zone)
    return due_local.astimezone(UTC), skipped


def _add_business_time(
    start: datetime, amount: timedelta, calendar: CalendarConfig
) -> tuple[datetime, list[tuple[date, str]]]:
    remaining, cursor = amount, start
    day = start.astimezone(calendar.zone).date()
    skipped: list[tuple[date, str]] = []
    while True:
        reason = calendar.non_working_reason(day)
        if reason is not None:
            skipped.append((day, reason))
        else:
            opening, closing = calendar.working_window(day)
            cursor = max(cursor, opening)
            if cursor < closing:
                if remaining <= closing - cursor:
                    return cursor + remaining, skipped
                remaining -= closing - cursor
        day += timedelta(days=1)


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
    received_at = _as_utc("received_at", received_at)
    met_at = {name: _as_utc(f"met[{name!r}]", at) for name, at in (met or {}).items()}
    event_at = {name: _as_utc(f"events[{name!r}]", at) for name, at in (events or {}).items()}
    waits = _merge_pauses(pauses) if policy.pause_while_waiting else []

    deadlines = []
    for stage in policy.stages:
        start, origin = _stage_start(stage, received_at, met_at, event_at)
        if start is None:
            deadlines.append(StageDeadline(stage.name, None, f"starts when {origin}", None, False))
            continue
        calendar = _resolve_calendar(stage.calendar or policy.calendar, calendars)
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
        basis += f"; skipped {_format_skipped(skipped)}"

    extended_due, credited, paused_since = _apply_pauses(start, due, met_at, waits)
    if paused_since is not None:
        basis += f"; clock paused since {_format_instant(paused_since)} while waiting on the reporter"
    elif credited:
        basis += f"; +{format_span(credited)} paused"
    return StageDeadline(stage.name, extended_due, basis, start, assumed)


def _merge_pauses(pauses: Iterable[Pause]) -> list[Pause]:
    """Sorted, non-overlapping pauses; an open pause swallows everything after it."""
    merged: list[Pause] = []
    waits = [(_as_utc("paused_at", p), None if r is None else _as_utc("resumed_at", r)) for p, r in pauses]
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
    """Classify a stage at ``now`` as one of STAGE_STATES.

    ``pending``: its start has not happened (``deadline.start`` is None).
    ``paused``: started but its clock is stopped (``deadline.due`` is None).
    ``met`` / ``met-late``: met at or before / after the due instant (``met`` if
    it has no due). Otherwise ``breached`` once ``now`` is past the due
    instant, ``due-soon`` within ``due_soon`` of it, else ``ok``.
    """
    now = _as_utc("now", now)
    if met_at is not None:
        met_at = _as_utc("met_at", met_at)
        return "met-late" if deadline.due is not None and met_at > deadline.due else "met"
    if deadline.start is None:
        return "pending"
    if deadline.due is None:
        return "paused"
    if now > deadline.due:
        return "breached"
    if deadline.due - now <= due_soon:
        return "due-soon"
    return "ok"


def reminder_times(
    policy: PolicyConfig,
    stage_name: str,
    calendars: Mapping[str, CalendarConfig],
    *,
    start: datetime,
    due: datetime,
    severity: str | None,
) -> list[tuple[str, datetime]]:
    """The stage's reminder points as ``(label, instant)``, in time order, strictly between its
    start and its due instant (a point outside that span is dropped: the new-ticket notice and
    the breach notice cover those moments)."""
    stage = policy.stage(stage_name)
    if stage is None:
        return []
    start, due = _as_utc("start", start), _as_utc("due", due)
    calendar = _resolve_calendar(stage.calendar or policy.calendar, calendars)
    unit = _counted_unit(stage, severity)
    times = []
    for text in stage.remind if stage.remind is not None else policy.remind:
        point = parse_reminder_point(text)
        if point.before is not None:
            at = due - point.before
        elif unit is None:
            at = start + (due - start) * point.fraction
        else:
            at = _point_in_counted_time(start, due, point.fraction, calendar, unit)
        if start < at < due:
            times.append((point.label, at))
    return sorted(times, key=lambda entry: entry[1])


def _counted_unit(stage: StageConfig, severity: str | None) -> Literal["hour", "day"] | None:
    """"hour" or "day" when the stage's duration is business time (for every severity it may
    have, while the severity is unknown), else None: elapsed time."""
    texts = {stage.duration_for(severity)} if severity else {stage.duration_for(each) for each in SEVERITIES}
    kinds = {(duration.business, duration.unit) for duration in map(parse_duration, texts)}
    if len(kinds) == 1:
        business, unit = kinds.pop()
        if business:
            return unit  # type: ignore[return-value]
    return None


def _point_in_counted_time(start: datetime, end: datetime, fraction: float, calendar: CalendarConfig,
                           unit: Literal["hour", "day"]) -> datetime:
    """The instant by which *fraction* of the business time between *start* and *end* has passed."""
    spans = []
    day, last = start.astimezone(calendar.zone).date(), end.astimezone(calendar.zone).date()
    while day <= last:  # bounded by the span, at most ten years of days
        if calendar.non_working_reason(day) is None:
            if unit == "hour":
                opening, closing = calendar.working_window(day)
            else:  # a business day counts all of its hours
                opening = datetime.combine(day, time(0), calendar.zone).astimezone(UTC)
                closing = datetime.combine(day + timedelta(days=1), time(0), calendar.zone).astimezone(UTC)
            begin, finish = max(opening, start), min(closing, end)
            if begin < finish:
                spans.append((begin, finish))
        day += timedelta(days=1)
    remaining = sum((finish - begin for begin, finish in spans), timedelta()) * fraction
    for begin, finish in spans:
        if remaining <= finish - begin:
            return begin + remaining
        remaining -= finish - begin
    return end


# --------------------------------------------------------------------------
# Basis formatting
# --------------------------------------------------------------------------


def _format_skipped(skipped: list[tuple[date, str]]) -> str:
    shown = [f"{_format_day(day)} ({reason})" for day, reason in skipped[:_MAX_SKIPPED_IN_BASIS]]
    hidden = len(skipped) - len(shown)
    return ", ".join(shown) + (f" and {hidden} more" if hidden else "")


def _format_day(day: date) -> str:
    # Spelled out rather than strftime("%a %b"), which follows the process locale.
    return f"{_DAY_NAMES[day.weekday()]} {day.day} {_MONTH_NAMES[day.month - 1]}"


def _format_instant(instant: datetime) -> str:
    return f"{instant:%Y-%m-%d %H:%M} UTC"


def format_span(span: timedelta) -> str:
    """"2d 3h", "45min": a span for people, to the minute."""
    minutes = int(span.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "min")) if value]
    return " ".join(parts) or f"{int(span.total_seconds())}s"
