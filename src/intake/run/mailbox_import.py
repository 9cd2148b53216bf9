"""Importing an existing mailbox (mbox file or Maildir folder) as history: `intake import`.

Each message is stored in the inbound store as the listener would have stored it (line endings
made CRLF, as on the wire), as if received at its ``Date:`` (never in the future; unreadable: the
Maildir file's time or the mbox ``From`` line's date, else the import's own time), oldest first,
then run through the normal processor, so replies thread into the tickets their reports open.
Stored rows are marked ``history``: acting on them sends nothing (no acknowledgement, notice,
forward or command) unless the operator opts in for messages younger than a cutoff. The tickets
they open keep deadlines counted from the true arrival, and record when they were imported: the
SLA sweep mails nothing that fell due before then (see :mod:`intake.sla.reminders`); the result
says how many of them are open and how many of their stages were past due already. Mail in the
box from an intake address answering a report is the organisation's reply: the earliest one
records the ticket's acknowledgement at its Date: (see :mod:`intake.tickets.imported_replies`).

Importing twice adds nothing: a message whose bytes (sha256) are stored already, or whose
Message-ID a ticket's thread holds (or an earlier message of the same box had), is a duplicate.
The box is read twice, once for the headers (to sort and dedupe) and once to store each
message, so memory holds one batch of messages, not the box; each batch is processed before the
next is stored.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import mailbox
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from sqlalchemy import Engine

from intake.config.settings import Settings
from intake.run import processor
from intake.sla import deadlines
from intake.tickets import imported_replies
from intake.store import inbound, inbound_lookups, sealing
from intake.understand import addresses
from intake.understand.header_text import clean_text, first_message_id, message_ids
from intake.vocabulary import NEW_TICKET, InboundStatus

log = logging.getLogger(__name__)

# Messages stored per transaction.
_STORE_BATCH = 200

# The headers the first pass reads; the processor parses the whole message later.
_HEADERS = ("date", "message-id", "return-path", "from", "delivered-to", "to", "cc", "in-reply-to", "references")

_DURATION = re.compile(r"\s*(\d+)\s*(m|min|minutes?|h|hours?|d|days?|w|weeks?)\s*", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class NotAMailbox(ValueError):
    """PATH is neither an mbox file nor a Maildir folder."""


@dataclass
class ImportResult:
    """What one import did; ``imported + duplicates + failed`` is every message of the box."""

    imported: int = 0  # stored and processed (a ticket, a thread entry or held)
    duplicates: int = 0  # stored already, or earlier in the box: not stored again
    held: int = 0  # of the imported: stored but made no ticket entry (spam, auto-reply, bounce...)
    failed: int = 0  # could not be read from the box, or processing failed (stored as failed)
    tickets: int = 0  # tickets the imported messages opened
    acknowledged_by_replies: int = 0  # tickets acknowledged by the organisation's reply found in the box
    open_tickets: int = 0  # of those, still open (not resolved or closed)
    stages_past_due: int = 0  # their unmet stages past due at the import: counted, never mailed about
    acknowledged: int = 0  # messages stored to be acted on as new mail (--acknowledge)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"imported": self.imported, "duplicates": self.duplicates, "held": self.held,
                "failed": self.failed, "tickets": self.tickets,
                "acknowledged_by_replies": self.acknowledged_by_replies, "open_tickets": self.open_tickets,
                "stages_past_due": self.stages_past_due}


@dataclass(frozen=True)
class _Entry:
    """One message of the box as the first pass read it: enough to sort, dedupe and address it."""

    key: str
    received_at: datetime
    sha256: str
    message_id: str | None
    mail_from: str
    rcpt_tos: list[str]
    from_us: bool  # From: is an intake address: the organisation's own reply, if it answers something
    answers: tuple[str, ...]  # In-Reply-To, then References latest first


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``2w`` or ``7 days``: how young a message must be to be answered."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: expected e.g. '7d', '12h', '30m' or '2 weeks'")
    return timedelta(**{_UNITS[match[2][0].lower()]: int(match[1])})


def open_mailbox(path: Path) -> mailbox.Mailbox:
    """The mbox file or Maildir folder at *path*; :class:`NotAMailbox` for anything else."""
    if path.is_dir():
        if all((path / sub).is_dir() for sub in ("cur", "new", "tmp")):
            return mailbox.Maildir(path, factory=None, create=False)
        raise NotAMailbox(f"{path} is a folder but not a Maildir (it needs cur/, new/ and tmp/)")
    if not path.is_file():
        raise NotAMailbox(f"{path}: no such file or folder")
    with path.open("rb") as file:
        start = file.read(5)
    if start != b"From " and path.stat().st_size:
        raise NotAMailbox(f"{path} is not an mbox file (it does not start with a 'From ' line)")
    return mailbox.mbox(path, factory=None, create=False)


def import_mailbox(engine: Engine, settings: Settings, path: Path, now: datetime,
                   acknowledge_younger_than: timedelta | None = None,
                   progress: Callable[[int], None] = lambda done: None) -> ImportResult:
    """Import the mailbox at *path* as of *now* (see the module docstring). Messages younger than
    *acknowledge_younger_than* (if given) are acted on as new mail, acknowledgement included.
    *progress* is called with the number of messages just dealt with (:func:`box_size` in all)."""
    started = time.perf_counter()
    box = open_mailbox(path)
    result = ImportResult()
    peer = f"import:{path}"
    entries = _read_entries(box, settings, now, result, functools.partial(sealing.content_digest, engine))
    unreadable = result.failed
    fresh = _new_entries(engine, entries, result)
    cutoff = now - acknowledge_younger_than if acknowledge_younger_than is not None else None
    stored_ids: list[int] = []
    for start in range(0, len(fresh), _STORE_BATCH):
        arrivals = []
        for entry in fresh[start:start + _STORE_BATCH]:
            raw = _read_raw(box, entry.key, result)
            if raw is None:
                continue
            history = cutoff is None or entry.received_at < cutoff
            result.acknowledged += not history
            arrivals.append(inbound.Arrival(mail_from=entry.mail_from, rcpt_tos=entry.rcpt_tos, peer=peer,
                                            helo="", raw=raw, received_at=entry.received_at, history=history,
                                            message_id=entry.message_id))
        stored_ids += inbound.store(engine, arrivals)
        # Processed batch by batch, oldest first: a reply finds the ticket its report opened.
        processor.process_all(engine, settings, now)
        progress(len(fresh[start:start + _STORE_BATCH]))
    progress(result.duplicates + unreadable)
    # Counted from the rows, not the batch result: a running worker may have processed some.
    opened = []
    for status, decision, ticket_id in inbound_lookups.outcomes(engine, stored_ids):
        if status == InboundStatus.FAILED:
            result.failed += 1
            continue
        result.imported += 1
        result.held += status != InboundStatus.PROCESSED
        if decision == NEW_TICKET and ticket_id is not None:
            opened.append(ticket_id)
    result.tickets = len(opened)
    replies = [imported_replies.OwnReply(e.message_id, e.received_at, e.answers) for e in fresh if e.from_us]
    result.acknowledged_by_replies = len(imported_replies.acknowledge(engine, settings, replies, now))
    backlog = deadlines.backlog(engine, opened, now)
    result.open_tickets, result.stages_past_due = backlog.open_tickets, backlog.stages_past_due
    result.seconds = time.perf_counter() - started
    log.info("event=mailbox-imported path=%s imported=%d duplicates=%d held=%d failed=%d tickets=%d open=%d "
             "past_due=%d seconds=%.1f", path, result.imported, result.duplicates, result.held, result.failed,
             result.tickets, result.open_tickets, result.stages_past_due, result.seconds)
    return result


def _read_entries(box: mailbox.Mailbox, settings: Settings, now: datetime, result: ImportResult,
                  digest: Callable[[bytes], str]) -> list[_Entry]:
    """First pass: every readable message's headers and *digest* (what inbound_message.sha256
    holds, see :func:`intake.store.sealing.content_digest`), oldest first."""
    entries = []
    for key in list(box.keys()):
        raw = _read_raw(box, key, result)
        if raw is not None:
            entries.append(_entry(box, key, raw, settings, now, digest(raw)))
    entries.sort(key=lambda entry: entry.received_at)  # stable: equal dates keep the box's order
    return entries


def _read_raw(box: mailbox.Mailbox, key: str, result: ImportResult) -> bytes | None:
    """The message's bytes with CRLF line endings, as SMTP carries them; None if unreadable."""
    try:
        data = box.get_bytes(key)
    except (OSError, KeyError, ValueError, mailbox.Error) as exc:
        result.failed += 1
        result.errors.append(f"{key}: {exc}")
        log.warning("event=import-unreadable key=%s error=%r", key, exc)
        return None
    return re.sub(rb"\r?\n", b"\r\n", data)


