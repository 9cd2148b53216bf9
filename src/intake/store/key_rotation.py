"""Storage keys over time: their files, the checks at start, rotation to a new storage key,
status, and sealing content stored before a key was set (``intake storage``; see
:mod:`intake.store.sealing`)."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlmodel import Session

from intake.config.settings import STORAGE_KEY_CREDENTIAL, ConfigError, Settings
from intake.store.db import read_session, write_session
from intake.store.models import InboundRaw
from intake.store.private_files import write_private
from intake.store.sealing import (
    DATA_KEYS, HEADER, MAGIC, SEALED_COLUMNS, STORAGE_KEY_BYTES, TABLES, TEXT_MARK, DataKeyValue, Keyring,
    SealingError, StorageKey, inline_key, inline_storage, keyring_of, new_key, open_inline, seal_bytes, seal_text,
    sealed_key_id, storage_key_of, ticket_key, unwrap_key, unwrapped, wrap_key,
)


def read_storage_key(path: Path) -> StorageKey:
    """The storage key in *path* (base64 of 32 bytes, as :func:`write_storage_key` writes it)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SealingError(f"storage key {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        secret = base64.b64decode(text, validate=True)
    except binascii.Error:
        secret = b""
    if len(secret) != STORAGE_KEY_BYTES:
        raise SealingError(f"storage key {path}: not a key made by `intake storage keygen` "
                           f"(base64 of {STORAGE_KEY_BYTES} bytes)")
    return StorageKey(secret, str(path))


def write_storage_key(path: Path) -> StorageKey:
    """Write a new random storage key to *path* (mode 0600); refuses to replace a file."""
    key = StorageKey(secrets.token_bytes(STORAGE_KEY_BYTES), str(path))
    write_private(path, base64.b64encode(key.secret) + b"\n", replace=False)  # FileExistsError if taken
    return key


def check(engine: Engine, keyring: Keyring) -> None:
    """Raise :class:`SealingError` unless every storage key the database's data keys are wrapped
    with is in *keyring*: refuse to start rather than fail on each read, or write plaintext into
    a database that holds sealed content. Of stored messages' keys only the newest is looked at
    (not a scan of every message, at every start): a rotation moves them all together."""
    inbound = TABLES["inbound_message"]
    with read_session(engine) as session:
        used = set(session.scalars(select(DATA_KEYS.c.storage_key).distinct()))
        newest = session.scalar(select(inline_storage(inbound)).where(inbound.c.data_key.is_not(None))
                                .order_by(inbound.c.id.desc()).limit(1))
    if newest is not None:
        used.add(bytes(newest).decode())
    if used and not keyring.enabled:
        raise SealingError(f"the database holds content sealed with storage key(s) {', '.join(sorted(used))}, "
                           "and no [storage] key_file (or storage-key credential) is set")
    missing = sorted(k for k in used if keyring.find(k) is None)
    if missing:
        raise SealingError(f"data keys are wrapped by storage key(s) {', '.join(missing)}, which are not loaded: "
                           "add the key file to [storage] key_file or previous_key_files")



@dataclass(frozen=True)
class RotationProgress:
    rewrapped: int  # data keys re-wrapped by this run
    remaining: int  # data keys still wrapped by another storage key


def rotate(engine: Engine, keyring: Keyring, batch: int = 500, max_batches: int | None = None,
           progress: Callable[[int], None] = lambda count: None) -> RotationProgress:
    """Re-wrap every data key (the ``data_key`` table's, then stored messages') under *keyring*'s
    current storage key, *batch* keys per committed transaction: a killed run loses at most one
    batch's work, and running it again goes on where it stopped. Readers keep working throughout
    (they find either key in the keyring). *max_batches* stops early (for a partial run);
    *progress* hears the count after each batch."""
    assert keyring.current is not None
    current, inbound = keyring.current, TABLES["inbound_message"]
    stale_table = DATA_KEYS.c.storage_key != current.id
    stale_inline = inbound.c.data_key.is_not(None) & (inline_storage(inbound) != current.id.encode())
    phases = [
        (select(DATA_KEYS.c.id, DATA_KEYS.c.storage_key, DATA_KEYS.c.wrapped).where(stale_table)
         .order_by(DATA_KEYS.c.id), _rewrap_table_key),
        (select(inbound.c.id, inbound.c.data_key, func.substr(_RAW.c.raw, 1, HEADER).label("head"))
         .join_from(inbound, _RAW, _RAW.c.id == inbound.c.id).where(stale_inline).order_by(inbound.c.id),
         _rewrap_inline_key),
    ]
    rewrapped = batches = 0
    for query, rewrap in phases:
        while max_batches is None or batches < max_batches:
            with write_session(engine) as session:
                rows = session.execute(query.limit(batch)).all()
                for row in rows:
                    rewrap(session, keyring, row)
            rewrapped += len(rows)
            batches += 1
            if rows:
                progress(rewrapped)
            if len(rows) < batch:
                break
    with read_session(engine) as session:
        remaining = sum(session.scalar(select(func.count()).select_from(table).where(stale)) or 0
                        for table, stale in ((DATA_KEYS, stale_table), (inbound, stale_inline)))
    return RotationProgress(rewrapped, remaining)


def _rewrap_table_key(session: Session, keyring: Keyring, row: Any) -> None:
    secret = unwrap_key(storage_key_of(keyring, row), row.id, bytes(row.wrapped))
    session.execute(update(DATA_KEYS).where(DATA_KEYS.c.id == row.id)
                    .values(storage_key=keyring.current.id, wrapped=wrap_key(keyring.current, row.id, secret)))


def _rewrap_inline_key(session: Session, keyring: Keyring, row: Any) -> None:
    key_id = sealed_key_id(bytes(row.head))
    open_inline(session, key_id, bytes(row.data_key))
    secret = unwrapped(session, key_id)
    inbound = TABLES["inbound_message"]
    session.execute(update(inbound).where(inbound.c.id == row.id).values(
        data_key=keyring.current.id.encode() + wrap_key(keyring.current, key_id, secret)))


_RAW = InboundRaw.__table__


def _stored_in(table: str, column: str) -> Any:
    """The table sealed column *table*.*column* is stored in: a stored message's bytes are in
    inbound_raw, sealed under the name ``inbound_message.raw`` (see InboundRaw)."""
    return _RAW if (table, column) == ("inbound_message", "raw") else TABLES[table]


def _plaintext(table: Any, column: str, text: bool) -> Any:
    """Rows of *table* whose *column* holds plaintext content (not empty, not sealed)."""
    col = table.c[column]
    marker = TEXT_MARK if text else MAGIC
    return (func.length(col) > 0) & (func.substr(col, 1, len(marker)) != marker)


def status(engine: Engine, keyring: Keyring) -> dict[str, Any]:
    """Data keys per storage key (and whether it is loaded), and plaintext rows per sealed column."""
    inbound = TABLES["inbound_message"]
    with read_session(engine) as session:
        by_key = Counter(dict(session.execute(select(DATA_KEYS.c.storage_key, func.count())
                                              .group_by(DATA_KEYS.c.storage_key)).all()))
        inline = inline_storage(inbound)
        by_key.update({bytes(key_id).decode(): count for key_id, count in session.execute(
            select(inline, func.count()).where(inbound.c.data_key.is_not(None)).group_by(inline))})
        plaintext = {f"{table}.{column}": session.scalar(select(func.count()).select_from(_stored_in(table, column))
                                                         .where(_plaintext(_stored_in(table, column), column, text)))
                     or 0 for table, column, text in SEALED_COLUMNS}
    return {
        "enabled": keyring.enabled,
        "current_key": keyring.current.id if keyring.current else None,
        "data_keys": [{"storage_key": key_id, "count": count, "loaded": keyring.find(key_id) is not None,
                       "current": keyring.current is not None and key_id == keyring.current.id}
                      for key_id, count in sorted(by_key.items())],
        "plaintext_rows": plaintext,
    }


def encrypt_existing(engine: Engine, now: datetime, batch: int = 200, max_batches: int | None = None) -> dict[str, int]:
    """Seal the plaintext content written before a key was set, *batch* rows per committed
    transaction (resumable like :func:`rotate`); returns rows sealed per column. A stored
    message's raw and trace get a key of their own (in its row), a ticket's entries and mail its
    key, a ticketless mail a key of its own."""
    if not keyring_of(engine).enabled:
        raise SealingError("no storage key set: nothing to encrypt with")
    done = {f"{table}.{column}": 0 for table, column, _ in SEALED_COLUMNS}
    batches = 0
    for table_name, column, text in SEALED_COLUMNS:
        table = _stored_in(table_name, column)
        inbound = TABLES["inbound_message"]
        owner = inbound.c.data_key if table_name == "inbound_message" else table.c.ticket_id
        query = select(table.c.id, table.c[column], owner).where(_plaintext(table, column, text))
        if table is not TABLES[table_name]:  # a message's bytes: its data key is in its inbound_message row
            query = query.join_from(table, inbound, inbound.c.id == table.c.id)
        while max_batches is None or batches < max_batches:
            with write_session(engine) as session:
                rows = session.execute(query.order_by(table.c.id).limit(batch)).all()
                for row in rows:
                    value = row[1] if text else bytes(row[1])
                    sealed = _sealed_existing(session, table_name, column, row, value, now)
                    session.execute(update(table).where(table.c.id == row.id).values({column: sealed.pop(column)}))
                    if sealed:  # a stored message's new data key
                        session.execute(update(inbound).where(inbound.c.id == row.id).values(sealed))
            done[f"{table_name}.{column}"] += len(rows)
            batches += 1
            if len(rows) < batch:
                break
    return done


def _sealed_existing(session: Session, table: str, column: str, row: Any, value: Any,
                     now: datetime) -> dict[str, Any]:
    """The values that seal *value* of *row* under the key its owner uses (see
    :func:`encrypt_existing`): the column's, and a stored message's new data key."""
    values: dict[str, Any] = {}
    if table == "inbound_message":
        if row[2] is None:  # its first column sealed: the message's key is made now
            values["data_key"], key = inline_key(keyring_of(session))
        else:  # raw and trace share the key its other column names
            other = session.execute(select(_RAW.c.raw, TABLES[table].c.trace)
                                    .join_from(TABLES[table], _RAW, _RAW.c.id == TABLES[table].c.id)
                                    .where(TABLES[table].c.id == row.id)).one()
            key_id = sealed_key_id(bytes(other.raw)) or sealed_key_id(other.trace)
            open_inline(session, key_id, bytes(row[2]))
            key = DataKeyValue(key_id, unwrapped(session, key_id))
    elif row[2] is not None:
        key = ticket_key(session, row[2], now)
    else:
        key = new_key(session, now)
    sealed = seal_text if isinstance(value, str) else seal_bytes
    values[column] = sealed(key, table, column, value)
    return values


def storage_keyring(settings: Settings, environ: dict[str, str] | None = None) -> Keyring:
    """The storage keys of *settings* ([storage] key_file, else ``$CREDENTIALS_DIRECTORY/storage-key``,
    and previous_key_files), read and checked; raises :class:`ConfigError` naming a bad one."""
    environ = os.environ if environ is None else environ
    current = settings.resolve_path(settings.storage.key_file) if settings.storage.key_file else None
    if current is None and environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / STORAGE_KEY_CREDENTIAL
        current = candidate if candidate.is_file() else None
    try:
        previous = tuple(read_storage_key(settings.resolve_path(p)) for p in settings.storage.previous_key_files)
        if current is None:
            if previous:
                raise SealingError("storage.previous_key_files is set but no storage.key_file")
            return Keyring()
        return Keyring(read_storage_key(current), previous)
    except SealingError as exc:
        raise ConfigError(f"storage: {exc}") from None
