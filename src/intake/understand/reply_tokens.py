"""Maintainers' reply addresses: ``security+SEC-2026-0001.<issued><mac>@example.com``.

Every notification to a maintainer carries a reply address for that ticket and that maintainer:
``<issued>`` is the day it was made (4 base32 characters counting days since 1970-01-01) and
``<mac>`` an HMAC of the reference, the maintainer and that day under a secret, so it cannot be
guessed from a reference, reused by anyone else, or back-dated. It works until it is older than
``[sender_auth] reply_token_max_age``; a token from before tokens carried a date (20 characters,
no day) is treated as expired. Whose token it is, is found by trying every configured maintainer
(:func:`check`), so a refusal can be told to the real maintainer, never to a forged sender. A
valid token replayed within its age still verifies: only sender authentication stops a replay.

The secret comes from ``$CREDENTIALS_DIRECTORY/reply-secret`` (systemd ``LoadCredential=``) or
``$INTAKE_REPLY_SECRET``; without one, intake makes a random secret once and keeps it in the
database, so every node shares it and it survives restarts. ``intake secret rotate``
(:func:`rotate`) replaces the database's secret, and every earlier reply address stops working.
Each process caches the secret for ``CACHE_SECONDS`` only, so other nodes (and a running
``intake serve`` when the CLI rotated) use the new secret within that time.

A process with the operator's secret records its fingerprint (an HMAC of a fixed text, which
reveals nothing of the secret) in the database. A process without it (a maintainer's shell cannot
read the service's credential) then refuses to sign (:class:`SecretUnavailable`) rather than sign
with the database's secret, which the service would not accept: ``intake sweep`` run from a shell
would otherwise send notices whose reply addresses never work. A node whose credential differs
from the recorded one logs a warning: every node needs the same value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy import Engine, func, select

from intake.config.sections import SenderAuthSection
from intake.config.settings import SECRETS, ConfigError, Settings, read_secret
from intake.sla.calendars import parse_duration
from intake.store.db import read_session, write_session
from intake.store.models import ServiceSecret, Ticket
from intake.vocabulary import FINISHED_STATES

_SECRET_NAME = "reply-secret"
_FINGERPRINT_NAME = "reply-secret-fingerprint"  # a ServiceSecret row: the operator's secret is in use
_MAC_LENGTH = 20  # base32 characters: 100 bits
_DAY_LENGTH = 4  # base32 characters of the issue day: days since 1970 until the year 4840
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercased
_EPOCH = date(1970, 1, 1)
_TOKEN = re.compile(r"[a-z2-7]{%d}" % (_DAY_LENGTH + _MAC_LENGTH))
_OLD_TOKEN = re.compile(r"[a-z2-7]{%d}" % _MAC_LENGTH)  # before tokens carried their issue day
# [sender_auth] reply_token_max_age's default, for callers without settings.
DEFAULT_MAX_AGE = parse_duration(SenderAuthSection.model_fields["reply_token_max_age"].default).elapsed
CACHE_SECONDS = 30.0  # how long a process trusts its copy of the database's secret

# Outcomes of check().
VALID = "valid"
EXPIRED = "expired"
OLD_FORMAT = "old-format"
INVALID = "invalid"

_secrets: dict[str, tuple[float, bytes]] = {}  # by database URL: (_clock() when read, secret)
_fingerprinted: set[str] = set()  # database URLs this process recorded its operator secret's fingerprint in
_clock = time.monotonic
log = logging.getLogger(__name__)


class SecretUnavailable(ConfigError):
    """The service signs with the operator's secret, which this process cannot read."""


class SecretGiven(RuntimeError):
    """The secret is the operator's (credential or environment), not intake's to rotate."""


def given_by() -> str | None:
    """Where the operator's secret comes from, or None when intake keeps it in the database."""
    if not read_secret(_SECRET_NAME):
        return None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / _SECRET_NAME).is_file():
        return f"the credential file $CREDENTIALS_DIRECTORY/{_SECRET_NAME}"
    return f"the environment variable ${SECRETS[_SECRET_NAME]}"