def _entry(box: mailbox.Mailbox, key: str, raw: bytes, settings: Settings, now: datetime, digest: str) -> _Entry:
    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
        values = {name: [str(value) for value in headers.get_all(name, [])] for name in _HEADERS}
    except Exception:  # noqa: BLE001 - hostile headers: the message is still stored; the processor judges it
        values = {name: [] for name in _HEADERS}
    first = {name: found[0] if found else "" for name, found in values.items()}
    return _Entry(key=key, received_at=_received_at(box, key, first["date"], now),
                  sha256=digest, message_id=first_message_id(first["message-id"]),
                  mail_from=_envelope_sender(first["return-path"], values["from"]),
                  rcpt_tos=_recipients(settings, values["delivered-to"] + values["to"], values["cc"]),
                  from_us=bool(settings.our_address(addresses.sender(values["from"], [])[1])),
                  answers=(*message_ids(first["in-reply-to"]), *reversed(message_ids(first["references"]))))


def _received_at(box: mailbox.Mailbox, key: str, date: str, now: datetime) -> datetime:
    """The message's Date:, else the Maildir file's time or the mbox From line's date, else *now*;
    never after *now*."""
    when = _parse_date(date)
    if when is None:
        when = _box_date(box, key)
    return min(when or now, now)


def _parse_date(value: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _box_date(box: mailbox.Mailbox, key: str) -> datetime | None:
    try:
        if isinstance(box, mailbox.Maildir):
            return datetime.fromtimestamp(box.get_message(key).get_date(), timezone.utc)  # the file's time
        from_line = box.get_message(key).get_from()  # "sender asctime-date"
        return datetime.strptime(" ".join(from_line.split()[1:6]), "%a %b %d %H:%M:%S %Y").replace(
            tzinfo=timezone.utc)
    except (OSError, KeyError, ValueError, IndexError, mailbox.Error):
        return None


def _envelope_sender(return_path: str, from_values: list[str]) -> str:
    """Return-Path's address (an MTA wrote it from the envelope), else From's."""
    if return_path.strip():
        return clean_text(return_path.strip().strip("<>").strip(), 320)
    return addresses.sender(from_values, [])[1]


def _recipients(settings: Settings, to_values: list[str], cc_values: list[str]) -> list[str]:
    """The configured addresses among Delivered-To, To and Cc, else the first one configured."""
    listed = addresses.recipients(to_values, cc_values, [])
    ours: list[str] = []
    for address in listed.to + listed.cc:
        if settings.our_address(address) and address.lower() not in {o.lower() for o in ours}:
            ours.append(address)
    return ours or [settings.smtp.addresses[0]]


def _new_entries(engine: Engine, entries: list[_Entry], result: ImportResult) -> list[_Entry]:
    """*entries* not stored already and not repeating an earlier one of the box; counts the rest."""
    hashes = inbound_lookups.known_hashes(engine, (entry.sha256 for entry in entries))
    message_ids = inbound_lookups.known_message_ids(engine, (e.message_id for e in entries if e.message_id))
    fresh = []
    for entry in entries:
        if entry.sha256 in hashes or (entry.message_id and entry.message_id in message_ids):
            result.duplicates += 1
            continue
        hashes.add(entry.sha256)
        if entry.message_id:
            message_ids.add(entry.message_id)
        fresh.append(entry)
    return fresh


def box_size(path: Path) -> int:
    """How many messages the mailbox at *path* holds (for a progress bar: each is read, then stored)."""
    return len(open_mailbox(path))
