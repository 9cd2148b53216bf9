"""The durable raw store: messages are committed here before the listener answers 250.

:func:`store` inserts arrivals in one committed transaction (the listener reaches it through
:mod:`intake.store.group_commit`); the rest reads stored messages back, one large one at a time.
"""

from __future__ import annotations

import hashlib
import functools
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, func, insert, select, text, update
from sqlmodel import Session

from intake.store.db import is_sqlite, read_session, sqlite_write_transaction, write_connection, write_session
from intake.store import sealing
from intake.store.models import InboundMessage, InboundRaw
from intake.vocabulary import InboundStatus

@dataclass(frozen=True)
class Arrival:
    """One message as the listener accepted it."""

    mail_from: str
    rcpt_tos: list[str]
    peer: str
    helo: str
    raw: bytes
    received_at: datetime
    relay: str = ""  # the trusted relay's peer, "" for a direct client
    trace: str = ""  # intake's Return-Path: and Received: fields, CRLF lines
    history: bool = False  # imported from an existing mailbox: nothing is sent for it
    message_id: str | None = None  # the Message-ID an import read (the listener reads none)
    arrived_at: datetime | None = None  # a fetched message's bounded INTERNALDATE: its SLA start


@dataclass(frozen=True)
class StoredMessage:
    """A stored message as the processor needs it."""

    id: int
    mail_from: str
    rcpt_tos: list[str]
    # As the client sent it (what sha256 is of); None once a large message let it go (see
    # without_raw): read it again with raw_of.
    raw: bytes | None
    sha256: str
    received_at: datetime  # when intake got it
    relay: str = ""
    trace: str = ""
    history: bool = False  # see Arrival.history
    arrived_at: datetime | None = None  # see Arrival.arrived_at

    @property
    def full(self) -> bytes:
        """The message with intake's trace fields on top: what is parsed, shown or exported whole."""
        assert self.raw is not None, "read its bytes again with raw_of"
        return full_message(self.trace, self.raw)

    def without_raw(self) -> StoredMessage:
        """This message without its bytes: what a processor keeps of a large one once parsed, so
        that it holds one large message at a time (:func:`raw_of` reads them again)."""
        return replace(self, raw=None)


def full_message(trace: str, raw: bytes) -> bytes:
    """*raw* with the *trace* fields stored beside it on top (RFC 5321 4.4: we prepend them)."""
    return trace.encode("utf-8") + raw if trace else raw


# The inbound_message columns :func:`_rows` gives a value for (and "raw", for inbound_raw).
_COLUMNS = ("received_at", "mail_from", "rcpt_tos", "peer", "helo", "relay", "trace", "size", "sha256", "status",
            "attempts", "history", "message_id", "arrived_at", "data_key")
_MESSAGES, _RAW = InboundMessage.__table__, InboundRaw.__table__


def _rows(engine: Engine, arrivals: Iterable[Arrival]) -> list[dict[str, object]]:
    """The inbound_message rows of *arrivals* (and under "raw" their inbound_raw bytes, sealed as
    they are written: see :func:`_sealed_raw`), their content sealed (when sealing is on) under a
    data key of each message's own, kept wrapped in its row (see :mod:`intake.store.sealing`)."""
    keyring = sealing.keyring_of(engine)
    rows = []
    for a in arrivals:
        data_key, key = sealing.inline_key(keyring) if keyring.enabled else (None, None)
        rows.append({
            "received_at": a.received_at,
            "mail_from": a.mail_from,
            "rcpt_tos": a.rcpt_tos,
            "peer": a.peer,
            "helo": a.helo,
            "relay": a.relay,
            "trace": sealing.seal_text(key, "inbound_message", "trace", a.trace),
            "size": len(a.raw),
            "sha256": sealing.content_digest(engine, a.raw),
            "raw": a.raw,
            "raw_key": key,
            "status": InboundStatus.PENDING,
            "attempts": 0,
            "history": a.history,
            "message_id": a.message_id,
            "arrived_at": a.arrived_at,
            "data_key": data_key,
        })
    return rows


