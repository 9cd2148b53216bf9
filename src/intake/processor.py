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
from dataclasses import dataclass, field
from datetime import datetime

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


def act(session: Session, settings: Settings, stored: StoredMessage, mail: ParsedMail, now: datetime) -> tuple[str, int | None, str | None]:
    """Route one message and carry out the decision; returns (decision, ticket id, reference)."""
    key = tickets.message_key(mail, stored)
    incoming = route.Incoming(mail=mail, mail_from=stored.mail_from, message_key=key)
    decision = route.decide(incoming, tickets.DatabaseKnown(session))
    if decision.kind == route.NEW_TICKET:
        ticket = tickets.open_ticket(session, settings, stored, mail, decision.kind, now)
        return decision.kind, ticket.id, ticket.reference
    return decision.kind, decision.ticket_id, None


def _mark(session: Session, message_id: int, **values: object) -> None:
    table = InboundMessage.__table__
    session.execute(update(table).where(table.c.id == message_id).values(**values))


def process_batch(engine: Engine, settings: Settings, now: datetime, limit: int | None = None) -> BatchResult:
    """Process up to one batch of pending messages as of *now*."""
    result = BatchResult()
    batch = inbound.pending(engine, limit or settings.processing.batch_size)
    if not batch:
        return result
    parsed = []
    parse_failures: dict[int, str] = {}
    for stored in batch:
        started = time.perf_counter()
        try:
            parsed.append((stored, parse(stored.raw), time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - parse() promises not to raise; if it does, shunt
            log.exception("event=parse-failed inbound_id=%d", stored.id)
            parse_failures[stored.id] = f"parse: {type(exc).__name__}: {exc}"[:2000]
    with write_session(engine) as session:
        for message_id, error in parse_failures.items():
            _mark(session, message_id, status=InboundStatus.FAILED, error=error, processed_at=now,
                  attempts=InboundMessage.attempts + 1)
            result.failed.append(message_id)
        still_pending = set(session.scalars(
            select(InboundMessage.id).where(InboundMessage.id.in_([s.id for s in batch]),
                                            InboundMessage.status == InboundStatus.PENDING)))
        for stored, mail, parse_seconds in parsed:
            if stored.id not in still_pending:
                continue  # another processor got there first
            try:
                with session.begin_nested():
                    decision, ticket_id, reference = act(session, settings, stored, mail, now)
                    status = InboundStatus.PROCESSED if decision == route.NEW_TICKET else InboundStatus.IGNORED
                    _mark(session, stored.id, status=status, decision=decision, ticket_id=ticket_id,
                          processed_at=now, error=None, attempts=InboundMessage.attempts + 1)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the rest
                log.exception("event=process-failed inbound_id=%d", stored.id)
                _mark(session, stored.id, status=InboundStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000],
                      processed_at=now, attempts=InboundMessage.attempts + 1)
                result.failed.append(stored.id)
                continue
            result.decisions[decision] += 1
            if reference:
                result.tickets_opened.append(reference)
            log.info("event=processed inbound_id=%d message_id=%s decision=%s ticket=%s parse_ms=%.1f warnings=%d",
                     stored.id, mail.message_id, decision, reference or ticket_id or "-", parse_seconds * 1000,
                     len(mail.warnings))
    return result


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
