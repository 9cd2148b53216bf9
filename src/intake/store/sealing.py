"""Encryption at rest: report content sealed with AES-256-GCM under per-owner data keys.

With ``[storage] key_file`` (or the ``storage-key`` credential) set, every piece of report
content (a stored message's raw bytes and trace fields, a thread entry's text, an outgoing mail)
is written *sealed*:

    MAGIC (3 bytes) | version (1) | data key id (8) | nonce (12) | ciphertext + tag (16)

(text columns hold :data:`TEXT_MARK` + the same bytes in base64). A data key is 32 random bytes
wrapped (AES-256-GCM) by a storage key, recorded with that key's id. Each ticket has one (its
thread entries, its outgoing mail) and each ticketless outgoing mail one, in the ``data_key``
table, named by the id in the header. Each stored message has one of its own, kept in its row
(``inbound_message.data_key``, see :func:`inline_key`): the listener's commit in front of every 250
then writes no page more than in clear. The associated data binds a sealed value to its table,
column and data key, so a value moved to another column or owner does not open.

Deleting data keys (:func:`shred`) makes what they sealed unreadable in the database and in every
backup made since; backups made before keep their wrapped copy, readable with the storage key of
their time until that key is destroyed (README: "Encryption at rest").

Values without :data:`MAGIC` / :data:`TEXT_MARK` are plaintext (written before a key was set) and
read as they are; :func:`encrypt_existing` seals them. Readers call :func:`open_bytes` /
:func:`open_text` (with a stored message's ``data_key`` as *inline*), writers
:func:`seal_for_ticket` (or :func:`seal_bytes` / :func:`seal_text` with a key from :func:`new_key`
or :func:`inline_key`). The storage keys of a database are attached to its engine (:func:`attach`);
unwrapped data keys are cached per session or connection only, so a shred takes effect at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from intake.store.db import insert_new, read_session, write_session
from intake.store.models import DataKey, InboundMessage, Outbox, ThreadEntry

MAGIC = b"\x00iS"
VERSION = 1
TEXT_MARK = "\x1b[sealed]"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
HEADER = len(MAGIC) + 1 + _KEY_ID_BYTES
# Base64 characters after TEXT_MARK that hold the header (24 bytes of 4-byte-aligned input: 32 chars).
_TEXT_HEADER_CHARS = 4 * ((HEADER + _NONCE_BYTES) // 3)
STORAGE_KEY_BYTES = 32
STORAGE_ID_CHARS = 16  # a storage key's id, at the start of an inline data key
# The data key that keys the digests of stored messages (see :func:`content_digest`).
DIGEST_KEY_ID = 1  # random data key ids are 2 and up

# Every sealed column: (table, column, is text). What status, encrypt-existing and shred go through.
SEALED_COLUMNS = (("inbound_message", "raw", False), ("inbound_message", "trace", True),
                  ("thread_entry", "body_text", True), ("outbox", "raw", False))
TABLES = {"inbound_message": InboundMessage.__table__, "thread_entry": ThreadEntry.__table__,
           "outbox": Outbox.__table__}
DATA_KEYS = DataKey.__table__


class SealingError(Exception):
    """Content cannot be sealed or opened with the keys given: a configuration problem (exit 78)."""


class Shredded(LookupError):
    """The content's data key was deleted (crypto-shredded): it cannot be read any more."""


