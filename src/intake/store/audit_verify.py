"""The tamper-evident audit chain, read side: verify it, list who did what, export its head as an
anchor; start it on a database that has none, and move it from the key intake kept in the
database to the operator's (:func:`rekey`). The chain's format: :mod:`intake.store.audit`.

Verification reads the events and the chain in one snapshot (REPEATABLE READ on PostgreSQL, one
read transaction on SQLite) and walks the chain in order, recomputing every MAC with the key; it
names, in chain order, every entry that is missing, altered, out of place or whose event is gone
or differs, then every event no entry seals (written behind intake's back). An anchor (the head's
seq, MAC and instant, kept elsewhere) catches what the walk cannot: entries cut off the end of the
chain after it (a read's entry has no event to miss) or a chain rebuilt by someone with the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update

from intake.store import audit
from intake.store.db import is_sqlite, write_session
from intake.store.models import AuditEntry, Event, Ticket

_ENTRIES = AuditEntry.__table__
_EVENTS = Event.__table__
_TICKETS = Ticket.__table__


@dataclass(frozen=True)
class Anchor:
    """The chain's head at some moment, kept for safekeeping (``intake audit anchor``)."""

    seq: int
    mac: str
    at: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "mac": self.mac, "at": self.at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Anchor:
        """An anchor read back; raises ValueError when *data* is not one."""
        try:
            return cls(int(data["seq"]), str(data["mac"]), str(data["at"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an audit anchor (seq, mac, at): {exc}") from None


@dataclass(frozen=True)
class Problem:
    """Something verification found: at entry *seq* (None: an event no entry seals)."""

    seq: int | None
    event_id: int | None
    text: str


@dataclass(frozen=True)
class Verification:
    entries: int
    events: int
    problems: list[Problem]

    @property
    def intact(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class LogLine:
    """One entry as ``intake audit log`` shows it."""

    seq: int
    at: datetime
    actor: str
    action: str
    reference: str | None
    detail: dict[str, Any]


def start(engine: Engine, now: datetime) -> int:
    """Start the chain if it never was, sealing every event stored before it as of *now*; returns
    how many were sealed (0: started already)."""
    with write_session(engine) as session:
        if audit.started_at(session) is not None:
            return 0
        before = session.scalar(select(_ENTRIES.c.seq).order_by(_ENTRIES.c.seq.desc()).limit(1)) or 0
        return audit.append(session, [], now) - before


def record_read(engine: Engine, action: str, actor: str, now: datetime, *, reference: str | None = None,
                ticket_id: int | None = None, **detail: Any) -> None:
    """Append that *actor* read report content (*action*, an AuditAction) of the ticket known by
    *reference* or *ticket_id*, if any, in its own transaction: what the CLI does once it has read
    and before it shows or writes out what it read (a read that cannot be recorded is not shown)."""
    with write_session(engine) as session:
        if reference is not None:
            ticket_id = session.scalar(select(_TICKETS.c.id).where(_TICKETS.c.reference == reference.upper()))
        audit.record(session, action, actor, now, ticket_id, **detail)


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A read transaction that sees one state of the database throughout."""
    bind = engine if is_sqlite(engine) else engine.execution_options(isolation_level="REPEATABLE READ")
    with bind.connect() as connection, connection.begin():
        yield connection


class RekeyRefused(Exception):
    """The chain cannot be moved to the operator's key; the message says why."""


def verify(engine: Engine, anchor: Anchor | None = None) -> Verification:
    """Check the chain and the events against each other (see the module's docstring)."""
    with _snapshot(engine) as connection:
        return _check(connection, audit.chain_key(connection), anchor)


def rekey(engine: Engine, actor: str, now: datetime) -> int:
    """Move a chain MAC'd with the key kept in the database (no key was configured when it
    started) to the operator's key, given now: verified intact under the old key, every entry
    re-MAC'd under the new one, the old key deleted, and an entry saying who did it. Returns how
    many entries were re-MAC'd. Raises :class:`RekeyRefused`."""
    with write_session(engine) as session:
        connection = session.connection()
        audit.lock_chain(connection)
        given = audit.given_key(connection.engine.url.render_as_string(hide_password=False))
        old = audit.kept_key(connection)
        if given is None:
            raise RekeyRefused("no key is given ([audit] key_file or the audit-key credential): nothing to move to")
        if old is None:
            raise RekeyRefused("the chain is not MAC'd with a key kept in the database")
        checked = _check(connection, old, None)
        if not checked.intact:
            raise RekeyRefused(f"the chain is not intact under its key: {checked.problems[0].text}")
        prev, updates = audit.GENESIS, []
        for entry in connection.execute(select(_ENTRIES).order_by(_ENTRIES.c.seq)):
            mac = audit.entry_mac(given[0], prev, entry.seq, entry)
            updates.append({"at_seq": entry.seq, "prev_mac": prev, "mac": mac})
            prev = mac
        if updates:
            connection.execute(update(_ENTRIES).where(_ENTRIES.c.seq == bindparam("at_seq")), updates)
        audit.take_key(connection, given[0])
        audit.record(session, audit.REKEYED, actor, now, key=given[1])
        return len(updates)


def _check(connection: Connection, key: bytes, anchor: Anchor | None) -> Verification:
    """:func:`verify` on *connection* under *key*."""
    events = {row.id: (audit.event_digest(row), row.kind, row.ticket_id)
              for row in connection.execute(select(_EVENTS).order_by(_EVENTS.c.id))}
    problems: list[Problem] = []
    sealed: set[int] = set()
    count, last = _walk(connection, key, events, sealed, problems)
    if count == 0 and audit.started_at(connection) is not None:
        problems.append(Problem(1, None, f"the chain is empty but was started at {audit.started_at(connection)}: "
                                         "every entry was deleted"))
    if anchor is not None:
        problems += _anchor_problems(connection, anchor, last)
    problems += [Problem(None, event_id, f"event {event_id} ({kind}, ticket id {ticket_id}) is in no audit entry: "
                                         "written or re-inserted behind intake's back")
                 for event_id, (_, kind, ticket_id) in events.items() if event_id not in sealed]
    return Verification(count, len(events), problems)


def _walk(connection: Connection, key: bytes, events: dict[int, tuple[str, str, int]], sealed: set[int],
          problems: list[Problem]) -> tuple[int, int]:
    """Walk the chain in seq order, adding what is wrong to *problems* and the events it seals to
    *sealed*; returns how many entries there are and the last seq."""
    expected, prev, count = 1, audit.GENESIS, 0
    for entry in connection.execute(select(_ENTRIES).order_by(_ENTRIES.c.seq)):
        count += 1
        seq = entry.seq
        if seq != expected:
            gone = f"entry {expected}" if seq == expected + 1 else f"entries {expected} to {seq - 1}"
            problems.append(Problem(seq, entry.event_id, f"{gone} missing before entry {seq}: deleted"))
        if entry.prev_mac != prev:
            problems.append(Problem(seq, entry.event_id, f"entry {seq} does not follow entry {seq - 1} (its prev_mac "
                                                         "differs): entries were deleted, inserted or reordered"))
        if audit.entry_mac(key, entry.prev_mac, seq, entry) != entry.mac:
            problems.append(Problem(seq, entry.event_id, f"entry {seq} was altered: its MAC does not match"))
        if entry.event_id is not None:
            found = events.get(entry.event_id)
            if found is None:
                problems.append(Problem(seq, entry.event_id, f"event {entry.event_id} sealed by entry {seq} is gone: "
                                                             "deleted"))
            elif found[0] != entry.digest:
                problems.append(Problem(seq, entry.event_id, f"event {entry.event_id} differs from what entry {seq} "
                                                             "sealed: the event row was altered"))
            sealed.add(entry.event_id)
        expected, prev = seq + 1, entry.mac
    return count, expected - 1


def _anchor_problems(connection: Connection, anchor: Anchor, last: int) -> list[Problem]:
    """Whether the anchored entry is still in the chain, unchanged."""
    row = connection.execute(select(_ENTRIES.c.mac, _ENTRIES.c.at).where(_ENTRIES.c.seq == anchor.seq)).first()
    if row is None:
        return [Problem(anchor.seq, None, f"the anchored entry {anchor.seq} is gone (the chain ends at entry {last}): "
                                          "entries were cut off the end of the chain")]
    if row.mac != anchor.mac or audit.instant(row.at) != anchor.at:
        return [Problem(anchor.seq, None, f"entry {anchor.seq} is not the anchored one (made {anchor.at}): the chain "
                                          "was rewritten since the anchor")]
    return []


def head(engine: Engine) -> Anchor | None:
    """The chain's last entry as an anchor (None while it is empty)."""
    with _snapshot(engine) as connection:
        row = connection.execute(select(_ENTRIES.c.seq, _ENTRIES.c.mac, _ENTRIES.c.at)
                                 .order_by(_ENTRIES.c.seq.desc()).limit(1)).first()
    return Anchor(row.seq, row.mac, audit.instant(row.at)) if row else None


def log(engine: Engine, reference: str | None = None, since: datetime | None = None,
        limit: int = 200) -> list[LogLine]:
    """Entries newest first (the latest access is what one looks for), of ticket *reference* if
    given, from *since* on; an event's entry shows the event's detail as stored now."""
    query = (select(_ENTRIES, _TICKETS.c.reference, _EVENTS.c.detail.label("event_detail"))
             .outerjoin(_TICKETS, _TICKETS.c.id == _ENTRIES.c.ticket_id)
             .outerjoin(_EVENTS, _EVENTS.c.id == _ENTRIES.c.event_id)
             .order_by(_ENTRIES.c.seq.desc()).limit(limit))
    if reference is not None:
        query = query.where(_TICKETS.c.reference == reference.upper())
    if since is not None:
        query = query.where(_ENTRIES.c.at >= since)
    with _snapshot(engine) as connection:
        return [LogLine(row.seq, row.at, row.actor, row.action, row.reference,
                        row.event_detail if row.event_id is not None and row.event_detail is not None else row.detail)
                for row in connection.execute(query)]
