"""The tamper-evident audit chain, write side: every event, and every maintainer's read of report
content, appended as one ``audit_entry`` MAC'd over the entry before it.

Entry *n* carries ``mac = HMAC-SHA256(key, mac(n-1) || canonical(n))``, where canonical(n) is
its seq, instant, actor, action, ticket, event id, detail and digest, and the digest is the
SHA-256 of the event row's own canonical content (id, ticket, instant, actor, kind, detail). So
editing, deleting, inserting or reordering an event row or an entry breaks the chain where it
happened (:mod:`intake.store.audit_verify` finds it), and whoever lacks the key cannot compute
the MACs of a rebuilt chain.

Events are written only through :func:`add_events`, which inserts them and queues them on the
session (or connection); :func:`record` queues any other entry (a read, a purge). The queue is
appended when the write transaction commits: :func:`sealing`, in
:func:`intake.store.db.write_session` and :func:`~intake.store.db.write_connection`. So

* on SQLite the writer lock that transaction holds already serialises appends;
* on PostgreSQL the append takes ``pg_advisory_xact_lock`` as the transaction's last lock and holds
  it for the append and the commit only: two nodes never fork the chain, and as its holder waits
  on nothing else, the lock can close no deadlock with the row locks taken before it.

The key: the credential ``audit-key`` (``$CREDENTIALS_DIRECTORY/audit-key``, or
``$INTAKE_AUDIT_KEY``), else ``[audit] key_file`` (:func:`configure`), else a key intake makes
once and keeps in the database (``service_secret``), which still catches any edit made without
recomputing the chain, but not someone with database access who does: check-config warns.
The key's fingerprint is recorded with the chain's first entry; a process with another key (or
none, where the chain has an operator's key) is refused (:class:`AuditKeyError`) rather than fork
the chain under a key verification would not accept.

The first append to an empty chain first seals every event already stored (a database from
before the chain), in id order, as ``sealed:<kind>`` entries stamped with that moment: history
from before is vouched for as of then, not as of when it happened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from functools import lru_cache
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake.config.settings import ConfigError, Settings, read_secret
from intake.store.models import AuditEntry, Event, ServiceSecret
from intake.vocabulary import AuditAction

KEY_CREDENTIAL = "audit-key"
_KEPT_KEY = "audit-key"  # a service_secret row: the key intake made, when the operator gave none
_FINGERPRINT = "audit-key-fingerprint"  # a service_secret row: which key the chain is MAC'd with
_STARTED = "audit-chain-started"  # a service_secret row: when the chain started (it is never empty after)
_MIN_KEY_LENGTH = 32  # characters of a given key: 32 bytes of base64 are 44
# Arbitrary, fixed: the one advisory lock every node's appends take on PostgreSQL.
CHAIN_LOCK = 0x696E74616B65
GENESIS = "0" * 64  # the prev_mac of entry 1
REKEYED = "rekeyed"  # the action of the entry recording a move to the operator's key
_PENDING = "intake_audit_pending"
_ENTRIES = AuditEntry.__table__
_EVENTS = Event.__table__
# Built once: the events are read back as stored, so the digest is of what verification will read.
_INSERT_EVENTS = insert(_EVENTS).returning(*_EVENTS.c)
_INSERT_ENTRIES = insert(_ENTRIES)
_LOCK = text("SELECT pg_advisory_xact_lock(:lock)")
_SECRETS = ServiceSecret.__table__


def _secret(name: str) -> Any:
    return select(_SECRETS.c.value).where(_SECRETS.c.name == name).scalar_subquery()


def _last(column: Any) -> Any:
    return select(column).order_by(_ENTRIES.c.seq.desc()).limit(1).scalar_subquery()


# What an append needs to know of the chain, in one statement (one round trip per transaction,
# not four): the key's recorded fingerprint, the kept key, when the chain started, and its head.
_STATE = select(_secret(_FINGERPRINT).label("fingerprint"), _secret(_KEPT_KEY).label("kept"),
                _secret(_STARTED).label("started"), _last(_ENTRIES.c.seq).label("seq"),
                _last(_ENTRIES.c.mac).label("mac"))

_key_files: dict[str, Path] = {}  # database URL -> [audit] key_file


class AuditKeyError(ConfigError):
    """This process's audit key is not the one the chain is MAC'd with (or it has none)."""


@dataclass(frozen=True)
class Pending:
    """An entry to append: an event row (as stored) or a record of something done."""

    at: datetime
    actor: str
    action: str
    ticket_id: int | None
    event_id: int | None
    detail: dict[str, Any]
    digest: str


# -- canonical forms -------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def instant(value: datetime) -> str:
    """An instant as the chain writes it: ISO 8601 in UTC."""
    return value.astimezone(timezone.utc).isoformat()


def event_digest(row: Any) -> str:
    """SHA-256 of an event row's canonical content, as read back from the database."""
    return hashlib.sha256(_canonical([row.id, row.ticket_id, instant(row.at), row.actor, row.kind,
                                      row.detail])).hexdigest()