@dataclass(frozen=True)
class StorageKey:
    """A storage key (32 bytes) and its key id: a fingerprint that says nothing about the key."""

    secret: bytes = field(repr=False)
    source: str = ""

    @property
    def id(self) -> str:
        return hmac.new(self.secret, b"intake storage key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """The storage key new data keys are wrapped with (None: sealing is off) and older ones that
    data keys may still be wrapped with (during and until a rotation)."""

    current: StorageKey | None = None
    previous: tuple[StorageKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.current is not None

    def find(self, key_id: str) -> StorageKey | None:
        return next((k for k in (self.current, *self.previous) if k is not None and k.id == key_id), None)


OFF = Keyring()


@dataclass
class _Cache:
    """Data keys unwrapped in one session or connection (None: deleted), and tickets' key ids."""

    keys: dict[int, bytes | None] = field(default_factory=dict)
    tickets: dict[int, int] = field(default_factory=dict)


# -- which keys an engine uses ------------------------------------------------------------------

_keyrings: weakref.WeakKeyDictionary[Any, Keyring] = weakref.WeakKeyDictionary()
# Unwrapped data keys, per session or connection (never per process: a shred must take effect).
_caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()
# The digest key per pool: unlike data keys it is never shredded, and the listener needs it per message.
_digest_keys: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def attach(engine: Engine, keyring: Keyring) -> Engine:
    """Use *keyring* for every session and connection of *engine* (and of engines sharing its pool)."""
    _keyrings[engine.pool] = keyring
    return engine


def _pool(bind: Session | Connection | Engine) -> Any:
    """The connection pool behind *bind*: what an engine and its option-engines share."""
    if isinstance(bind, Session):
        bind = bind.get_bind()
    return bind.engine.pool if isinstance(bind, Connection) else bind.pool


def keyring_of(bind: Session | Connection | Engine) -> Keyring:
    """The keyring attached to *bind*'s engine; :data:`OFF` (no sealing) when none was."""
    return _keyrings.get(_pool(bind), OFF)


# -- data keys ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataKeyValue:
    """A data key, unwrapped: its id (the ``data_key`` row's) and its 32 bytes."""

    id: int
    secret: bytes = field(repr=False)


def wrap_key(storage: StorageKey, key_id: int, secret: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(storage.secret).encrypt(nonce, secret, f"intake data key {key_id}".encode())


def unwrap_key(storage: StorageKey, key_id: int, wrapped: bytes) -> bytes:
    try:
        return AESGCM(storage.secret).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:],
                                              f"intake data key {key_id}".encode())
    except InvalidTag:
        raise SealingError(f"data key {key_id} does not open with storage key {storage.id} "
                           "(the wrong key file, or the row was altered)") from None


def key_row(keyring: Keyring, now: datetime, ticket_id: int | None = None,
            key_id: int | None = None) -> tuple[dict[str, Any], DataKeyValue]:
    """A new data key: its ``data_key`` row (wrapped by the current storage key) and its value."""
    assert keyring.current is not None
    # Random, not a sequence: chosen before the row is written (see DataKey.id).
    key = DataKeyValue(key_id or 2 + secrets.randbelow(2 ** 63 - 2), secrets.token_bytes(32))
    row = {"id": key.id, "ticket_id": ticket_id, "storage_key": keyring.current.id,
           "wrapped": wrap_key(keyring.current, key.id, key.secret), "created_at": now}
    return row, key


def inline_key(keyring: Keyring) -> tuple[bytes, DataKeyValue]:
    """A new data key for one stored message: what its ``data_key`` column holds (the storage
    key's id, then the key wrapped by it) and its value."""
    assert keyring.current is not None
    key = DataKeyValue(2 + secrets.randbelow(2 ** 63 - 2), secrets.token_bytes(32))
    return keyring.current.id.encode() + wrap_key(keyring.current, key.id, key.secret), key


def open_inline(bind: Session | Connection, key_id: int, inline: bytes) -> None:
    """Unwrap a stored message's data key (its ``data_key`` column) into the cache of *bind*."""
    storage_id, wrapped = bytes(inline[:STORAGE_ID_CHARS]).decode(), bytes(inline[STORAGE_ID_CHARS:])
    storage = keyring_of(bind).find(storage_id)
    if storage is None:
        raise SealingError(f"a stored message's data key is wrapped by storage key {storage_id}, which is not "
                           "loaded: set [storage] key_file (or previous_key_files) to it")
    _cache(bind).keys[key_id] = unwrap_key(storage, key_id, wrapped)


def _cache(bind: Session | Connection) -> _Cache:
    return _caches.setdefault(bind, _Cache())


def new_key(bind: Session | Connection, now: datetime) -> DataKeyValue | None:
    """A data key of its own for one owner (a ticketless mail); None when sealing is off."""
    keyring = keyring_of(bind)
    if not keyring.enabled:
        return None
    row, key = key_row(keyring, now)
    bind.execute(DATA_KEYS.insert(), row)
    _cache(bind).keys[key.id] = key.secret
    return key


def ticket_key(bind: Session, ticket_id: int, now: datetime) -> DataKeyValue | None:
    """Ticket *ticket_id*'s data key, made now if it has none; None when sealing is off."""
    keyring = keyring_of(bind)
    if not keyring.enabled:
        return None
    tickets = _cache(bind).tickets
    if ticket_id not in tickets:
        key_id = bind.scalar(select(DATA_KEYS.c.id).where(DATA_KEYS.c.ticket_id == ticket_id))
        if key_id is None:
            row, _ = key_row(keyring, now, ticket_id=ticket_id)
            # ON CONFLICT DO NOTHING: another process may make the same ticket's key at the same time.
            insert = pg_insert if bind.get_bind().dialect.name == "postgresql" else sqlite_insert
            bind.execute(insert(DATA_KEYS).values(row).on_conflict_do_nothing(
                index_elements=[DATA_KEYS.c.ticket_id], index_where=DATA_KEYS.c.ticket_id.is_not(None)))
            key_id = bind.scalar(select(DATA_KEYS.c.id).where(DATA_KEYS.c.ticket_id == ticket_id))
        tickets[ticket_id] = key_id
    return DataKeyValue(tickets[ticket_id], unwrapped(bind, tickets[ticket_id]))