def secret(engine: Engine) -> bytes:
    """The signing secret: the operator's, else the one kept in the database (made on first use)."""
    given = read_secret(_SECRET_NAME)
    key = engine.url.render_as_string(hide_password=False)
    if given:
        if key not in _fingerprinted:
            _record_fingerprint(engine, _fingerprint(given.encode()))
            _fingerprinted.add(key)
        return given.encode()
    cached = _secrets.get(key)
    if cached is not None and _clock() - cached[0] < CACHE_SECONDS:
        return cached[1]
    with read_session(engine) as session:
        if session.get(ServiceSecret, _FINGERPRINT_NAME) is not None:
            raise SecretUnavailable(
                "maintainers' reply addresses are signed with the service's own secret (the credential "
                f"{_SECRET_NAME}, or ${SECRETS[_SECRET_NAME]}), which this process cannot read, so it would "
                "send reply addresses that never work. Leave this to the running service (its scheduler "
                "sweeps and processes on its own), or run the command as root with "
                "CREDENTIALS_DIRECTORY=/etc/intake/credentials")
        stored = session.get(ServiceSecret, _SECRET_NAME)
    if stored is None:
        with write_session(engine) as session:
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            # Two nodes making one at once: the first insert wins and both read it back.
            session.execute(insert(ServiceSecret.__table__).values(
                name=_SECRET_NAME, value=secrets.token_hex(32), created_at=datetime.now(timezone.utc))
                .on_conflict_do_nothing(index_elements=["name"]))
            stored = session.get(ServiceSecret, _SECRET_NAME)
    assert stored is not None
    _secrets[key] = (_clock(), stored.value.encode())
    return _secrets[key][1]


def _fingerprint(secret_bytes: bytes) -> str:
    return hmac.new(secret_bytes, b"intake reply-secret fingerprint", hashlib.sha256).hexdigest()


def _record_fingerprint(engine: Engine, fingerprint: str) -> None:
    """Note in the database that the operator's secret signs, warning when another one did."""
    with write_session(engine) as session:
        stored = session.get(ServiceSecret, _FINGERPRINT_NAME)
        if stored is None:
            session.add(ServiceSecret(name=_FINGERPRINT_NAME, value=fingerprint, created_at=datetime.now(timezone.utc)))
        elif stored.value != fingerprint:
            log.warning("event=reply-secret-differs detail=%r", "this process's reply secret is not the one another "
                        "process recorded: every node needs the same value, or reply addresses fail between them")
            stored.value, stored.created_at = fingerprint, datetime.now(timezone.utc)


def rotate(engine: Engine, now: datetime) -> int:
    """Replace the database's secret with a new random one: every reply address made before stops
    working. Returns how many tickets are open (their maintainers get fresh reply addresses with
    their next notice). Raises :class:`SecretGiven` when the secret is the operator's (a credential
    or the environment): that one is replaced where it is kept, and intake restarted."""
    source = given_by()
    if source:
        raise SecretGiven(source)
    with write_session(engine) as session:
        if session.get(ServiceSecret, _FINGERPRINT_NAME) is not None:
            raise SecretGiven(f"the service's credential {_SECRET_NAME}")
        stored = session.get(ServiceSecret, _SECRET_NAME)
        if stored is None:
            session.add(ServiceSecret(name=_SECRET_NAME, value=secrets.token_hex(32), created_at=now))
        else:
            stored.value, stored.created_at = secrets.token_hex(32), now
        still_open = session.scalar(select(func.count()).select_from(Ticket)
                                    .where(Ticket.state.not_in(FINISHED_STATES)))
    _secrets.pop(engine.url.render_as_string(hide_password=False), None)
    return still_open or 0


def max_age(settings: Settings) -> timedelta:
    """How long a reply address works (``[sender_auth] reply_token_max_age``)."""
    return parse_duration(settings.sender_auth.reply_token_max_age).elapsed


def _day_number(when: datetime) -> int:
    return (when.astimezone(timezone.utc).date() - _EPOCH).days


def _day_code(day: int) -> str:
    return "".join(_ALPHABET[(day >> (5 * shift)) & 31] for shift in reversed(range(_DAY_LENGTH)))


