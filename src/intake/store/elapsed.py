"""The time between two stored instants as an SQL expression that sorts exactly, on SQLite and
PostgreSQL alike.

The stats rank stage times in the database (median, 90th percentile) instead of reading every
deadline into Python, so they need an ``ORDER BY`` on "met minus started" that orders as Python's
``timedelta`` does, to the microsecond. PostgreSQL subtracts timestamps into an interval, which
compares exactly. SQLite stores an instant as text in SQLAlchemy's format
(``2026-06-01 12:00:00.123456``): whole seconds since the epoch times a million, plus the
fraction's six digits, is an exact integer (``julianday`` is a float, about 50 µs coarse at
today's dates, which could swap two close times and move a median).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, cast, func

# Where the microseconds start in SQLAlchemy's SQLite text for an instant, and how many there are.
_FRACTION_AT, _FRACTION_DIGITS = 21, 6


def _sqlite_microseconds(instant: Any) -> Any:
    """Microseconds since the epoch of a stored instant (an empty fraction counts as 0)."""
    seconds = cast(func.strftime("%s", instant), Integer)
    return seconds * 1_000_000 + cast(func.substr(instant, _FRACTION_AT, _FRACTION_DIGITS), Integer)


def sort_key(dialect: str, later: Any, earlier: Any) -> Any:
    """An expression ordering rows by ``later - earlier`` exactly as Python's subtraction would,
    for a database of *dialect* (``sqlite`` or ``postgresql``)."""
    if dialect == "sqlite":
        return _sqlite_microseconds(later) - _sqlite_microseconds(earlier)
    return later - earlier