def detail_digest(detail: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(detail)).hexdigest()


def entry_mac(key: bytes, prev_mac: str, seq: int, entry: Any) -> str:
    """The MAC of *entry* (a :class:`Pending` or a stored row) as entry *seq* after *prev_mac*."""
    body = _canonical([seq, instant(entry.at), entry.actor, entry.action, entry.ticket_id, entry.event_id,
                       entry.detail, entry.digest])
    return hmac.new(key, prev_mac.encode() + b"\n" + body, hashlib.sha256).hexdigest()


@lru_cache(maxsize=8)  # checked in every appending transaction; the key rarely changes
def fingerprint(key: bytes) -> str:
    """Names a key without revealing it."""
    return hmac.new(key, b"intake audit key fingerprint", hashlib.sha256).hexdigest()


# -- writing ---------------------------------------------------------------------------------


def add_events(bind: Session | Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert event rows (:func:`intake.tickets.records.event`) in one statement and queue them
    for the chain: the one way events are written."""
    if not rows:
        return
    stored = bind.execute(_INSERT_EVENTS, list(rows)).all()
    _pending(bind).extend(_event_entry(row, AuditAction.EVENT) for row in sorted(stored, key=lambda r: r.id))


def record(bind: Session | Connection, action: str, actor: str, now: datetime, ticket_id: int | None = None,
           **detail: Any) -> None:
    """Queue an entry saying *actor* did *action* (an :class:`~intake.vocabulary.AuditAction`, or
    another module's own, e.g. a purge) at *now*, on *ticket_id* if any; appended at commit."""
    _pending(bind).append(Pending(now, actor, action, ticket_id, None, detail, detail_digest(detail)))


@contextmanager
def sealing(bind: Session | Connection) -> Iterator[None]:
    """Append what the transaction queued when its body is done (before the commit); a failed
    body leaves nothing queued (a connection's info outlives the transaction)."""
    try:
        yield
        queued = bind.info.get(_PENDING)
        if queued:
            append(bind, queued, datetime.now(timezone.utc))
    finally:
        bind.info.pop(_PENDING, None)


def append(bind: Session | Connection, entries: Sequence[Pending], now: datetime) -> int:
    """Append *entries* after the chain's head, in this transaction; returns the new head's seq.
    An empty chain first seals the events stored before it (stamped *now*)."""
    # Core on the transaction's connection: an ORM session's execute costs several times the
    # statement, and this runs in every transaction that writes an event.
    connection = _connection(bind)
    lock_chain(connection)
    state = connection.execute(_STATE).one()  # after the lock: the head no other node can move now
    key = _key(connection, state, appending=True)
    if state.seq is None and state.started is None:
        entries = [*_history(connection, {entry.event_id for entry in entries}, now), *entries]
        _keep(connection, _STARTED, instant(now))
    seq, prev = (state.seq, state.mac) if state.seq is not None else (0, GENESIS)
    rows = []
    for entry in entries:
        seq += 1
        mac = entry_mac(key, prev, seq, entry)
        rows.append(dict(seq=seq, at=entry.at, actor=entry.actor, action=entry.action, ticket_id=entry.ticket_id,
                         event_id=entry.event_id, detail=entry.detail, digest=entry.digest, prev_mac=prev, mac=mac))
        prev = mac
    if rows:
        connection.execute(_INSERT_ENTRIES, rows)
    return seq


def lock_chain(bind: Session | Connection) -> None:
    """Hold the chain for this transaction: PostgreSQL's advisory lock (on SQLite, every write
    transaction holds the writer lock already)."""
    if _dialect(bind) == "postgresql":
        bind.execute(_LOCK, {"lock": CHAIN_LOCK})


def _connection(bind: Session | Connection) -> Connection:
    """The connection *bind*'s transaction runs on."""
    return bind.connection() if isinstance(bind, Session) else bind


def _pending(bind: Session | Connection) -> list[Pending]:
    return bind.info.setdefault(_PENDING, [])


def _event_entry(row: Any, prefix: str, at: datetime | None = None) -> Pending:
    return Pending(at or row.at, row.actor, prefix + row.kind, row.ticket_id, row.id, {}, event_digest(row))


def _history(bind: Session | Connection, queued: set[int | None], now: datetime) -> Iterable[Pending]:
    """Entries sealing every stored event not queued now, by whoever did it, as of *now*."""
    for row in bind.execute(select(_EVENTS).order_by(_EVENTS.c.id)):
        if row.id not in queued:
            yield _event_entry(row, AuditAction.SEALED, now)


# -- the key ---------------------------------------------------------------------------------


def configure(settings: Settings) -> None:
    """Take the key of the configured database from ``[audit] key_file`` (if set): called where an
    engine is made from the settings."""
    key_file = settings.audit.key_file
    if key_file is None:
        _key_files.pop(settings.database_url, None)
    else:
        _key_files[settings.database_url] = settings.resolve_path(key_file)


def key_warning(settings: Settings) -> str | None:
    """What check-config says about the audit key: None when one is given and readable, or in the
    shipped development configuration (spared production warnings). Raises :class:`ConfigError`
    when the one given cannot be used."""
    configure(settings)
    if given_key(settings.database_url) or settings.intake.development:
        return None
    return ("no audit key ([audit] key_file or the audit-key credential): the audit chain is MAC'd with a "
            "key kept in the database, so someone who can write the database can also rebuild the chain")


def given_key(url: str) -> tuple[bytes, str] | None:
    """The operator's key for the database at *url*, and where it came from; None if none is given."""
    credential = read_secret(KEY_CREDENTIAL)
    if credential:
        return _checked_length(credential, "the audit-key credential"), "the audit-key credential"
    path = _key_files.get(url)
    if path is None:
        return None
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"audit.key_file: cannot read {path}: {exc.strerror}") from None
    return _checked_length(value, f"audit.key_file {path}"), f"audit.key_file {path}"


def _checked_length(value: str, source: str) -> bytes:
    if len(value) < _MIN_KEY_LENGTH:
        raise ConfigError(f"{source}: {len(value)} characters; an audit key has at least {_MIN_KEY_LENGTH} "
                          "(head -c 32 /dev/urandom | base64)")
    return value.encode()


def _engine(bind: Session | Connection) -> Any:
    return bind.get_bind() if isinstance(bind, Session) else bind.engine


def _dialect(bind: Session | Connection) -> str:
    return _engine(bind).dialect.name


def _url(bind: Session | Connection) -> str:
    return _rendered(_engine(bind).url)


@lru_cache(maxsize=32)
def _rendered(url: Any) -> str:
    """A database URL as :func:`configure` keys it (URLs are immutable: rendered once each)."""
    return url.render_as_string(hide_password=False)


def chain_key(bind: Session | Connection, appending: bool = False) -> bytes:
    """The key the chain is MAC'd with (see the module's docstring): the given one, else the one
    kept in the database; *appending*, its fingerprint is recorded with the chain's first entry.
    Raises :class:`AuditKeyError` when it is not the key the chain was started with. Checked in
    every appending transaction (in the read of the chain's head), not once per process: a process whose key
    stopped being the chain's (`intake audit rekey`) is refused from its next write on."""
    return _key(bind, _connection(bind).execute(_STATE).one(), appending)


def _key(bind: Session | Connection, state: Any, appending: bool) -> bytes:
    """:func:`chain_key`, given the chain's *state* (:data:`_STATE`) as this transaction reads it."""
    given = given_key(_url(bind))
    recorded = state.fingerprint
    kept = None if given else state.kept
    if given:
        key, where = given
    elif kept is not None or recorded is None:  # the database's own key, made with the chain's first entry
        key, where = (kept or _make_kept_key(bind)).encode(), "the key kept in the database"
    else:
        raise AuditKeyError("the audit chain is MAC'd with the operator's key, and this process has none "
                            "([audit] key_file or the audit-key credential): every node and maintainer's "
                            "intake needs it")
    if recorded is not None and not hmac.compare_digest(recorded, fingerprint(key)):
        raise AuditKeyError(f"the audit chain is MAC'd with another key than this process has ({where}): "
                            "every node and maintainer's intake needs the same [audit] key_file")
    if recorded is None and appending:
        _keep(bind, _FINGERPRINT, fingerprint(key))
    return key




def _make_kept_key(bind: Session | Connection) -> str:
    """A key for intake to keep in the database (read back: another node may have made it first)."""
    _keep(bind, _KEPT_KEY, secrets.token_hex(32))
    kept = _get(bind, _KEPT_KEY)
    assert kept is not None
    return kept


def kept_key(bind: Session | Connection) -> bytes | None:
    """The key intake keeps in the database, if it made one."""
    kept = _get(bind, _KEPT_KEY)
    return kept.encode() if kept is not None else None


def take_key(bind: Session | Connection, key: bytes) -> None:
    """From now on the chain is MAC'd with *key* (the caller re-MAC'd it): its fingerprint is
    recorded and the key kept in the database deleted."""
    table = ServiceSecret.__table__
    bind.execute(delete(table).where(table.c.name.in_([_FINGERPRINT, _KEPT_KEY])))
    _keep(bind, _FINGERPRINT, fingerprint(key))


def started_at(bind: Session | Connection) -> str | None:
    """When the chain started (its first append), or None if it never did."""
    return _get(bind, _STARTED)


def _get(bind: Session | Connection, name: str) -> str | None:
    return bind.execute(select(ServiceSecret.__table__.c.value).where(ServiceSecret.__table__.c.name == name)).scalar()


def _keep(bind: Session | Connection, name: str, value: str) -> None:
    """Store *name* unless it is there (two nodes at once: the first insert wins)."""
    table = ServiceSecret.__table__
    statement = (pg_insert if _dialect(bind) == "postgresql" else sqlite_insert)(table)
    bind.execute(statement.values(name=name, value=value, created_at=datetime.now(timezone.utc))
                 .on_conflict_do_nothing(index_elements=["name"]))
