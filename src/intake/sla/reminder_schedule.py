"""When a stage's reminders fall: its policy's (or its own) reminder points turned into instants
between the stage's start and its due instant, counted as the stage counts time."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Literal

from intake.sla.calendars import CalendarConfig, as_utc, parse_duration, point_in_counted_time, resolve_calendar
from intake.sla.engine import PolicyConfig, StageConfig
from intake.sla.reminder_points import parse_reminder_point
from intake.vocabulary import SEVERITIES


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
    start, due = as_utc("start", start), as_utc("due", due)
    calendar = resolve_calendar(stage.calendar or policy.calendar, calendars)
    unit = _counted_unit(stage, severity)
    times = []
    for text in stage.remind if stage.remind is not None else policy.remind:
        point = parse_reminder_point(text)
        if point.before is not None:
            at = due - point.before
        elif unit is None:
            at = start + (due - start) * point.fraction
        else:
            at = point_in_counted_time(start, due, point.fraction, calendar, unit)
        if start < at < due:
            times.append((point.label, at))
    return sorted(times, key=lambda entry: entry[1])


def _counted_unit(stage: StageConfig, severity: str | None) -> Literal["hour", "day"] | None:
    """"hour" or "day" when the stage's duration is business time (for every severity it may
    have, while the severity is unknown), else None: elapsed time."""
    return _counted_unit_of(frozenset({stage.duration_for(severity)} if severity
                                      else {stage.duration_for(each) for each in SEVERITIES}))


@lru_cache(maxsize=256)  # by the duration texts: a sweep asks it for every due ticket
def _counted_unit_of(texts: frozenset[str]) -> Literal["hour", "day"] | None:
    kinds = {(duration.business, duration.unit) for duration in map(parse_duration, texts)}
    if len(kinds) == 1:
        business, unit = kinds.pop()
        if business:
            return unit  # type: ignore[return-value]
    return None