def store(engine: Engine, arrivals: Iterable[Arrival]) -> list[int]:
    """Insert *arrivals* in one committed transaction; returns their ids in order."""
    rows = _rows(engine, arrivals)
    if is_sqlite(engine):
        return _store_sqlite(engine, rows)
    # Core on a plain connection, not ORM objects: this is the hot path in front of every 250.
    with write_connection(engine) as connection:
        return _insert(connection, rows)


def _insert(connection: Connection, rows: list[dict[str, object]]) -> list[int]:
    """One INSERT for all *rows*, one for their bytes; their ids in order. The rows come back in
    any order, and the content hash says which id is whose (identical messages may swap ids, which
    changes nothing)."""
    inserted = connection.execute(insert(_MESSAGES).returning(_MESSAGES.c.id, _MESSAGES.c.sha256),
                                  [{name: row[name] for name in _COLUMNS} for row in rows]).all()
    ids_by_hash: dict[str, list[int]] = defaultdict(list)
    for id_, sha256 in sorted(inserted):
        ids_by_hash[sha256].append(id_)
    ids = [ids_by_hash[row["sha256"]].pop(0) for row in rows]
    connection.execute(insert(_RAW), [{"id": id_, "raw": _sealed_raw(row)} for id_, row in zip(ids, rows)])
    return ids


def _store_sqlite(engine: Engine, rows: list[dict[str, object]]) -> list[int]:
    """:func:`store` on SQLite, on the driver's connection: a cached prepared INSERT per row, whose
    id is its ``lastrowid``. The values go through SQLAlchemy's bind processors for SQLite,
    so they are stored exactly as SQLAlchemy stores them (instants, JSON, bytes)."""
    sql, processors = _sqlite_insert(engine.dialect)
    with sqlite_write_transaction(engine) as connection:
        cursor = connection.cursor()
        ids = []
        for row in rows:
            cursor.execute(sql, [process(row[name]) if process else row[name] for name, process in processors])
            ids.append(cursor.lastrowid)
            if len(row["raw"]) < IN_PLACE_BYTES:
                cursor.execute(_SQLITE_INSERT_RAW, (ids[-1], _sealed_raw(row)))
            else:
                _write_in_place(connection, ids[-1], row)
        return ids


_SQLITE_INSERT_RAW = "INSERT INTO inbound_raw (id, raw) VALUES (?, ?)"
_SQLITE_INSERT_ZEROS = "INSERT INTO inbound_raw (id, raw) VALUES (?, zeroblob(?))"
# A message this large is written into its row in pieces of this size (SQLite's incremental blob
# I/O), sealed piece by piece. Bound whole, SQLite copied it twice (the bound value, then the
# record) and sealing it whole held it twice more (AES-GCM's output, then it behind its header).
IN_PLACE_BYTES = 1024 * 1024


def _sealed_raw(row: dict[str, Any]) -> bytes:
    return sealing.seal_bytes(row["raw_key"], "inbound_message", "raw", row["raw"])


def _write_in_place(connection: sqlite3.Connection, id_: int, row: dict[str, Any]) -> None:
    """*row*'s bytes, sealed, into a new inbound_raw row written as zeros (the record's last column:
    SQLite writes those to its pages without building them in memory), then over them."""
    key, raw = row["raw_key"], row["raw"]
    connection.execute(_SQLITE_INSERT_ZEROS, (id_, sealing.sealed_size(key, len(raw))))
    with connection.blobopen("inbound_raw", "raw", id_) as blob:
        for piece in sealing.seal_pieces(key, "inbound_message", "raw", raw, IN_PLACE_BYTES):
            blob.write(piece)


