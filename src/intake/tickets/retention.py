"""Retention: what ``[retention]`` says is past its time, found and erased (``intake purge``, and
the scheduler once a day), then the database's files cleared of it.

Three kinds, each with its own period (None: kept forever):

* closed tickets (``after_close``): a ticket resolved or closed whose last change is older than
  the period; never an open one, never one labelled with ``legal_hold_label``. A ticket reopened
  after its purge and closed again is purged again once its period has passed.
* held messages (``held``): :func:`intake.tickets.held.purge_held`.
* sent mail (``sent_mail``): bodies of outbox rows sent (or given up on) longer ago than the
  period, except a legal-hold ticket's.

Each ticket is erased in a transaction of its own, with a ``content-purged`` event; every kind
keeps its count in a ``purge_log`` row per run. Erasing is :mod:`intake.tickets.erasure`;
clearing the files (SQLite WAL checkpoint, PostgreSQL VACUUM) :mod:`intake.store.reclaim`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.store import reclaim
from intake.store.db import read_session, write_session
from intake.store.models import Outbox, Ticket
from intake.tickets import erasure, held
from intake.tickets.records import add_event
from intake.vocabulary import FINISHED_STATES, SYSTEM_ACTOR, EventKind, OutboxStatus, PurgeKind

MAIL_BATCH = 500
MAX_MAIL_BATCHES = 1_000_000  # a bound on the loop, far above any outbox

_ticket = Ticket.__table__.c
_outbox = Outbox.__table__.c


@dataclass(frozen=True)
class TicketsPurged:
    cutoff: datetime
    purged: list[str]  # references erased (or that would be, on a dry run)
    legal_hold: list[str]  # due, but kept: labelled with the legal-hold label
    erased: erasure.Erased = erasure.Erased()

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat(), "purged": self.purged, "legal_hold": self.legal_hold,
                "rows": self.erased.as_dict()}


@dataclass(frozen=True)
class MailPurged:
    cutoff: datetime
    by_kind: dict[str, int]  # bodies erased (or that would be) per mail kind
    complete: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat(), "total": sum(self.by_kind.values()), "by_kind": self.by_kind,
                "complete": self.complete}


@dataclass(frozen=True)
class PurgeReport:
    """What one purge did, per kind (None: that kind is kept forever)."""

    now: datetime
    dry_run: bool
    tickets: TicketsPurged | None
    held: held.PurgeResult | None
    sent_mail: MailPurged | None
    reclaimed: reclaim.Reclaimed | None = None  # None: nothing was erased, or a dry run

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "dry_run": self.dry_run,
                "tickets": self.tickets.as_dict() if self.tickets else None,
                "held": self.held.as_dict() if self.held else None,
                "sent_mail": self.sent_mail.as_dict() if self.sent_mail else None,
                "reclaimed": self.reclaimed.as_dict() if self.reclaimed else None}

    @property
    def erased_anything(self) -> bool:
        return bool((self.tickets and self.tickets.purged) or (self.held and self.held.total)
                    or (self.sent_mail and self.sent_mail.by_kind))


def purge(engine: Engine, settings: Settings, now: datetime, dry_run: bool = False,
          rewrite: bool = False) -> PurgeReport:
    """Erase everything [retention] says is past its time at *now* (only find it, if *dry_run*),
    then clear the database's files of it (*rewrite*: VACUUM / VACUUM FULL as well)."""
    config = settings.retention
    after_close, held_for, sent_for = (config.period(name) for name in ("after_close", "held", "sent_mail"))
    label = config.legal_hold_label
    report = PurgeReport(
        now, dry_run,
        _purge_tickets(engine, now, now - after_close, label, dry_run) if after_close else None,
        held.purge_held(engine, now, held_for, dry_run) if held_for else None,
        _purge_sent_mail(engine, now, now - sent_for, label, dry_run) if sent_for else None)
    if dry_run or not (report.erased_anything or rewrite):
        return report
    return replace(report, reclaimed=reclaim.reclaim(engine, rewrite))


def purge_held_only(engine: Engine, now: datetime, older_than: timedelta,
                    dry_run: bool = False) -> tuple[held.PurgeResult, reclaim.Reclaimed | None]:
    """``intake messages purge``: held messages older than *older_than* only, the files cleared after."""
    result = held.purge_held(engine, now, older_than, dry_run)
    return result, (reclaim.reclaim(engine) if result.total and not dry_run else None)