def make_ticket_keys(session: Session, ticket_ids: list[int], now: datetime) -> None:
    """Data keys for tickets just created (*ticket_ids*), in one statement; nothing when sealing is off."""
    keyring = keyring_of(session)
    if not keyring.enabled or not ticket_ids:
        return
    made = [key_row(keyring, now, ticket_id=ticket_id) for ticket_id in ticket_ids]
    session.execute(DATA_KEYS.insert(), [row for row, _ in made])
    cache = _cache(session)
    for ticket_id, (_, key) in zip(ticket_ids, made):
        cache.tickets[ticket_id] = key.id
        cache.keys[key.id] = key.secret


def preload(bind: Session | Connection, values: Iterable[bytes | str | None]) -> None:
    """Unwrap the data keys the sealed *values* name, in one query per 500 keys rather than one
    each: for readers about to open many values (a processing batch)."""
    _load_keys(bind, {key_id for value in values if (key_id := sealed_key_id(value))})


def _load_keys(bind: Session | Connection, key_ids: set[int]) -> None:
    """Unwrap data keys *key_ids* into the cache of *bind* (None for those deleted)."""
    cache = _cache(bind).keys
    keyring = keyring_of(bind)
    for chunk in _chunks(sorted(key_ids - set(cache))):
        found = bind.execute(select(DATA_KEYS.c.id, DATA_KEYS.c.storage_key, DATA_KEYS.c.wrapped)
                             .where(DATA_KEYS.c.id.in_(chunk))).all()
        cache.update({row.id: unwrap_key(storage_key_of(keyring, row), row.id, bytes(row.wrapped)) for row in found})
        cache.update({key_id: None for key_id in chunk if key_id not in cache})  # deleted: shredded


def storage_key_of(keyring: Keyring, row: Any) -> StorageKey:
    """The storage key *row* (of ``data_key``) is wrapped by; :class:`SealingError` if not loaded."""
    storage = keyring.find(row.storage_key)
    if storage is None:
        raise SealingError(f"data key {row.id} is wrapped by storage key {row.storage_key}, which is not "
                           "loaded: set [storage] key_file (or previous_key_files) to it")
    return storage


def unwrapped(bind: Session | Connection, key_id: int) -> bytes:
    """Data key *key_id*, unwrapped; raises :class:`Shredded` if it was deleted."""
    cache = _cache(bind).keys
    if key_id not in cache:
        _load_keys(bind, {key_id})
    secret = cache[key_id]
    if secret is None:
        raise Shredded(f"data key {key_id} was deleted: this content was purged")
    return secret


# -- sealing and opening values -----------------------------------------------------------------

def _aad(table: str, column: str, key_id: int) -> bytes:
    return f"intake|{table}.{column}|{key_id}".encode()


def seal_bytes(key: DataKeyValue | None, table: str, column: str, data: bytes) -> bytes:
    """*data* sealed with *key* for *table*.*column*; *data* itself when *key* is None (sealing off)."""
    if key is None:
        return data
    nonce = os.urandom(_NONCE_BYTES)
    return _header(key) + nonce + AESGCM(key.secret).encrypt(nonce, data, _aad(table, column, key.id))


def _header(key: DataKeyValue) -> bytes:
    return MAGIC + bytes([VERSION]) + key.id.to_bytes(_KEY_ID_BYTES, "big")


def sealed_size(key: DataKeyValue | None, size: int) -> int:
    """The bytes :func:`seal_bytes` makes of *size* bytes."""
    return size if key is None else HEADER + _NONCE_BYTES + size + _TAG_BYTES


