"""Business time: calendars (IANA zone, working days and hours, holidays) and durations on them.

Nothing here touches a database, the network or the clock: every function takes the instants it
needs as arguments. Every instant must be timezone-aware; results are returned in UTC. A calendar
carries its own IANA zone and all wall-clock reasoning (working hours, what "a day" on a calendar
is) happens in that zone.

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
"""

from __future__ import annotations

import re  # config and CLI text only; senders' text goes through intake.patterns (RE2)
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
import holidays.registry
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
BUILTIN_CALENDAR = "utc"

# The basis is one line for a human: past this many skipped days, summarise.
_MAX_SKIPPED_IN_BASIS = 8
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


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


@cache
def holidays_country_codes() -> frozenset[str]:
    """The ISO 3166 codes (alpha-2 and alpha-3) the holidays package knows, without importing its
    countries: a registry entry is (class name, alpha-2, alpha-3, aliases such as UK or HolidaysAX)."""
    return frozenset(code for names in holidays.registry.COUNTRIES.values() for code in names[1:]
                     if 2 <= len(code) <= 3 and code.isupper())


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
        # The package's registry of codes: loading any country (or listing them) imports all of
        # them, 0.15 s that every CLI command paid for a check (tests/test_sla.py keeps the two equal).
        if country not in holidays_country_codes():
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
        instant = as_utc("instant", instant)
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


def resolve_calendar(name: str, calendars: Mapping[str, CalendarConfig]) -> CalendarConfig:
    """The calendar called *name*: a configured one, else a built-in one; ValueError if neither."""
    known = _BUILTIN_CALENDARS | dict(calendars)
    if name not in known:
        raise ValueError(f"calendar {name!r} is not defined (known: {', '.join(sorted(known))})")
    return known[name]


# --------------------------------------------------------------------------
# Business-time arithmetic
# --------------------------------------------------------------------------


def as_utc(name: str, instant: datetime) -> datetime:
    """*instant* in UTC; ValueError naming *name* if it is naive."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {instant!r}")
    return instant.astimezone(UTC)


def add_duration(
    start: datetime, duration_text: str, calendar: CalendarConfig | None = None
) -> tuple[datetime, list[tuple[date, str]]]:
    """Return the instant ``duration_text`` after ``start`` (in UTC) and the non-working days passed over.

    ``calendar`` only matters for business durations; it defaults to the built-in UTC calendar.
    """
    start = as_utc("start", start)
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


def point_in_counted_time(start: datetime, end: datetime, fraction: float, calendar: CalendarConfig,
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
# Skipped days and spans for people
# --------------------------------------------------------------------------


def format_skipped(skipped: list[tuple[date, str]]) -> str:
    """"Sat 4 Apr (weekend), Mon 6 Apr (Easter Monday)": days passed over, for a deadline's basis."""
    shown = [f"{_format_day(day)} ({reason})" for day, reason in skipped[:_MAX_SKIPPED_IN_BASIS]]
    hidden = len(skipped) - len(shown)
    return ", ".join(shown) + (f" and {hidden} more" if hidden else "")


def _format_day(day: date) -> str:
    # Spelled out rather than strftime("%a %b"), which follows the process locale.
    return f"{_DAY_NAMES[day.weekday()]} {day.day} {_MONTH_NAMES[day.month - 1]}"


def format_span(span: timedelta) -> str:
    """"2d 3h", "45min": a span for people, to the minute."""
    minutes = int(span.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "min")) if value]
    return " ".join(parts) or f"{int(span.total_seconds())}s"
