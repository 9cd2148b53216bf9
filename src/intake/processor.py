"""Stored messages -> decisions -> tickets: the parse, route and act stages driven in batches.

A batch is parsed outside any transaction (parsing is the expensive part and needs no lock),
then acted on in one write transaction, one savepoint per message: a message that fails is
rolled back alone, marked ``failed`` with its error, and its raw bytes stay for
``intake reprocess``. A message is re-checked as still pending inside the transaction, so two
processors racing on the same rows act on each message once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlmodel import Session

from intake import inbound, route, tickets
from intake.config import Settings
from intake.db import write_session
from intake.inbound import StoredMessage
from intake.models import InboundMessage, InboundStatus
from intake.parse import ParsedMail, parse

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    decisions: Counter[str] = field(default_factory=Counter)
    failed: list[int] = field(default_factory=list)
    tickets_opened: list[str] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return sum(self.decisions.values()) + len(self.failed)


# Decisions that add to a ticket; everything else is stored and logged only.
_ACTED_ON = {route.NEW_TICKET, route.REPORTER_REPLY, route.MAINTAINER_REPLY}


@dataclass(frozen=True)
class Prepared:
    """The pure part of processing one message, done before any lock is taken."""

    stored: StoredMessage
    mail: ParsedMail | None
    quality: dict[str, Any]
    parse_seconds: float
    error: str | None = None


def prepare(settings: Settings, stored: StoredMessage) -> Prepared:
    started = time.perf_counter()
    try:
        mail = parse(stored.raw)
        quality = settings.quality_rules.score(mail).as_dict()
    except Exception as exc:  # noqa: BLE001 - parse() promises not to raise; if it does, shunt
        log.exception("event=parse-failed inbound_id=%d", stored.id)
        return Prepared(stored, None, {}, time.perf_counter() - started, f"parse: {type(exc).__name__}: {exc}")
    return Prepared(stored, mail, quality, time.perf_counter() - started)


def act(session: Session, settings: Settings, prepared: Prepared, now: datetime) -> tuple[route.Decision, str | None]:
    """Route one message and carry out the decision; returns it and the reference of a new ticket."""
    stored, mail = prepared.stored, prepared.mail
    assert mail is not None
    incoming = route.Incoming(mail=mail, mail_from=stored.mail_from, rcpt_tos=stored.rcpt_tos,
                              message_key=tickets.message_key(mail, stored))
    decision = route.decide(incoming, tickets.DatabaseKnown(session), tickets.routing_config(settings))
    if decision.kind == route.NEW_TICKET:
        ticket = tickets.open_ticket(session, settings, stored, incoming, decision, now, prepared.quality)
        return replace(decision, ticket_id=ticket.id), ticket.reference
    if decision.ticket_id is not None and decision.kind != route.DUPLICATE:
        tickets.record_on_ticket(session, stored, incoming, decision, now)
    return decision, None


def _mark(session: Session, message_id: int, **values: object) -> None:
    table = InboundMessage.__table__
    session.execute(update(table).where(table.c.id == message_id).values(**values))


def _fail(session: Session, message_id: int, error: str, now: datetime, result: BatchResult) -> None:
    _mark(session, message_id, status=InboundStatus.FAILED, error=error[:2000], processed_at=now,
          attempts=InboundMessage.attempts + 1)
    result.failed.append(message_id)


def process_batch(engine: Engine, settings: Settings, now: datetime, limit: int | None = None) -> BatchResult:
    """Process up to one batch of pending messages as of *now*."""
    result = BatchResult()
    prepared = [prepare(settings, stored) for stored in
                inbound.pending(engine, limit or settings.processing.batch_size)]
    step = settings.processing.messages_per_transaction
    for start in range(0, len(prepared), step):
        # Short transactions: the listener's commits wait for this lock.
        with write_session(engine) as session:
            _act_on(session, settings, prepared[start:start + step], now, result)
    return result


def _act_on(session: Session, settings: Settings, chunk: list[Prepared], now: datetime, result: BatchResult) -> None:
    still_pending = set(session.scalars(
        select(InboundMessage.id).where(InboundMessage.id.in_([p.stored.id for p in chunk]),
                                        InboundMessage.status == InboundStatus.PENDING)))
    for item in chunk:
        stored, mail = item.stored, item.mail
        if stored.id not in still_pending:
            continue  # another processor got there first
        if mail is None:
            _fail(session, stored.id, item.error or "parse failed", now, result)
            continue
        try:
            with session.begin_nested():
                decision, reference = act(session, settings, item, now)
                status = InboundStatus.PROCESSED if decision.kind in _ACTED_ON else InboundStatus.IGNORED
                _mark(session, stored.id, status=status, decision=decision.kind, reason=decision.reason[:2000],
                      ticket_id=decision.ticket_id, processed_at=now, error=None,
                      attempts=InboundMessage.attempts + 1)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the rest
            log.exception("event=process-failed inbound_id=%d", stored.id)
            _fail(session, stored.id, f"{type(exc).__name__}: {exc}", now, result)
            continue
        result.decisions[decision.kind] += 1
        if reference:
            result.tickets_opened.append(reference)
        log.info("event=processed inbound_id=%d message_id=%s decision=%s ticket=%s parse_ms=%.1f warnings=%d "
                 "reason=%r", stored.id, mail.message_id, decision.kind, reference or decision.ticket_id or "-",
                 item.parse_seconds * 1000, len(mail.warnings), decision.reason[:200])


def process_all(engine: Engine, settings: Settings, now: datetime) -> BatchResult:
    """Process until nothing is pending (messages failing again stay failed, so this ends)."""
    total = BatchResult()
    while True:
        batch = process_batch(engine, settings, now)
        if not batch.handled:
            return total
        total.decisions.update(batch.decisions)
        total.failed.extend(batch.failed)
        total.tickets_opened.extend(batch.tickets_opened)
