"""The two ways besides SMTP that mail enters intake, timed on given messages, each into a fresh
SQLite database (WAL, synchronous=FULL) with the shipped config.toml:

* ``import``: an mbox file of the messages, then ``intake import``'s own function
  (:func:`intake.run.mailbox_import.import_mailbox`): read, stored and processed into tickets
  batch by batch, as history (so no acknowledgement is queued);
* ``fetch``: a private Dovecot on loopback (the tests' ``tests/dovecot_harness.py``; Debian's
  dovecot-imapd, run as root) holding the messages in its INBOX, one
  :func:`intake.receive.fetch.fetch_once` pass (login, TLS and marking them seen included), then
  the processor until nothing is pending (tickets and queued acknowledgements, as for live mail).

Before the clock starts, each run starts intake's parse helper process (see :func:`warm_up`).

``throughput.py --modes smtp,import,fetch`` runs both beside its SMTP measurement on the same
messages; ``fetch.py`` times the fetch pass alone. Only 127.0.0.1 is contacted; every run is
bounded by the deadline it is given (past it, the run stops and is reported incomplete).
"""

from __future__ import annotations

import mailbox
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dovecot_harness import Dovecot, DovecotUnavailable, start_dovecot  # noqa: E402

from intake.config.settings import Settings, load_settings  # noqa: E402
from intake.receive.fetch import PassResult, fetch_once  # noqa: E402
from intake.run import mailbox_import, processor  # noqa: E402
from intake.store import schema  # noqa: E402
from intake.store.db import make_engine, read_session  # noqa: E402
from intake.store.models import Ticket  # noqa: E402
from intake.understand import parse_guard  # noqa: E402


class PastDeadline(Exception):
    """The run took longer than it was given: stopped where it was."""


@dataclass
class ModeResult:
    """One way in, on N messages."""

    mode: str  # "import" or "fetch"
    messages: int
    body_size: int = 0
    stored: int = 0
    tickets: int = 0
    store_seconds: float | None = None  # fetch: the IMAP pass alone; import stores and processes in one go
    seconds: float | None = None  # from the start until every message is processed (None: incomplete)
    unavailable: str | None = None  # why the mode could not run here (no Dovecot)

    @property
    def complete(self) -> bool:
        return self.seconds is not None and self.stored == self.messages

    @property
    def rate(self) -> float | None:
        """Messages per second into tickets."""
        return self.messages / self.seconds if self.complete and self.seconds else None

    @property
    def store_rate(self) -> float | None:
        return self.stored / self.store_seconds if self.store_seconds else None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "body_size": self.body_size, "messages": self.messages, "stored": self.stored,
                "tickets": self.tickets, "store_seconds": _rounded(self.store_seconds),
                "seconds": _rounded(self.seconds), "stored_per_second": _rounded(self.store_rate),
                "processed_per_second": _rounded(self.rate), "complete": self.complete,
                "unavailable": self.unavailable}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@contextmanager
def intake_settings(workdir: Path, recipient: str, extra_config: str = "") -> Iterator[Settings]:
    """The shipped config (plus *extra_config*) on a fresh SQLite database in *workdir*, migrated;
    the INTAKE_* variables it needs are set while it is in use, and the caller's restored after."""
    config = workdir / "config.toml"
    config.write_text((REPO / "config.toml").read_text() + extra_config)
    saved = {key: value for key, value in os.environ.items() if key.startswith("INTAKE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({"INTAKE_DATABASE__URL": f"sqlite:///{workdir / 'intake.db'}",
                       "INTAKE_SMTP__ADDRESSES": f'["{recipient}"]', "INTAKE_OUTBOUND__TRANSPORT": "maildir",
                       "INTAKE_OUTBOUND__MAILDIR": str(workdir / "outbox")})
    try:
        settings = load_settings(config)
        schema.upgrade(make_engine(settings.database_url))
        warm_up(settings)
        yield settings
    finally:
        parse_guard.close()  # the next mode starts (and warms) its own
        for key in [key for key in os.environ if key.startswith("INTAKE_")]:
            del os.environ[key]
        os.environ.update(saved)


def warm_up(settings: Settings) -> None:
    """Start the parse helper process before the clock starts (it imports the parser: a second or
    two), as throughput.py's warm-up message does for ``intake serve``."""
    parse_guard.parse_and_score(b"Subject: warm-up\r\n\r\nwarm-up\r\n", settings.quality_rules,
                                settings.processing.parse_timeout, settings.processing.message_budget)


def ticket_count(settings: Settings) -> int:
    with read_session(make_engine(settings.database_url)) as session:
        return session.scalar(select(func.count()).select_from(Ticket)) or 0


def measure_import(messages: list[bytes], workdir: Path, recipient: str, deadline: float) -> ModeResult:
    """`intake import` of an mbox holding *messages* (writing the mbox is not timed)."""
    result = ModeResult("import", len(messages), len(messages[0]) if messages else 0)
    path = workdir / "box.mbox"
    box = mailbox.mbox(path)
    for message in messages:
        box.add(message)
    box.flush()
    box.close()

    def check_deadline(done: int) -> None:
        if time.monotonic() > deadline:
            raise PastDeadline

    with intake_settings(workdir, recipient) as settings:
        started = time.perf_counter()
        try:
            imported = mailbox_import.import_mailbox(make_engine(settings.database_url), settings, path,
                                                     datetime.now(timezone.utc), progress=check_deadline)
        except PastDeadline:
            result.tickets = ticket_count(settings)
            return result
        result.seconds = time.perf_counter() - started
        result.stored, result.tickets = imported.imported, imported.tickets
    return result


def fetch_source(dovecot: Dovecot, workdir: Path, after: str = "seen") -> str:
    """A ``[[fetch]]`` source reading *dovecot*'s INBOX, as config text (its password in *workdir*)."""
    (workdir / "password").write_text(dovecot.password)
    return (f'\n[[fetch]]\nname = "bench"\nhost = "127.0.0.1"\nport = {dovecot.port}\n'
            f'ca_file = "{dovecot.ca_file}"\nuser = "{dovecot.user}"\npassword_file = "{workdir / "password"}"\n'
            f'after = "{after}"\n')


def fetch_pass(settings: Settings, deadline: float) -> PassResult:
    """One pass over the settings' first ``[[fetch]]`` source, stopped at *deadline*."""
    def check_deadline(done: PassResult) -> None:
        if time.monotonic() > deadline:
            raise PastDeadline

    return fetch_once(settings, settings.fetch[0], make_engine(settings.database_url), after_batch=check_deadline)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_fetch(messages: list[bytes], workdir: Path, recipient: str, deadline: float) -> ModeResult:
    """A Dovecot INBOX holding *messages* (filling it is not timed), fetched in one pass and processed."""
    result = ModeResult("fetch", len(messages))
    try:
        dovecot = start_dovecot(free_port())
    except DovecotUnavailable as exc:
        result.unavailable = str(exc)
        return result
    try:
        for start in range(0, len(messages), 200):
            dovecot.append(messages[start:start + 200])
        with intake_settings(workdir, recipient, fetch_source(dovecot, workdir)) as settings:
            started = time.perf_counter()
            try:
                result.stored = fetch_pass(settings, deadline).stored
            except PastDeadline:
                return result
            result.store_seconds = time.perf_counter() - started
            processor.process_all(make_engine(settings.database_url), settings, datetime.now(timezone.utc))
            elapsed = time.perf_counter() - started
            result.tickets = ticket_count(settings)
            if time.monotonic() <= deadline:
                result.seconds = elapsed
    finally:
        dovecot.stop()
        dovecot.remove()
    return result
