"""Held mail: stored messages that made no ticket of their own (a decision in HELD_DECISIONS, or
processing failed on them), counted, named and purged.

Counts are one GROUP BY over the window's held rows, found through the (status, processed_at)
index: the digest, the metrics and ``intake stats`` cost the same for ten tickets or a hundred
thousand. A message is held from when it was processed (``processed_at``), so a window means
"became held in it". The purge ([retention] held, run by ``intake purge``) deletes old held
messages in bounded batches, each one transaction that also adds its count to the run's
``purge_log`` row, so the count is exact even if the purge is interrupted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, exists, func, or_, select
from sqlmodel import Session

from intake.store import inbound
from intake.store.db import read_session, write_session
from intake.store.models import InboundMessage, PurgeLog, ThreadEntry
from intake.tickets import erasure
from intake.understand.header_text import display_value, first_values, scan_header_block
from intake.vocabulary import AUTO_REPLY, HELD_DECISIONS, SPAM, InboundStatus, PurgeKind

HELD_STATUSES = (InboundStatus.IGNORED, InboundStatus.FAILED)
# What each held message is counted as: its decision, or "failed" (processing failed: no decision).
HELD_LABELS = (*HELD_DECISIONS, InboundStatus.FAILED)
PURGE_BATCH = 500
MAX_PURGE_BATCHES = 1_000_000  # a bound on the loop, far above any mailbox (5e8 messages)
SUBJECT_LIMIT = 200  # characters of a subject shown in a list
_HEADER_BYTES = 16 * 1024  # of a message read to find its subject: never the whole message

_message = InboundMessage.__table__.c


def _label(decision: str | None, status: str) -> str:
    return decision or status


def _window(since: datetime, until: datetime) -> ColumnElement[bool]:
    return and_(_message.status.in_(HELD_STATUSES), _message.processed_at > since, _message.processed_at <= until)


def counts(session: Session, since: datetime, until: datetime) -> dict[str, int]:
    """Held messages that became held after *since* up to *until*, per label."""
    rows = session.execute(select(_message.decision, _message.status, func.count())
                           .where(_window(since, until)).group_by(_message.decision, _message.status))
    by_label: Counter[str] = Counter()
    for decision, status, count in rows:
        by_label[_label(decision, status)] += count
    return dict(sorted(by_label.items(), key=lambda item: (-item[1], item[0])))


# The held messages worth a maintainer's look by name: upstream spam, failures, and automatic
# mail that threads into no ticket (a web form's report sent as auto-generated is one). Loops,
# backscatter, duplicates and refused replies are only counted.
_LISTED = or_(_message.status == InboundStatus.FAILED, _message.decision == SPAM,
              and_(_message.decision == AUTO_REPLY, _message.ticket_id.is_(None)))


@dataclass(frozen=True)
class HeldMessage:
    id: int
    label: str
    processed_at: datetime
    mail_from: str  # the envelope sender; '' for <>
    subject: str  # display-safe, one line, at most SUBJECT_LIMIT characters


def listed(session: Session, since: datetime, until: datetime, limit: int) -> tuple[int, list[HeldMessage]]:
    """How many held messages of the window are worth naming, and the newest *limit* of them."""
    condition = and_(_window(since, until), _LISTED)
    total = session.scalar(select(func.count()).select_from(InboundMessage).where(condition)) or 0
    rows = session.execute(inbound.with_raw(select(_message.id, _message.decision, _message.status,
                                                   _message.processed_at, _message.mail_from,
                                                   inbound.head_of_raw(session, _HEADER_BYTES), _message.data_key))
                           .where(condition).order_by(_message.processed_at.desc(), _message.id.desc()).limit(limit))
    return total, [HeldMessage(id_, _label(decision, status), processed_at, display_value(mail_from, 254),
                               _subject(inbound.open_head(session, head, data_key, _HEADER_BYTES)))
                   for id_, decision, status, processed_at, mail_from, head, data_key in rows]


def _subject(head: bytes) -> str:
    """The Subject: of a message's first bytes, decoded and made display-safe; '' when none."""
    subject = first_values(scan_header_block(head)).get("subject", "")
    return display_value(subject, SUBJECT_LIMIT).strip() or "(no subject)"


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    dry_run: bool
    by_decision: dict[str, int]  # per label: purged, or that would be
    complete: bool = True  # False only if MAX_PURGE_BATCHES stopped it

    @property
    def total(self) -> int:
        return sum(self.by_decision.values())

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat(), "dry_run": self.dry_run, "total": self.total,
                "by_decision": self.by_decision, "complete": self.complete}


def _purgeable(cutoff: datetime) -> ColumnElement[bool]:
    """Held, on no ticket (not even one it threads into or names), and both received and processed
    before *cutoff*: history imported today is not purged for its old Date:."""
    return and_(_message.status.in_(HELD_STATUSES), _message.ticket_id.is_(None),
                _message.processed_at < cutoff, _message.received_at < cutoff,
                ~exists().where(ThreadEntry.inbound_id == _message.id))


def purge_held(engine: Engine, now: datetime, older_than: timedelta, dry_run: bool = False,
               batch: int = PURGE_BATCH) -> PurgeResult:
    """Delete held messages older than *older_than* at *now* ([retention] held; count them only, if
    *dry_run*), through :func:`intake.tickets.erasure.erase_content`."""
    cutoff = now - older_than
    condition = _purgeable(cutoff)
    if dry_run:
        with read_session(engine) as session:
            rows = session.execute(select(_message.decision, _message.status, func.count())
                                   .where(condition).group_by(_message.decision, _message.status))
            return PurgeResult(cutoff, True, dict(Counter({_label(d, s): n for d, s, n in rows})))
    purged: Counter[str] = Counter()
    log_id: int | None = None
    for _ in range(MAX_PURGE_BATCHES):
        with write_session(engine) as session:
            # Locked in this transaction, so a message requeued or threaded meanwhile is not taken.
            rows = session.execute(select(_message.id, _message.decision, _message.status).where(condition)
                                   .order_by(_message.id).limit(batch).with_for_update()).all()
            if rows:
                erasure.erase_content(session, now, inbound_ids=[row.id for row in rows])
                purged.update(_label(decision, status) for _, decision, status in rows)
                log_id = erasure.log_purge(session, log_id, PurgeKind.HELD, now, cutoff, purged)
        if len(rows) < batch:
            return PurgeResult(cutoff, False, dict(purged))
    return PurgeResult(cutoff, False, dict(purged), complete=False)


def purged_total(session: Session) -> int:
    """Held messages purged, ever."""
    return int(session.scalar(select(func.coalesce(func.sum(PurgeLog.total), 0))
                              .where(PurgeLog.kind == PurgeKind.HELD)) or 0)
