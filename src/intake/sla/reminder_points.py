"""Reminder points: when, before a stage is due, maintainers are reminded ("50%", "24 hours before")."""

from __future__ import annotations

import re  # config text only; senders' text goes through intake.patterns (RE2)
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from intake.sla.calendars import parse_duration

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


def valid_reminder_points(points: list[str]) -> list[str]:
    """*points* unchanged if each parses and none names the same point as another; else ValueError."""
    labels = [parse_reminder_point(point).label for point in points]
    if len(set(labels)) != len(labels):
        raise ValueError(f"reminder points {points} name one point twice")
    return points