@functools.cache
def _sqlite_insert(dialect: Dialect) -> tuple[str, list[tuple[str, Callable[[object], object] | None]]]:
    """The INSERT of :func:`_store_sqlite` and each value's bind processor, in column order."""
    table = InboundMessage.__table__
    sql = f"INSERT INTO {table.name} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
    return sql, [(name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in _COLUMNS]


def pending(engine: Engine, limit: int) -> list[StoredMessage]:
    """The oldest pending messages, at most *limit* (claimed or not: see :mod:`intake.store.claims`)."""
    with read_session(engine) as session:
        ids = list(session.scalars(select(_MESSAGES.c.id).where(_MESSAGES.c.status == InboundStatus.PENDING)
                                   .order_by(_MESSAGES.c.id).limit(limit)))
    return list(by_ids(engine, ids))


# Bytes of small messages read by one query of by_ids.
READ_BYTES = 512 * 1024


def by_ids(engine: Engine, ids: list[int], read_bytes: int = READ_BYTES) -> Iterator[StoredMessage]:
    """The stored messages of *ids* (a batch's claim), in id order, each read with its bytes only
    when the one before has been taken: small messages are read together, up to *read_bytes* of
    them per query, a larger one alone, so the reader holds one large message at a time. No read
    transaction stays open while the caller works on what it was handed."""
    with read_session(engine) as session:
        rows = session.execute(_STORED.where(_MESSAGES.c.id.in_(ids)).order_by(_MESSAGES.c.id)).all()
    for group in byte_groups(rows, read_bytes):
        with read_session(engine) as session:
            raws = dict(session.execute(select(_RAW.c.id, _RAW.c.raw)
                                        .where(_RAW.c.id.in_([row.id for row in group]))).all())
            group = [_stored_message(session, row, raws.pop(row.id)) for row in group]
        while group:
            yield group.pop(0)  # not kept here once handed on


def byte_groups(items: Iterable[Any], budget: int, most: int | None = None) -> Iterator[list[Any]]:
    """*items* (each with a ``size`` in bytes) in order, in groups of at most *budget* bytes
    together but for a larger item alone, and of at most *most* items. A group goes as soon as it
    is full, before the next item is taken: from a lazy *items*, a large one is dealt with before
    the next is made. What one read (:func:`by_ids`), one claim (:mod:`intake.store.claims`) and
    one write transaction of the processor may hold."""
    group: list[Any] = []
    size = 0
    for item in items:
        if group and size + item.size > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += item.size
        if len(group) == most or size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group


# The columns of a StoredMessage but its bytes, its size, and the data_key that opens raw and trace.
_STORED = select(*(_MESSAGES.c[name] for name in (
    "id", "mail_from", "rcpt_tos", "sha256", "received_at", "relay", "trace", "history", "arrived_at", "size",
    "data_key")))


def _stored_message(session: Session, row: Any, raw: bytes) -> StoredMessage:
    return StoredMessage(row.id, row.mail_from, row.rcpt_tos, open_raw(session, raw, row.data_key), row.sha256,
                         row.received_at, row.relay, open_trace(session, row.trace, row.data_key), row.history,
                         row.arrived_at)


def open_raw(session: Session, raw: bytes, data_key: bytes | None) -> bytes:
    """A stored message's bytes (its inbound_raw value), opened with its row's *data_key*. Sealed
    under the name ``inbound_message.raw``, where they were before migration 0019."""
    return sealing.open_bytes(session, "inbound_message", "raw", raw, inline=data_key)


def open_trace(session: Session, trace: str, data_key: bytes | None) -> str:
    return sealing.open_text(session, "inbound_message", "trace", trace, inline=data_key)


def raw_of(session: Session, stored: StoredMessage) -> bytes:
    """*stored*'s bytes: those it holds, else read again (see :meth:`StoredMessage.without_raw`)."""
    if stored.raw is not None:
        return stored.raw
    row = session.execute(with_raw(select(_RAW.c.raw, _MESSAGES.c.data_key)).where(_RAW.c.id == stored.id)).one()
    return open_raw(session, row.raw, row.data_key)


def read_raw(session: Session, message: InboundMessage) -> bytes:
    """The bytes of stored message *message* (a row of *session*), opened."""
    return open_raw(session, session.scalar(select(_RAW.c.raw).where(_RAW.c.id == message.id)), message.data_key)


def with_raw(query: Any) -> Any:
    """*query* on inbound_message joined to each message's bytes (inbound_raw)."""
    return query.join_from(_MESSAGES, _RAW, _RAW.c.id == _MESSAGES.c.id)


def failed_ids(engine: Engine) -> list[int]:
    with read_session(engine) as session:
        query = select(InboundMessage.id).where(InboundMessage.status == InboundStatus.FAILED)
        return list(session.scalars(query))


def requeue(engine: Engine, ids: list[int]) -> list[int]:
    """Put failed or ignored messages back to pending; returns the ids that were requeued."""
    if not ids:
        return []
    table = InboundMessage.__table__
    with write_session(engine) as session:
        result = session.execute(
            update(table)
            .where(table.c.id.in_(ids), table.c.status.in_([InboundStatus.FAILED, InboundStatus.IGNORED]))
            .values(status=InboundStatus.PENDING, error=None)
            .returning(table.c.id)
        )
        return sorted(row[0] for row in result)


@dataclass(frozen=True)
class Got:
    """A stored message's row (detached, its trace opened) and its bytes (opened)."""

    message: InboundMessage
    raw: bytes


def get(engine: Engine, message_id: int) -> Got | None:
    """Stored message *message_id* with its content opened; None if there is none."""
    with read_session(engine) as session:
        row = session.get(InboundMessage, message_id)
        if row is None:
            return None
        session.expunge(row)
        raw = read_raw(session, row)
        row.trace = open_trace(session, row.trace, row.data_key)
        return Got(row, raw)


def head_of_raw(bind: Engine | Session, size: int) -> Any:
    """The column of a stored message's first *size* bytes, labelled ``head``: the whole sealed
    value when sealing is on (a sealed value's start opens nothing), for :func:`open_head` (with
    the row's ``data_key``). The query must be :func:`with_raw`."""
    raw = _RAW.c.raw
    return (raw if sealing.keyring_of(bind).enabled else func.substr(raw, 1, size)).label("head")


def open_head(session: Session, head: bytes | None, data_key: bytes | None, size: int) -> bytes:
    """The first *size* bytes of a stored message from :func:`head_of_raw`'s value."""
    return open_raw(session, bytes(head or b""), data_key)[:size]


def store_new_from(engine: Engine, peer: str, arrivals: Iterable[Arrival]) -> list[int]:
    """Store those of *arrivals* (all from *peer*, a fetch source) whose bytes are not stored from
    *peer* yet, nor repeated among them, in one committed transaction; returns the new ids.

    The check and the insert are one transaction under a lock per peer, so fetchers of one mailbox
    on two nodes (or a cron job beside the service) never both store a message: on SQLite the
    writer lock every intake writer takes; on PostgreSQL an advisory lock keyed by *peer*."""
    rows, hashes = [], set()
    for row in _rows(engine, arrivals):
        if row["sha256"] not in hashes:
            hashes.add(row["sha256"])
            rows.append(row)
    if not rows:
        return []
    table = InboundMessage.__table__
    with write_connection(engine) as connection:
        if not is_sqlite(engine):
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _peer_lock_key(peer)})
        known = set(connection.scalars(select(table.c.sha256).where(table.c.peer == peer,
                                                                    table.c.sha256.in_(sorted(hashes)))))
        new = [row for row in rows if row["sha256"] not in known]
        return _insert(connection, new) if new else []


def _peer_lock_key(peer: str) -> int:
    """A PostgreSQL advisory lock key (signed 64 bits) for *peer*'s fetches."""
    return int.from_bytes(hashlib.sha256(f"intake-fetch:{peer}".encode()).digest()[:8], "big", signed=True)
