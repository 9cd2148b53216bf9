"""What an import asks the raw store about the messages of a mailbox: which are stored already
(by their content's digest, by their Message-ID), and what became of those it stored."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Engine, select

from intake.store.db import read_session
from intake.store.models import InboundMessage, ThreadEntry


def known_hashes(engine: Engine, hashes: Iterable[str]) -> set[str]:
    """Which of the sha256 *hashes* a stored message already has."""
    found: set[str] = set()
    with read_session(engine) as session:
        for chunk in _chunks(sorted(set(hashes))):
            found.update(session.scalars(select(InboundMessage.sha256).where(InboundMessage.sha256.in_(chunk))))
    return found


def known_message_ids(engine: Engine, message_ids: Iterable[str]) -> set[str]:
    """Which of *message_ids* a ticket's thread already holds (its message key is the Message-ID),
    or an imported message was stored under."""
    found: set[str] = set()
    with read_session(engine) as session:
        for chunk in _chunks(sorted(set(message_ids))):
            found.update(session.scalars(select(ThreadEntry.message_key).where(ThreadEntry.message_key.in_(chunk))))
            found.update(session.scalars(select(InboundMessage.message_id)
                                         .where(InboundMessage.message_id.in_(chunk))))
    return found


def outcomes(engine: Engine, ids: list[int]) -> list[tuple[str, str | None, int | None]]:
    """The status, decision and ticket of each stored message of *ids* (in no particular order)."""
    table = InboundMessage.__table__
    rows: list[tuple[str, str | None, int | None]] = []
    with read_session(engine) as session:
        for chunk in _chunks(ids):
            rows += [(row.status, row.decision, row.ticket_id) for row in
                     session.execute(select(table.c.status, table.c.decision, table.c.ticket_id)
                                     .where(table.c.id.in_(chunk)))]
    return rows


# Values per IN (...) lookup: well under SQLite's and PostgreSQL's bound-parameter limits.
_LOOKUP_CHUNK = 500


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    """*values* in slices of :data:`_LOOKUP_CHUNK`, one IN (...) lookup each."""
    for start in range(0, len(values), _LOOKUP_CHUNK):
        yield values[start:start + _LOOKUP_CHUNK]
