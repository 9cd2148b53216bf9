"""Public ticket references (``SEC-2026-0042``): numbered per prefix and year, never reused.

This module owns the ``reference_counter`` table: :func:`allocate_references` is its only writer.
"""

from __future__ import annotations

import itertools
from collections import Counter

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake.store.models import ReferenceCounter


def next_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The references :func:`allocate_references` would hand out for *years* now, read only: what a
    reply can be rendered with before the write lock is taken."""
    table = ReferenceCounter.__table__
    query = select(table.c.year, table.c.last).where(table.c.prefix == prefix, table.c.year.in_(set(years)))
    return _numbered(prefix, years, dict(session.execute(query).all()))


def allocate_references(session: Session, prefix: str, years: list[int]) -> list[str]:
    """The next public references, one for each of *years* in order (e.g. SEC-2026-0042): one atomic
    upsert per year, safe under concurrency."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = ReferenceCounter.__table__
    last_before = {}
    for year, count in Counter(years).items():
        statement = (
            insert(table)
            .values(prefix=prefix, year=year, last=count)
            .on_conflict_do_update(index_elements=["prefix", "year"], set_={"last": table.c.last + count})
            .returning(table.c.last)
        )
        last_before[year] = session.execute(statement).scalar_one() - count
    return _numbered(prefix, years, last_before)


def _numbered(prefix: str, years: list[int], last_before: dict[int, int]) -> list[str]:
    """References for *years* in order, numbered on from each year's last number (0: none yet)."""
    numbers = {year: itertools.count(last_before.get(year, 0) + 1) for year in set(years)}
    return [f"{prefix}-{year}-{next(numbers[year]):04d}" for year in years]
