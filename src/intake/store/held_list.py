"""Held messages as ``intake messages`` lists them: those that made no ticket of their own, with
From and Subject read from the start of each message alone (no parse)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, or_, select

from intake.store.db import read_session
from intake.store.inbound import head_of_raw, open_head, with_raw
from intake.store.models import InboundMessage
from intake.understand.header_text import MAX_SCANNED_HEADER_BYTES, display_value, scan_header_block
from intake.vocabulary import HELD, HELD_DECISIONS, HELD_FAILED, InboundStatus


@dataclass(frozen=True)
class HeldMessage:
    """A stored message that made no ticket of its own, as ``intake messages`` lists it: From and
    Subject read from its header block alone (display-safe, decoded), not a full parse."""

    id: int
    received_at: datetime
    mail_from: str
    from_: str
    subject: str
    size: int
    decision: str  # its routing decision, or HELD_FAILED for a message processing failed on
    reason: str  # why: the decision's reason, or the error

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "received_at": self.received_at.isoformat(), "mail_from": self.mail_from,
                "from": self.from_, "subject": self.subject, "size": self.size, "decision": self.decision,
                "reason": self.reason}


def held(engine: Engine, decisions: Iterable[str] = HELD, since: datetime | None = None,
         limit: int = 50) -> list[HeldMessage]:
    """Held messages of *decisions* (see :data:`intake.vocabulary.HELD`) received at or after *since*,
    newest first, at most *limit*. Only the start of each message is read, for its header block."""
    wanted = set(decisions)
    table = InboundMessage.__table__
    matches = []
    if wanted & set(HELD_DECISIONS):
        matches.append(table.c.decision.in_(sorted(wanted & set(HELD_DECISIONS)))
                       & (table.c.status != InboundStatus.PENDING))
    if HELD_FAILED in wanted:
        matches.append(table.c.status == InboundStatus.FAILED)
    if not matches:
        return []
    query = (with_raw(select(table.c.id, table.c.received_at, table.c.mail_from, table.c.size, table.c.status,
                             table.c.decision, table.c.reason, table.c.error, table.c.data_key,
                             head_of_raw(engine, MAX_SCANNED_HEADER_BYTES)))
             .where(or_(*matches))
             .order_by(table.c.received_at.desc(), table.c.id.desc())
             .limit(limit))
    if since is not None:
        query = query.where(table.c.received_at >= since)
    with read_session(engine) as session:
        return [_held(row, open_head(session, row.head, row.data_key, MAX_SCANNED_HEADER_BYTES))
                for row in session.execute(query).all()]


def _held(row: Any, head: bytes) -> HeldMessage:
    fields = scan_header_block(head)
    failed = row.status == InboundStatus.FAILED
    return HeldMessage(row.id, row.received_at, row.mail_from, display_value(fields.get("from", [""])[0]),
                       display_value(fields.get("subject", [""])[0]), row.size,
                       HELD_FAILED if failed else row.decision, (row.error if failed else row.reason) or "")