def seal_pieces(key: DataKeyValue | None, table: str, column: str, data: bytes, piece: int) -> Iterator[bytes]:
    """:func:`seal_bytes` in pieces of *piece* bytes (and the header, the tag): the same value once
    joined, but a large one is never held whole twice (sealed, and AES-GCM's output before it)."""
    view = memoryview(data)
    if key is None:
        yield from (view[at:at + piece] for at in range(0, len(data), piece))
        return
    nonce = os.urandom(_NONCE_BYTES)
    encryptor = Cipher(algorithms.AES(key.secret), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(_aad(table, column, key.id))
    yield _header(key) + nonce
    yield from (encryptor.update(view[at:at + piece]) for at in range(0, len(data), piece))
    yield encryptor.finalize() + encryptor.tag


def seal_text(key: DataKeyValue | None, table: str, column: str, text: str) -> str:
    """:func:`seal_bytes` for a text column: :data:`TEXT_MARK` and base64. Empty text stays empty."""
    if key is None or not text:
        return text
    return TEXT_MARK + base64.b64encode(seal_bytes(key, table, column, text.encode("utf-8"))).decode("ascii")


def seal_for_ticket(session: Session, ticket_id: int | None, now: datetime, table: str, column: str,
                    value: Any) -> Any:
    """*value* (bytes or text) sealed under ticket *ticket_id*'s data key (a new key of its own for
    no ticket: a ticketless mail); unchanged when sealing is off."""
    key = ticket_key(session, ticket_id, now) if ticket_id is not None else new_key(session, now)
    return seal_text(key, table, column, value) if isinstance(value, str) else seal_bytes(key, table, column, value)


def is_sealed(value: bytes | str | None) -> bool:
    if isinstance(value, str):
        return value.startswith(TEXT_MARK)
    return value is not None and bytes(value[:len(MAGIC)]) == MAGIC


def sealed_key_id(value: bytes | str | None) -> int | None:
    """The data key id a sealed value names; None for plaintext."""
    if not is_sealed(value):
        return None
    if isinstance(value, str):
        value = base64.b64decode(value[len(TEXT_MARK):len(TEXT_MARK) + _TEXT_HEADER_CHARS])
    return int.from_bytes(bytes(value[len(MAGIC) + 1:HEADER]), "big")


def open_bytes(bind: Session | Connection, table: str, column: str, value: bytes,
               inline: bytes | None = None) -> bytes:
    """The plaintext of a (possibly) sealed bytes value of *table*.*column*; *inline* is the data
    key of its row, for a stored message (its ``data_key`` column).

    Raises :class:`Shredded` when its data key was deleted, :class:`SealingError` when the
    storage key is not loaded or the value was altered or moved."""
    if not is_sealed(value):
        return bytes(value)
    value = bytes(value)
    if value[len(MAGIC)] != VERSION:
        raise SealingError(f"{table}.{column}: sealed with format version {value[len(MAGIC)]}, unknown here")
    key_id = int.from_bytes(value[len(MAGIC) + 1:HEADER], "big")
    if inline and not _cache(bind).keys.get(key_id):
        open_inline(bind, key_id, bytes(inline))
    secret = unwrapped(bind, key_id)
    sealed = memoryview(value)  # a slice of it would copy the whole message once more
    try:
        return AESGCM(secret).decrypt(sealed[HEADER:HEADER + _NONCE_BYTES], sealed[HEADER + _NONCE_BYTES:],
                                      _aad(table, column, key_id))
    except InvalidTag:
        raise SealingError(f"{table}.{column}: sealed content does not open with its data key {key_id} "
                           "(altered, or moved from another row)") from None


def open_rows(engine: Engine, rows: list[Any], table: str, column: str) -> list[Any]:
    """*rows* (detached objects) with their *column* opened in place, their keys read in one query."""
    if not keyring_of(engine).enabled:
        return rows
    with read_session(engine) as session:
        preload(session, [getattr(row, column) for row in rows])
        for row in rows:
            setattr(row, column, open_bytes(session, table, column, getattr(row, column)))
    return rows


def open_text(bind: Session | Connection, table: str, column: str, value: str, inline: bytes | None = None) -> str:
    """:func:`open_bytes` for a text column."""
    if not is_sealed(value):
        return value
    return open_bytes(bind, table, column, base64.b64decode(value[len(TEXT_MARK):]), inline).decode("utf-8")


def open_or_note(bind: Session | Connection, table: str, column: str, value: str) -> str:
    """:func:`open_text`, or a note saying the content was purged when its key was shredded."""
    try:
        return open_text(bind, table, column, value)
    except Shredded:
        return "(content purged)"


# -- digests of stored messages -----------------------------------------------------------------

def content_digest(bind: Session | Connection | Engine, raw: bytes) -> str:
    """What ``inbound_message.sha256`` holds for *raw*: its SHA-256 with sealing off, else an
    HMAC-SHA256 under the database's digest key, so the column cannot confirm a guessed message
    while redeliveries still find their twin. The digest key is a data key (never shredded,
    re-wrapped by a rotation), so digests survive a rotation of the storage key."""
    keyring = keyring_of(bind)
    if not keyring.enabled:
        return hashlib.sha256(raw).hexdigest()
    pool = _pool(bind)
    key = _digest_keys.get(pool)
    if key is None:
        key = _digest_keys[pool] = _load_digest_key(bind if isinstance(bind, Engine) else _engine_of(bind), keyring)
    return hmac.new(key, raw, hashlib.sha256).hexdigest()


def _engine_of(bind: Session | Connection) -> Engine:
    if isinstance(bind, Session):
        bind = bind.get_bind()
    return bind.engine


def _load_digest_key(engine: Engine, keyring: Keyring) -> bytes:
    """The digest key, made (in a transaction of its own) the first time it is needed."""
    with read_session(engine) as session:
        row = session.execute(select(DATA_KEYS.c.id, DATA_KEYS.c.storage_key, DATA_KEYS.c.wrapped)
                              .where(DATA_KEYS.c.id == DIGEST_KEY_ID)).first()
    if row is None:
        with write_session(engine) as session:
            created, _ = key_row(keyring, datetime.now(timezone.utc), key_id=DIGEST_KEY_ID)
            insert_new(session, DATA_KEYS, "id", [created])
        return _load_digest_key(engine, keyring)
    return unwrap_key(storage_key_of(keyring, row), DIGEST_KEY_ID, bytes(row.wrapped))


# -- shredding ----------------------------------------------------------------------------------

def shred(session: Session, ticket_ids: Iterable[int] = (), inbound_ids: Iterable[int] = ()) -> int:
    """Delete the data keys of tickets *ticket_ids* and stored messages *inbound_ids*, in the
    caller's transaction; returns how many were deleted. A ticket's keys are its own and every key
    its content is sealed under: its stored messages' (those on the ticket or in its thread), and
    any its entries or outgoing mail name (entries merged in from another ticket). A stored
    message's key is its ``data_key`` column, set to NULL. The sealed values stay where they are,
    unreadable: :func:`open_bytes` raises :class:`Shredded`."""
    tickets = sorted(set(ticket_ids))
    messages = set(inbound_ids)
    key_ids: set[int] = set()
    inbound, entries, outbox = TABLES["inbound_message"], TABLES["thread_entry"], TABLES["outbox"]
    for chunk in _chunks(tickets):
        messages.update(session.scalars(select(inbound.c.id).where(inbound.c.ticket_id.in_(chunk))))
        messages.update(session.scalars(select(entries.c.inbound_id).where(entries.c.ticket_id.in_(chunk),
                                                                          entries.c.inbound_id.is_not(None))))
        key_ids.update(session.scalars(select(DATA_KEYS.c.id).where(DATA_KEYS.c.ticket_id.in_(chunk))))
        key_ids.update(_named_keys(session, entries.c.body_text, entries.c.ticket_id.in_(chunk), text=True))
        key_ids.update(_named_keys(session, outbox.c.raw, outbox.c.ticket_id.in_(chunk), text=False))
    key_ids.discard(DIGEST_KEY_ID)
    deleted = 0
    for chunk in _chunks(sorted(messages)):
        deleted += session.execute(update(inbound).where(inbound.c.id.in_(chunk), inbound.c.data_key.is_not(None))
                                   .values(data_key=None)).rowcount or 0
    for chunk in _chunks(sorted(key_ids)):
        deleted += session.execute(delete(DATA_KEYS).where(DATA_KEYS.c.id.in_(chunk))).rowcount or 0
    _caches.pop(session, None)
    return deleted


def _named_keys(session: Session, column: Any, where: Any, *, text: bool) -> set[int]:
    """The data key ids the sealed values of *column* in the rows *where* name (from their headers)."""
    width = len(TEXT_MARK) + _TEXT_HEADER_CHARS if text else HEADER
    heads = session.scalars(select(func.substr(column, 1, width)).where(where))
    return {key_id for head in heads if (key_id := sealed_key_id(head if text else bytes(head or b"")))}


_CHUNK = 500


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]

def inline_storage(inbound: Any) -> Any:
    """The id of the storage key a stored message's data key is wrapped by (bytes)."""
    return func.substr(inbound.c.data_key, 1, STORAGE_ID_CHARS)


