"""The outbox: the only module that sends mail.

Mail is queued with :func:`enqueue` (or :func:`enqueue_many`) inside the transaction that decided
to send it; a unique dedupe key makes a second enqueue of the same notification a no-op. :class:`OutboxSender`
claims due rows under a short lease (so two processes never send the same row), hands them to
the transport, and records the outcome:

* delivered -> ``sent``;
* temporary failure (4xx, connection refused, timeout) -> retried with exponential backoff
  until ``give_up_after``, then ``dead``;
* permanent failure (5xx) -> ``dead`` at once;
* a temporary answer (4xx) for some recipients while the others got a final one (accepted, or
  refused for good) -> the row is ``sent`` (or ``dead``) for those others, and the deferred
  recipients go on in a new row queued in the same transaction: same message, Message-ID,
  envelope sender, ticket and kind, key ``<key>/deferred:<id>``, the usual backoff, and the
  original ``created_at``, so ``give_up_after`` still counts from when the mail was queued. As an
  MTA's queue does, a retry then goes to no one who has the message already.

Recipients the relay refused (at RCPT, some or all of them, or by its answer after DATA, those
refused at RCPT keeping their own answer), recipients deferred to a new row, and rows given up on
are handed, with the relay's answers, to the ``on_undelivered`` callback in the transaction that
records the row's outcome: the ticket's side of it (events, the reporter flagged unreachable) is
:mod:`intake.tickets.undeliverable`'s, never this module's.

A crash after the relay accepted a message but before ``sent`` was recorded (with the row for
any deferred recipients, in the same transaction) means that one message is sent again on
recovery, to all its recipients (RFC 1047's window, shared by every MTA); it carries the same
Message-ID, so the duplicate is recognisable.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiosmtplib
from sqlalchemy import Connection, Engine, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from intake.config.sections import OutboundSection, minimum_tls_version
from intake.config.settings import Settings, read_secret
from intake.send.composer import OutgoingMail
from intake.store import sealing
from intake.store.db import insert_new, read_session, write_connection, write_session
from intake.store.models import Outbox
from intake.store.private_files import private_directory, write_private
from intake.vocabulary import OutboxStatus

log = logging.getLogger(__name__)

CLAIM_BATCH = 50

# What happened to one claimed row, as long as we still hold its lease; the values to set are
# given with each execution. Built once: this runs once for every mail sent.
_RECORD = update(Outbox.__table__).where(Outbox.__table__.c.id == bindparam("row_id"),
                                         Outbox.__table__.c.lease_owner == bindparam("owner"))
# The rate limit's counts, for every chunk of new reports.
_AUTOMATIC_MAIL_COUNTS = (select(Outbox.__table__.c.rate_key, func.count())
                          .where(Outbox.__table__.c.rate_key.in_(bindparam("keys", expanding=True)),
                                 Outbox.__table__.c.created_at > bindparam("since"))
                          .group_by(Outbox.__table__.c.rate_key))


def enqueue(session: Session, mail: OutgoingMail, *, ticket_id: int | None, now: datetime) -> bool:
    """Queue *mail* unless its dedupe key is already queued; True when it was queued now."""
    return mail.dedupe_key in enqueue_many(session, [(mail, ticket_id)], now=now)


def enqueue_many(session: Session, mails: list[tuple[OutgoingMail, int | None]], *, now: datetime) -> set[str]:
    """Queue each mail (for its ticket) unless its dedupe key is already queued, in one statement;
    returns the dedupe keys queued now. The mail is sealed under its ticket's data key, a
    ticketless one under a key of its own (see :mod:`intake.store.sealing`)."""
    rows = [
        {
            "dedupe_key": mail.dedupe_key,
            "ticket_id": ticket_id,
            "kind": mail.kind,
            "envelope_from": mail.envelope_from,
            "recipients": mail.recipients,
            "rate_key": mail.recipients[0].lower() if mail.rate_limited else None,
            "message_id": mail.message_id,
            "raw": sealing.seal_for_ticket(session, ticket_id, now, "outbox", "raw", mail.raw),
            "status": OutboxStatus.PENDING,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }
        for mail, ticket_id in mails
    ]
    return insert_new(session, Outbox.__table__, "dedupe_key", rows)


def automatic_mail_counts(session: Session, recipients: Iterable[str], since: datetime) -> Counter[str]:
    """How many automatic mails were queued for each of *recipients* since *since*, by lowercased
    address (the rate limit's counts), in one query."""
    keys = {recipient.lower() for recipient in recipients}
    if not keys:
        return Counter()
    return Counter(dict(session.execute(_AUTOMATIC_MAIL_COUNTS, {"keys": list(keys), "since": since}).all()))


@dataclass(frozen=True)
class Refusal:
    """The relay's answer refusing one recipient of a message."""

    recipient: str
    code: int
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class Delivery:
    """What a transport reports for one message: *refused* names the recipients the relay would
    not take, with its answers (the others got it when *ok*)."""

    ok: bool
    permanent: bool = False
    detail: str = ""
    refused: tuple[Refusal, ...] = ()


@dataclass(frozen=True)
class Undelivered:
    """Mail of a ticket that did not reach everyone: what the outbox hands on, once per recorded
    attempt that had refusals or ended the row."""

    outbox_id: int
    ticket_id: int
    kind: str  # MailKind
    recipients: tuple[str, ...]  # those this attempt did not reach
    refused: tuple[Refusal, ...]  # this attempt's refusals, temporary ones included
    given_up: bool  # the row is done: no one it did not reach is tried again
    retried_in: int | None  # the new row the temporary refusals go on in, if any
    attempts: int
    detail: str  # the attempt's outcome as recorded in last_error


# Told in the transaction that records the row's outcome; it must not commit or roll back.
UndeliveredHook = Callable[[Connection, Undelivered, datetime], None]


class Transport:
    """Delivers claimed rows, yielding each outcome as soon as it is known (so it is recorded at once)."""

    def deliver(self, rows: list[Outbox]) -> AsyncIterator[tuple[Outbox, Delivery]]:
        raise NotImplementedError


class MaildirTransport(Transport):
    """Writes each message into a Maildir folder (for a laptop, a test, or a local MDA).

    Not with :mod:`mailbox`, which creates message files 0644 under umask 022: each is written
    0600 into tmp/ and linked into new/ (so a reader never sees half of one), named
    ``<seconds>.<random>.<host>`` as Maildir readers expect."""

    def __init__(self, path: Path):
        self._path = path
        for folder in ("tmp", "new", "cur"):
            private_directory(path / folder)
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")

    async def deliver(self, rows: list[Outbox]) -> AsyncIterator[tuple[Outbox, Delivery]]:
        for row in rows:
            try:
                name = f"{int(time.time())}.{uuid.uuid4().hex}.{self._host}"
                write_private(self._path / "new" / name, row.raw, replace=False, staging=self._path / "tmp")
                yield row, Delivery(True, detail=f"maildir {self._path}")
            except OSError as exc:
                yield row, Delivery(False, detail=f"maildir write failed: {exc}")


class SmtpTransport(Transport):
    """Delivers through the configured relay with aiosmtplib, one connection per batch.

    With ``starttls = true`` STARTTLS is required and verifies the relay's certificate and host
    name against the system's trust store, or against ``ca_file`` alone when one is set. A
    certificate that fails is an operator's problem, not the mail's: the batch is retried with
    backoff and an error names ``ca_file`` (sending in clear instead would hand the mail, and the
    login, to whoever could present that certificate). With ``starttls = false`` STARTTLS is
    opportunistic (RFC 7435, Postfix's ``may``): used when offered, certificate not verified,
    since a local MTA's self-signed certificate must not hold mail back that would otherwise go in
    clear; no login is ever sent that way (the configuration refuses a username without
    ``starttls = true``)."""

    def __init__(self, outbound: OutboundSection, password: str | None, hostname: str, ca_file: Path | None = None):
        self._outbound = outbound
        self._password = password
        self._hostname = hostname
        self._ca_file = ca_file
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._tls.minimum_version = minimum_tls_version(outbound.tls_min_version)
        if not outbound.starttls:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

    async def deliver(self, rows: list[Outbox]) -> AsyncIterator[tuple[Outbox, Delivery]]:
        relay = self._outbound.relay_address
        client = _Client(
            hostname=relay.host,
            port=relay.port,
            timeout=self._outbound.timeout,
            local_hostname=self._hostname,
            start_tls=self._outbound.starttls or None,  # None: when offered (RFC 7435), never required
            tls_context=self._tls,
        )
        try:
            await client.connect()
            if self._outbound.username:  # only with starttls = true (the configuration insists)
                await client.login(self._outbound.username, self._password or "")
        except ssl.SSLCertVerificationError as exc:
            log.error("event=relay-certificate-unverified relay=%s ca_file=%s error=%r: trust the relay's CA with "
                      "[outbound] ca_file", relay, self._ca_file or "(system trust store)", exc.verify_message)
            failure = Delivery(False, detail=f"relay certificate not verified ({exc.verify_message}); "
                                             f"trusted: {self._ca_file or 'the system store'} ([outbound] ca_file)")
            for row in rows:
                yield row, failure
            return
        except aiosmtplib.SMTPResponseException as exc:
            failure = Delivery(False, exc.code >= 500 and exc.code != 530, f"relay {exc.code} {exc.message}")
            for row in rows:
                yield row, failure
            return
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            for row in rows:
                yield row, Delivery(False, detail=f"relay unreachable: {exc}")
            return
        try:
            for row in rows:
                yield row, await self._send_one(client, row)
        finally:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                client.close()

    @staticmethod
    async def _send_one(client: _Client, row: Outbox) -> Delivery:
        # Non-ASCII addresses (RFC 6531) need SMTPUTF8 on MAIL FROM; a relay without it cannot take them.
        needs_utf8 = not all(address.isascii() for address in [row.envelope_from, *row.recipients])
        client.refused_at_rcpt.clear()
        try:
            errors, response = await client.sendmail(row.envelope_from, row.recipients, row.raw,
                                                     mail_options=["SMTPUTF8"] if needs_utf8 else None)
        except aiosmtplib.SMTPNotSupported as exc:
            return Delivery(False, True, f"relay cannot deliver this message: {exc}")
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = tuple(Refusal(r.recipient, r.code, r.message) for r in exc.recipients)
            return Delivery(False, all(r.permanent for r in refused), f"refused {_refusals(refused)}", refused)
        except aiosmtplib.SMTPDataError as exc:
            # The answer to the message is each accepted recipient's; one refused at RCPT keeps its own.
            refused = tuple(client.refused_at_rcpt.get(recipient) or Refusal(recipient, exc.code, exc.message)
                            for recipient in row.recipients)
            return Delivery(False, all(r.permanent for r in refused), f"relay {exc.code} {exc.message}"
                            + (f"; refused {_refusals(client.refused_at_rcpt.values())}" if client.refused_at_rcpt
                               else ""), refused)
        except aiosmtplib.SMTPResponseException as exc:
            return Delivery(False, exc.code >= 500, f"relay {exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            return Delivery(False, detail=f"relay connection lost: {exc}")
        except Exception as exc:  # noqa: BLE001 - recorded and retried with backoff, never a stuck lease
            log.exception("event=outbox-unexpected outbox_id=%s", row.id)
            return Delivery(False, detail=f"unexpected {type(exc).__name__}: {exc}")
        refused = tuple(Refusal(recipient, answer.code, answer.message) for recipient, answer in errors.items())
        # Some recipients refused at RCPT, the rest took it: sent, and the refused ones said.
        return Delivery(True, detail=f"relay: {response}" + (f"; refused {_refusals(refused)}" if refused else ""),
                        refused=refused)


class _Client(aiosmtplib.SMTP):
    """Keeps the relay's answers to RCPT of the message being sent: ``sendmail`` drops them when
    DATA then fails, and each refused recipient must keep its own answer."""

    def __init__(self, **options: object):
        super().__init__(**options)  # type: ignore[arg-type]
        self.refused_at_rcpt: dict[str, Refusal] = {}

    async def rcpt(self, recipient: str, *args: object, **kwargs: object) -> aiosmtplib.SMTPResponse:
        try:
            return await super().rcpt(recipient, *args, **kwargs)  # type: ignore[arg-type]
        except aiosmtplib.SMTPRecipientRefused as exc:
            self.refused_at_rcpt[recipient] = Refusal(recipient, exc.code, exc.message)
            raise


def _deferred(delivery: Delivery) -> tuple[str, ...]:
    """The recipients answered 4xx when others got a final answer (the message accepted for them,
    or refused for good): only those are tried again. Empty when the answer was the same for all."""
    temporary = tuple(r.recipient for r in delivery.refused if not r.permanent)
    final = delivery.ok or any(r.permanent for r in delivery.refused)
    return temporary if final else ()


def _refusals(refused: Iterable[Refusal]) -> str:
    return "; ".join(f"{r.recipient}: {r.code} {r.text}" for r in refused)


def make_transport(settings: Settings) -> Transport:
    if settings.outbound.transport == "maildir":
        return MaildirTransport(settings.maildir_path)
    ca_file = settings.resolve_path(settings.outbound.ca_file) if settings.outbound.ca_file else None
    return SmtpTransport(settings.outbound, read_secret("relay-password"), settings.hostname, ca_file)


def backoff(outbound: OutboundSection, attempts: int) -> timedelta:
    """Delay before the next try after *attempts* failed ones: initial, doubling, capped."""
    seconds = min(outbound.retry_initial * 2 ** max(attempts - 1, 0), outbound.retry_max)
    return timedelta(seconds=seconds)


class OutboxSender:
    """Claims due outbox rows, sends them, records what happened."""

    def __init__(self, engine: Engine, settings: Settings, transport: Transport, *, on_undelivered: UndeliveredHook,
                 on_record: Callable[[str], None] = lambda outcome: None):
        self._engine = engine
        self._on_undelivered = on_undelivered  # a ticket's mail refused or given up on (no default: never lost)
        self._on_record = on_record  # told each outcome recorded (the worker's metrics)
        self._outbound = settings.outbound
        self._transport = transport
        self._owner = uuid.uuid4().hex
        # One lease covers a claimed batch; expired leases are claimable again (a crashed sender).
        self._lease = timedelta(seconds=self._outbound.timeout * 2 + 5)

    def claim(self, now: datetime, limit: int = CLAIM_BATCH) -> list[Outbox]:
        table = Outbox.__table__
        # Not fsync'd: a lease lost to a power cut only lets the row be claimed again.
        with write_session(self._engine, durable=False) as session:
            due = (
                select(table.c.id)
                .where(
                    table.c.status == OutboxStatus.PENDING,
                    table.c.next_attempt_at <= now,
                    or_(table.c.lease_until.is_(None), table.c.lease_until < now),
                )
                .order_by(table.c.next_attempt_at, table.c.id)
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            ids = list(session.scalars(due))
            if not ids:
                return []
            session.execute(
                update(table).where(table.c.id.in_(ids)).values(lease_until=now + self._lease, lease_owner=self._owner)
            )
            rows = list(session.scalars(select(Outbox).where(Outbox.id.in_(ids)).order_by(Outbox.id)))
            session.expunge_all()  # their raw is opened for sending: never written back
        # Opened once the write lock is released: the listener's commits need not wait for it.
        return sealing.open_rows(self._engine, rows, "outbox", "raw")

    async def send_due(self, now: datetime) -> dict[str, int]:
        """Send one claimed batch; returns counts by outcome."""
        counts: dict[str, int] = {}
        rows = await asyncio.to_thread(self.claim, now)
        if not rows:  # no session with the relay for nothing: an idle intake polls every few seconds
            return counts
        async for row, delivery in self._transport.deliver(rows):
            # Recorded one by one: a crash can then resend at most the message in flight.
            outcome = await asyncio.to_thread(self.record, row, delivery, now)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def record(self, row: Outbox, delivery: Delivery, now: datetime) -> str:
        """Store what happened to *row*; returns 'sent', 'retry' or 'dead'. Recipients deferred
        (4xx) while others got a final answer go on in a new row (see the module's docstring)."""
        attempts = row.attempts + 1
        expired = now - row.created_at >= timedelta(seconds=self._outbound.give_up_after)
        deferred = _deferred(delivery) if not expired else ()
        values: dict[str, object] = {"attempts": attempts, "lease_until": None, "lease_owner": None}
        if deferred:
            values["recipients"] = [r for r in row.recipients if r not in deferred]
        if delivery.ok:
            outcome = "sent"
            values.update(status=OutboxStatus.SENT, sent_at=now, last_error=delivery.detail if delivery.refused else None)
        elif delivery.permanent or expired or deferred:  # with deferred ones: the others were refused for good
            outcome = "dead"
            values.update(status=OutboxStatus.DEAD, last_error=delivery.detail)
        else:
            outcome = "retry"
            values.update(next_attempt_at=now + backoff(self._outbound, attempts), last_error=delivery.detail)
        retried_in = None
        # Not fsync'd (WAL survives a process crash): a power cut can only make us send this mail
        # again, with the same Message-ID, which is the same risk every MTA takes (RFC 1047).
        with write_connection(self._engine, durable=False) as connection:
            recorded = connection.execute(_RECORD, {"row_id": row.id, "owner": self._owner, **values}).rowcount
            # Only while our lease held (else another sender has the row and tells its own outcome),
            # in this transaction: a crash records all or nothing, and the row is tried again whole.
            if recorded and deferred:
                retried_in = self._queue_deferred(connection, row, delivery, deferred, attempts, now)
            if recorded and row.ticket_id is not None and (delivery.refused or outcome == "dead"):
                unreached = [r.recipient for r in delivery.refused] if delivery.ok else row.recipients
                self._tell_undelivered(connection, Undelivered(
                    row.id, row.ticket_id, row.kind, tuple(r for r in unreached if r not in deferred),
                    delivery.refused, outcome != "retry" and not deferred, retried_in, attempts, delivery.detail), now)
        # A mail that will never reach anyone more is an operator's concern; the rest is routine.
        (log.warning if outcome == "dead" else log.info)(
            "event=outbox-%s outbox_id=%d key=%s to=%s attempts=%d detail=%r", outcome, row.id, row.dedupe_key,
            ",".join(r for r in row.recipients if r not in deferred), attempts, delivery.detail[:200])
        if retried_in is not None:
            log.info("event=outbox-deferred outbox_id=%d retry_id=%d to=%s", row.id, retried_in, ",".join(deferred))
        for refusal in delivery.refused:
            if refusal.permanent or not (outcome == "retry" or refusal.recipient in deferred):  # will not get it
                log.warning("event=outbox-refused outbox_id=%d key=%s recipient=%s answer=%r", row.id, row.dedupe_key,
                            refusal.recipient, f"{refusal.code} {refusal.text}"[:200])
        self._on_record(outcome)
        return outcome

    def _queue_deferred(self, connection: Connection, row: Outbox, delivery: Delivery, deferred: tuple[str, ...],
                        attempts: int, now: datetime) -> int:
        """The row that retries *deferred* (the same message); returns its id."""
        table = Outbox.__table__
        return connection.execute(insert(table), {
            "dedupe_key": f"{row.dedupe_key}/deferred:{row.id}",  # row.id: a row is split at most once
            "ticket_id": row.ticket_id, "kind": row.kind, "envelope_from": row.envelope_from,
            "recipients": list(deferred), "rate_key": None,  # the same mail: the rate limit counted it once
            # The row's raw as stored (sealed, if it is): the same mail under the same key.
            "message_id": row.message_id, "raw": connection.scalar(select(table.c.raw).where(table.c.id == row.id)),
            "status": OutboxStatus.PENDING, "attempts": attempts,
            "created_at": row.created_at,  # give_up_after counts from when the mail was queued
            "next_attempt_at": now + backoff(self._outbound, attempts),
            "last_error": _refusals(r for r in delivery.refused if r.recipient in deferred),
        }).inserted_primary_key[0]

    def _tell_undelivered(self, connection: Connection, undelivered: Undelivered, now: datetime) -> None:
        # In a savepoint: if recording it fails, the row's outcome still stands (sending the mail
        # again because a ticket event could not be written would be the worse failure).
        try:
            with connection.begin_nested():
                self._on_undelivered(connection, undelivered, now)
        except Exception:  # noqa: BLE001 - logged; the delivery outcome is recorded regardless
            log.exception("event=outbox-undelivered-not-recorded outbox_id=%d", undelivered.outbox_id)

    async def run(self, stop: asyncio.Event, wake: asyncio.Event, busy: asyncio.Event | None = None) -> None:
        """Send until *stop* is set; wakes on *wake* or every poll interval.

        While *busy* is set (the processor has a backlog of mail to act on), each wake-up sends one
        claimed batch rather than everything due: turning mail into tickets and queued replies
        comes first, and sending still goes on, at least ``CLAIM_BATCH`` mails per poll interval."""
        busy = busy or asyncio.Event()
        failed_polls = 0  # in a row, with the database unavailable
        while not stop.is_set():
            try:
                while not stop.is_set() and await self.send_due(datetime.now(timezone.utc)) and not busy.is_set():
                    pass
                if failed_polls:
                    log.info("event=outbox-database-available failed_polls=%d", failed_polls)
                failed_polls = 0
            except (OperationalError, InterfaceError) as exc:
                # Locked, restarting, unreachable: expected now and then, and it retries by itself. A
                # warning once, then one line per poll, never a traceback each time.
                failed_polls += 1
                (log.warning if failed_polls == 1 else log.info)(
                    "event=outbox-database-unavailable failed_polls=%d error=%r", failed_polls,
                    str(exc.orig or exc).splitlines()[0][:200])
            except Exception:  # noqa: BLE001 - nothing must end the sender; what this is, is unknown
                log.exception("event=outbox-error")
            wake.clear()
            try:
                await asyncio.wait_for(_first(stop, wake), timeout=self._outbound.poll_interval)
            except asyncio.TimeoutError:
                pass


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def listing(engine: Engine, status: str | None = None, limit: int = 200) -> list[Outbox]:
    with read_session(engine) as session:
        query = select(Outbox).order_by(Outbox.id.desc()).limit(limit)
        if status:
            query = query.where(Outbox.status == status)
        return list(session.scalars(query))


def counts(engine: Engine) -> dict[str, int]:
    with read_session(engine) as session:
        rows = session.execute(select(Outbox.status, func.count()).group_by(Outbox.status))
        return {status: count for status, count in rows}
