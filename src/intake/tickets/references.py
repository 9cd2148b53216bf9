"""Public ticket references (``SEC-2026-0042``): numbered per prefix and year, never reused.

This module owns the ``reference_counter`` table: :func:`allocate_references` is its only writer.
"""

from __future__ import annotations

import itertools
from collections import Counter

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake.store.models import ReferenceCounter


_COUNTERS = ReferenceCounter.__table__
# Built once (they run for every chunk of new reports, however small); values bound at each run.
_LAST = select(_COUNTERS.c.year, _COUNTERS.c.last).where(_COUNTERS.c.prefix == bindparam("prefix"),
                                                         _COUNTERS.c.year.in_(bindparam("years", expanding=True)))
_ADVANCE = {
    dialect: insert(_COUNTERS)
    .values(prefix=bindparam("counter_prefix"), year=bindparam("counter_year"), last=bindparam("count"))
    .on_conflict_do_update(index_elements=["prefix", "year"], set_={"last": _COUNTERS.c.last + bindparam("count")})
    .returning(_COUNTERS.c.last)
    for dialect, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}


def next_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The references :func:`allocate_references` would hand out for *years* now, read only: what a
    reply can be rendered with before the write lock is taken."""
    return _numbered(prefix, years, dict(session.execute(_LAST, {"prefix": prefix, "years": sorted(set(years))}).all()))


def allocate_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The next public references, one for each of *years* in order (e.g. SEC-2026-0042): one atomic
    upsert per year, safe under concurrency."""
    statement = _ADVANCE["postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"]
    last_before = {}
    for year, count in Counter(years).items():
        advanced = session.execute(statement, {"counter_prefix": prefix, "counter_year": year, "count": count})
        last_before[year] = advanced.scalar_one() - count
    return _numbered(prefix, years, last_before)


def _numbered(prefix: str, years: list[int], last_before: dict[int, int]) -> list[str]:
    """References for *years* in order, numbered on from each year's last number (0: none yet)."""
    numbers = {year: itertools.count(last_before.get(year, 0) + 1) for year in set(years)}
    return [f"{prefix}-{year}-{next(numbers[year]):04d}" for year in years]
