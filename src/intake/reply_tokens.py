"""Maintainers' reply addresses: ``security+SEC-2026-0001.<token>@example.com``.

Every notification to a maintainer carries a reply address for that ticket and that maintainer;
its token is an HMAC of both under a secret, so it cannot be guessed from a reference or reused
by anyone else: mail to it counts as that maintainer's only when it comes from their address and
the token verifies (:func:`verify`). The secret comes from ``$CREDENTIALS_DIRECTORY/reply-secret``
or ``$INTAKE_REPLY_SECRET``; without one, intake makes a random secret once and keeps it in the
database, so every node shares it and it survives restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from datetime import datetime, timezone

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy import Engine

from intake import replies
from intake.config import Settings, read_secret
from intake.db import read_session, write_session
from intake.models import ServiceSecret

_SECRET_NAME = "reply-secret"
_TOKEN_LENGTH = 20  # base32 characters: 100 bits
TOKEN_PATTERN = re.compile(r"[a-z2-7]{%d}" % _TOKEN_LENGTH)


_secrets: dict[str, bytes] = {}  # by database URL: the secret never changes while we run


def secret(engine: Engine) -> bytes:
    """The signing secret: the operator's, else the one kept in the database (made on first use)."""
    given = read_secret(_SECRET_NAME)
    if given:
        return given.encode()
    key = engine.url.render_as_string(hide_password=False)
    if key not in _secrets:
        with read_session(engine) as session:
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
        _secrets[key] = stored.value.encode()
    return _secrets[key]


def token(secret: bytes, reference: str, maintainer: str) -> str:
    """The token of *maintainer*'s reply address for ticket *reference*."""
    digest = hmac.new(secret, f"{reference.upper()}\0{maintainer.lower()}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:_TOKEN_LENGTH]


def verify(secret: bytes, reference: str, candidate: str, sender: str) -> bool:
    """Whether *candidate* is the token of *sender*'s reply address for *reference*."""
    return hmac.compare_digest(token(secret, reference, sender), candidate.lower())


def reply_address(secret: bytes, intake_address: str, reference: str, maintainer: str) -> str:
    """``<local>+<REFERENCE>.<token>@<domain>`` on the ticket's intake address."""
    local, _, domain = intake_address.rpartition("@")
    return f"{local.split('+', 1)[0]}+{reference}.{token(secret, reference, maintainer)}@{domain}"


def reply_to(settings: Settings, secret: bytes, intake_address: str, reference: str, recipient: str) -> str:
    """The address a notification to *recipient* about *reference* asks replies to go to: their own
    signed reply address if they are a maintainer, else the ticket's +tag address (which threads
    only mail from maintainers and the reporter)."""
    if settings.is_maintainer(recipient):
        return reply_address(secret, intake_address, reference, recipient)
    return replies.thread_address(intake_address, reference)