def _mac(secret: bytes, message: str) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:_MAC_LENGTH]


def _dated_mac(secret: bytes, reference: str, maintainer: str, day: int) -> str:
    return _mac(secret, f"{reference.upper()}\0{maintainer.lower()}\0{day}")


def _old_mac(secret: bytes, reference: str, maintainer: str) -> str:
    """The token of a reply address made before tokens carried a day: known only to say whose it was."""
    return _mac(secret, f"{reference.upper()}\0{maintainer.lower()}")


def token(secret: bytes, reference: str, maintainer: str, issued: datetime) -> str:
    """The token of *maintainer*'s reply address for ticket *reference*, issued at *issued*."""
    day = _day_number(issued)
    return _day_code(day) + _dated_mac(secret, reference, maintainer, day)


@dataclass(frozen=True)
class TokenCheck:
    """What a reply address's token is: VALID, EXPIRED, OLD_FORMAT or INVALID; whose it is among the
    maintainers tried (None when INVALID); the day it was issued (None unless dated)."""

    status: str
    maintainer: str | None = None
    issued: date | None = None


def check(secret: bytes, reference: str, candidate: str, maintainers: Iterable[str], now: datetime,
          max_age: timedelta) -> TokenCheck:
    """Whose token *candidate* is for *reference*, trying each of *maintainers*, and whether it is
    still valid at *now*. Safe on any text (non-ASCII is INVALID)."""
    candidate = candidate.lower()
    if not candidate.isascii() or not reference.isascii():
        return TokenCheck(INVALID)
    if _OLD_TOKEN.fullmatch(candidate):
        for maintainer in maintainers:
            if hmac.compare_digest(_old_mac(secret, reference, maintainer).encode(), candidate.encode()):
                return TokenCheck(OLD_FORMAT, maintainer.lower())
        return TokenCheck(INVALID)
    if not _TOKEN.fullmatch(candidate):
        return TokenCheck(INVALID)
    day = 0
    for character in candidate[:_DAY_LENGTH]:
        day = day * 32 + _ALPHABET.index(character)
    mac = candidate[_DAY_LENGTH:].encode()
    for maintainer in maintainers:
        if hmac.compare_digest(_dated_mac(secret, reference, maintainer, day).encode(), mac):
            issued = _EPOCH + timedelta(days=day)
            age = timedelta(days=_day_number(now) - day)
            return TokenCheck(VALID if age <= max_age else EXPIRED, maintainer.lower(), issued)
    return TokenCheck(INVALID)


def verify(secret: bytes, reference: str, candidate: str, sender: str, now: datetime | None = None,
           max_age: timedelta = DEFAULT_MAX_AGE) -> bool:
    """Whether *candidate* is the valid token of *sender*'s reply address for *reference* at *now*
    (default: the current time)."""
    return check(secret, reference, candidate, [sender], now or datetime.now(timezone.utc), max_age).status == VALID


def reply_address(secret: bytes, intake_address: str, reference: str, maintainer: str,
                  now: datetime | None = None) -> str:
    """``<local>+<REFERENCE>.<token>@<domain>`` on the ticket's intake address, issued *now*
    (default: the current time)."""
    local, _, domain = intake_address.rpartition("@")
    issued = token(secret, reference, maintainer, now or datetime.now(timezone.utc))
    return f"{local.split('+', 1)[0]}+{reference}.{issued}@{domain}"


def thread_address(intake_address: str, reference: str) -> str:
    """The +tag form of *intake_address* that threads a reply into ticket *reference*:
    security+SEC-2026-0001@example.com (the router's first threading rule)."""
    local, _, domain = intake_address.rpartition("@")
    return f"{local}+{reference}@{domain}"


def reply_to(settings: Settings, secret: bytes, intake_address: str, reference: str, recipient: str,
             now: datetime) -> str:
    """The address a notification to *recipient* about *reference* asks replies to go to: their own
    signed reply address if they are a maintainer, else the ticket's +tag address (which threads
    only mail from maintainers and the reporter)."""
    if settings.is_maintainer(recipient):
        return reply_address(secret, intake_address, reference, recipient, now)
    return thread_address(intake_address, reference)