def _due_tickets(cutoff: datetime) -> Any:
    """Finished, unchanged since before *cutoff*, and not purged since their last change."""
    return and_(_ticket.state.in_(FINISHED_STATES), _ticket.updated_at < cutoff,
                or_(_ticket.content_purged_at.is_(None), _ticket.content_purged_at < _ticket.updated_at))


def _purge_tickets(engine: Engine, now: datetime, cutoff: datetime, legal_hold_label: str,
                   dry_run: bool) -> TicketsPurged:
    with read_session(engine) as session:
        due = session.execute(select(_ticket.id, _ticket.reference, _ticket.labels)
                              .where(_due_tickets(cutoff)).order_by(_ticket.id)).all()
    on_hold = [reference for _, reference, labels in due if legal_hold_label in labels]
    wanted = [(ticket_id, reference) for ticket_id, reference, labels in due if legal_hold_label not in labels]
    if dry_run:
        return TicketsPurged(cutoff, [reference for _, reference in wanted], on_hold)
    purged: list[str] = []
    totals: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    log_id: int | None = None
    for ticket_id, reference in wanted:
        with write_session(engine) as session:
            outcome = _erase_ticket(session, ticket_id, now, cutoff, legal_hold_label)
            if outcome is None:  # reopened, changed or put on hold since it was found
                continue
            label, erased = outcome
            purged.append(reference)
            totals.update(erased.as_dict())
            by_outcome[label] += 1
            log_id = erasure.log_purge(session, log_id, PurgeKind.TICKET_CONTENT, now, cutoff, by_outcome)
    return TicketsPurged(cutoff, purged, on_hold, erasure.Erased(**totals))


def _erase_ticket(session: Session, ticket_id: int, now: datetime, cutoff: datetime,
                  legal_hold_label: str) -> tuple[str, erasure.Erased] | None:
    """Erase one ticket's content if it is still due (checked again under the lock): its close
    reason (or state) for the log and what was erased; None when it is not due any more."""
    row = session.execute(select(_ticket.state, _ticket.close_reason, _ticket.labels)
                          .where(_ticket.id == ticket_id, _due_tickets(cutoff)).with_for_update()).first()
    if row is None or legal_hold_label in row.labels:
        return None
    erased = erasure.erase_content(session, now, ticket_ids=[ticket_id])
    add_event(session, ticket_id, EventKind.CONTENT_PURGED, now, actor=SYSTEM_ACTOR,
              closed_before=cutoff.isoformat(), **erased.as_dict())
    return row.close_reason or row.state, erased


def _due_mail(cutoff: datetime) -> Any:
    return and_(_outbox.status.in_((OutboxStatus.SENT, OutboxStatus.DEAD)), func.length(_outbox.raw) > 0,
                func.coalesce(_outbox.sent_at, _outbox.next_attempt_at) < cutoff)


def _purge_sent_mail(engine: Engine, now: datetime, cutoff: datetime, legal_hold_label: str,
                     dry_run: bool) -> MailPurged:
    """Erase the bodies of mail sent (or given up on: its last attempt) before *cutoff*, in
    batches, except a legal-hold ticket's."""
    by_kind: Counter[str] = Counter()
    log_id: int | None = None
    after_id = 0  # rows are taken in id order: a held ticket's rows are passed over, not found again
    for _ in range(MAX_MAIL_BATCHES):
        with (read_session(engine) if dry_run else write_session(engine)) as session:
            rows = session.execute(select(_outbox.id, _outbox.kind, _outbox.ticket_id)
                                   .where(_due_mail(cutoff), _outbox.id > after_id)
                                   .order_by(_outbox.id).limit(MAIL_BATCH)).all()
            on_hold = _on_legal_hold(session, {row.ticket_id for row in rows if row.ticket_id}, legal_hold_label)
            taken = [row for row in rows if row.ticket_id not in on_hold]
            by_kind.update(row.kind for row in taken)
            if taken and not dry_run:
                erasure.erase_sent_mail(session, [row.id for row in taken])
                log_id = erasure.log_purge(session, log_id, PurgeKind.SENT_MAIL, now, cutoff, by_kind)
        if len(rows) < MAIL_BATCH:
            return MailPurged(cutoff, dict(sorted(by_kind.items())))
        after_id = rows[-1].id
    return MailPurged(cutoff, dict(sorted(by_kind.items())), complete=False)


def _on_legal_hold(session: Session, ticket_ids: set[int], legal_hold_label: str) -> set[int]:
    if not ticket_ids:
        return set()
    rows = session.execute(select(_ticket.id, _ticket.labels).where(_ticket.id.in_(ticket_ids)))
    return {ticket_id for ticket_id, labels in rows if legal_hold_label in labels}
