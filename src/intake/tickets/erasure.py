"""Where stored content is erased: :func:`erase_content` is the one place a ticket's or a held
message's content goes, :func:`erase_sent_mail` the one for a sent mail's body; both run in the
caller's write transaction. :mod:`intake.tickets.retention` decides what is due, these erase it.

What is content (erased) and what is metadata (kept):

* ``thread_entry``: ``body_text``, ``subject`` and ``warnings`` (they quote filenames and parts) are
  emptied; of each attachment only its ``index``, ``content_type`` and ``size`` stay (its name
  often names the vulnerability, its sha256 would confirm a guess of the file). Direction, kind,
  sender, Message-IDs and dates stay: the thread still shows who wrote when.
* ``inbound_message`` of the ticket (on it, or an entry of its thread): its bytes (``inbound_raw``)
  and ``trace`` emptied; envelope, size, sha256 (a re-delivery is still known as one), status and decision stay.
* ``outbox`` of the ticket, once no longer pending: ``raw`` emptied; recipients, kind, dates stay.
* ``ticket.subject`` emptied: a report's subject usually names the flaw ("SQL injection in
  /api/login"); the reference, reporter, dates, states, severity, CVSS, labels, links, credit,
  deadlines and every event stay, and ``content_purged_at`` is set.
* held messages (on no ticket): deleted, row and bytes; ``purge_log`` keeps their count.

Rows are overwritten, not deleted, wherever the row is metadata worth keeping. With SQLite's
``secure_delete`` (every connection, :mod:`intake.store.db`) the old bytes are zeroed in the same
write; :func:`intake.store.reclaim.reclaim` then clears the WAL.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlmodel import Session

from intake.store import sealing
from intake.store.models import InboundMessage, InboundRaw, Outbox, PurgeLog, ThreadEntry, Ticket
from intake.vocabulary import OutboxStatus

# What an attachment's description keeps once its content is erased.
KEPT_ATTACHMENT_KEYS = ("index", "content_type", "size")

_entry = ThreadEntry.__table__.c
_message = InboundMessage.__table__.c
_raw = InboundRaw.__table__.c
_outbox = Outbox.__table__.c
_ticket = Ticket.__table__.c


@dataclass(frozen=True)
class Erased:
    """How many rows :func:`erase_content` overwrote (or deleted) of each table."""

    entries: int = 0
    messages: int = 0
    mails: int = 0
    held: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "messages": self.messages, "mails": self.mails, "held": self.held}

    @property
    def total(self) -> int:
        return self.entries + self.messages + self.mails + self.held


def erase_content(session: Session, now: datetime, *, ticket_ids: Collection[int] = (),
                  inbound_ids: Collection[int] = ()) -> Erased:
    """Erase the content of tickets *ticket_ids* (rows overwritten, metadata kept, the tickets
    marked purged at *now*) and delete held messages *inbound_ids* (messages on no ticket).

    The place stored content is erased: with encryption at rest, the data keys of these tickets
    and messages are destroyed here too. The caller has checked they are due (closed long enough,
    no legal hold; held long enough) and records what was erased (event, purge log)."""
    entries = messages = mails = 0
    sealing.shred(session, ticket_ids=ticket_ids, inbound_ids=inbound_ids)  # before the sealed values go: it reads them
    if ticket_ids:
        entries = _erase_thread(session, ticket_ids)
        messages = _erase_messages(session, ticket_ids)
        mails = _erase_mail(session, _outbox.ticket_id.in_(ticket_ids))
        session.execute(update(Ticket.__table__).where(_ticket.id.in_(ticket_ids))
                        .values(subject="", content_purged_at=now))
    held = 0
    if inbound_ids:
        session.execute(delete(InboundRaw.__table__).where(_raw.id.in_(inbound_ids)))
        held = session.execute(delete(InboundMessage.__table__).where(_message.id.in_(inbound_ids))).rowcount
    return Erased(entries, messages, mails, held)


def erase_sent_mail(session: Session, outbox_ids: Collection[int]) -> int:
    """Erase the bodies of outbox rows *outbox_ids* (sent or given up on; never a pending one):
    how many held one."""
    return _erase_mail(session, _outbox.id.in_(outbox_ids)) if outbox_ids else 0


def _erase_thread(session: Session, ticket_ids: Collection[int]) -> int:
    rows = session.execute(select(_entry.id, _entry.body_text, _entry.subject, _entry.warnings, _entry.attachments)
                           .where(_entry.ticket_id.in_(ticket_ids)))
    changes = []
    for entry_id, body_text, subject, warnings, attachments in rows:
        kept = [_kept_attachment(a) for a in attachments]
        if body_text or subject or warnings or kept != attachments:
            changes.append({"entry_id": entry_id, "kept": kept})
    if changes:
        session.execute(update(ThreadEntry.__table__).where(_entry.id == bindparam("entry_id"))
                        .values(body_text="", subject="", warnings=[], attachments=bindparam("kept", type_=_entry.attachments.type)), changes)
    return len(changes)


def _kept_attachment(attachment: Mapping[str, Any]) -> dict[str, Any]:
    return {key: attachment[key] for key in KEPT_ATTACHMENT_KEYS if key in attachment}


def _erase_messages(session: Session, ticket_ids: Collection[int]) -> int:
    """The stored messages of the tickets: on them, or threaded into them (a message routed to a
    ticket it is no longer on, after a merge, is an entry of the ticket it moved to)."""
    threaded = select(_entry.inbound_id).where(_entry.ticket_id.in_(ticket_ids), _entry.inbound_id.is_not(None))
    ids = list(session.scalars(
        select(_message.id).join_from(InboundMessage.__table__, InboundRaw.__table__, _raw.id == _message.id)
        .where(or_(_message.ticket_id.in_(ticket_ids), _message.id.in_(threaded)),
               or_(func.length(_raw.raw) > 0, _message.trace != ""))))
    if ids:
        session.execute(update(InboundRaw.__table__).where(_raw.id.in_(ids)).values(raw=b""))
        session.execute(update(InboundMessage.__table__).where(_message.id.in_(ids)).values(trace=""))
    return len(ids)


def _erase_mail(session: Session, which: Any) -> int:
    return session.execute(
        update(Outbox.__table__)
        .where(which, _outbox.status != OutboxStatus.PENDING, func.length(_outbox.raw) > 0)
        .values(raw=b"")).rowcount


def log_purge(session: Session, log_id: int | None, kind: str, now: datetime, cutoff: datetime,
              counts: Mapping[str, int]) -> int:
    """Record a purge run's count of *kind* so far in its ``purge_log`` row (made by its first
    erasing transaction, updated by the next): the count is exact even if the run is cut short."""
    values = dict(kind=kind, purged_at=now, cutoff=cutoff, total=sum(counts.values()),
                  by_decision=dict(sorted(counts.items())))
    table = PurgeLog.__table__
    if log_id is None:
        return int(session.execute(table.insert().values(**values).returning(table.c.id)).scalar_one())
    session.execute(update(table).where(table.c.id == log_id).values(**values))
    return log_id
