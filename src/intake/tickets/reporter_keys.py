"""Reporters' OpenPGP public keys (``reporter_key``): kept from the reports that carry one, or
given with ``intake key REF FILE``, and the keys mail is encrypted to.

Mail to an address is encrypted to the newest key on file for it; a maintainer's key is the
file ``openpgp_key`` of their ``[[maintainers]]`` entry. :func:`encryption_for` decides for one
mail: encrypted when every recipient has a key, else sent as it is (one mail per maintainer,
so a maintainer without a key never holds back another's encryption).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Engine, insert, select
from sqlmodel import Session

from intake import openpgp
from intake.config.settings import Settings
from intake.send.pgp_mime import Encryption
from intake.store.db import read_session, write_session
from intake.store.models import ReporterKey, Ticket
from intake.tickets.reads import find
from intake.tickets.records import add_event
from intake.vocabulary import SYSTEM_ACTOR, EventKind, KeySource


def keep(session: Session, address: str, armored_keys: Iterable[str], ticket_id: int, source: str,
         now: datetime, actor: str = SYSTEM_ACTOR) -> list[str]:
    """Keep *armored_keys* for *address* (those not on file already), each with an event on
    ticket *ticket_id* by *actor*; their fingerprints."""
    address = address.lower()
    known = set(session.scalars(select(ReporterKey.fingerprint).where(ReporterKey.address == address)))
    rows = []
    for armored in armored_keys:
        try:
            key = openpgp.read_public_key(armored.encode())
        except openpgp.OpenPgpError:
            continue
        if key.fingerprint not in known:
            known.add(key.fingerprint)
            rows.append(dict(address=address, fingerprint=key.fingerprint, armored=key.armored, ticket_id=ticket_id,
                             source=source, created_at=now))
    if rows:
        session.execute(insert(ReporterKey.__table__), rows)
    for row in rows:
        add_event(session, ticket_id, EventKind.REPORTER_KEY_ADDED, now, actor=actor, fingerprint=row["fingerprint"],
                  source=source, address=address)
    return [row["fingerprint"] for row in rows]


def newest(session: Session, addresses: Iterable[str]) -> dict[str, ReporterKey]:
    """The newest key on file for each of *addresses* that has one, by lowercased address."""
    wanted = {address.lower() for address in addresses if address}
    if not wanted:
        return {}
    rows = session.scalars(select(ReporterKey).where(ReporterKey.address.in_(sorted(wanted)))
                           .order_by(ReporterKey.created_at, ReporterKey.id))
    return {row.address: row for row in rows}  # later rows win: the newest


def of_address(session: Session, address: str) -> list[ReporterKey]:
    """Every key on file for *address*, oldest first."""
    return list(session.scalars(select(ReporterKey).where(ReporterKey.address == address.lower())
                                .order_by(ReporterKey.created_at, ReporterKey.id)))


def for_ticket(engine: Engine, reference: str) -> tuple[Ticket, list[ReporterKey]]:
    """Ticket *reference* and the keys on file for its reporter (TicketNotFound if none)."""
    with read_session(engine) as session:
        ticket = find(session, reference)
        return ticket, of_address(session, ticket.reporter)


def give(engine: Engine, reference: str, data: bytes, now: datetime, actor: str) -> tuple[Ticket, openpgp.PublicKey, bool]:
    """Keep the key in *data* for the reporter of ticket *reference* (`intake key REF FILE`), as
    *actor*: the ticket, the key, and whether it was new. OpenPgpError if *data* holds no usable key."""
    key = openpgp.read_public_key(data)
    with write_session(engine) as session:
        ticket = find(session, reference)
        added = keep(session, ticket.reporter, [key.armored], ticket.id, KeySource.GIVEN, now, actor)
    return ticket, key, bool(added)


def encryption_for(settings: Settings, keys: dict[str, str], recipients: Iterable[str]) -> Encryption | None:
    """How a mail to *recipients* is encrypted: to each one's key in *keys* (armored, by
    lowercased address), signed with the organisation's key; None when OpenPGP is off or a
    recipient has no key."""
    org = openpgp.org_key(settings)
    wanted = [keys.get(recipient.lower()) for recipient in recipients]
    if org is None or not wanted or None in wanted:
        return None
    return Encryption(tuple(wanted), org)


def keys_for(session: Session, settings: Settings, addresses: Iterable[str]) -> dict[str, str]:
    """The keys mail to *addresses* is encrypted to: maintainers' from their files, others' the
    newest on file, armored, by lowercased address."""
    found = {address: row.armored for address, row in newest(session, addresses).items()}
    return {**found, **openpgp.maintainer_keys(settings)}


def encryption_to(session: Session, settings: Settings, recipients: list[str]) -> Encryption | None:
    """How a mail to *recipients* is encrypted, from the keys on file and the maintainers' (see
    :func:`encryption_for`); no lookup when OpenPGP is off."""
    if openpgp.org_key(settings) is None:
        return None
    return encryption_for(settings, keys_for(session, settings, recipients), recipients)


def to_maintainer(settings: Settings, address: str) -> Encryption | None:
    """How a mail to maintainer *address* alone is encrypted: to their ``openpgp_key``, if any."""
    if openpgp.org_key(settings) is None:
        return None
    return encryption_for(settings, openpgp.maintainer_keys(settings), [address])
