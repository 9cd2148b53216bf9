"""A ticket's mail the relay would not take: events, and the reporter flagged unreachable.

The outbox hands each attempt that had refused recipients, or that ended a row (see
:class:`intake.send.outbox.Undelivered`), to :func:`record` in the transaction recording the row's
outcome. It writes one ``undeliverable`` event per recipient and row, however often a retry meets
the same answer, and flags the reporter unreachable as a bounce does
(:func:`intake.tickets.records.record_on_ticket`) when:

* the relay refused the reporter's address for good (5xx at RCPT, or 5xx after DATA): the
  synchronous answer is all there is, since an acknowledgement from the null sender never bounces;
* the outbox gave up (``give_up_after``) while the relay was still refusing the reporter's address
  with 4xx: what an MTA does at the end of its queue lifetime, with a failed DSN.

A 4xx for some recipients while others got a final answer is an event saying it will be retried
(the outbox queued a row for them); nothing is flagged. That new row is then a row like any
other: delivered, refused, or given up on, with its own events.

A row given up on because the relay itself was unreachable or refused the session says nothing
about the reporter: an event for its recipients, nothing flagged. Refusals of other recipients
(a Cc, a maintainer's notice) are events and the outbox's warning, never "reporter unreachable".
Like a bounce's, the flag is never cleared, by a later delivery or by a reply: the first failure
is kept, and maintainers decide what it means.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from intake.send.outbox import Undelivered
from intake.store import audit
from intake.store.models import Event, Ticket
from intake.tickets.records import event
from intake.understand.header_text import clean_text
from intake.vocabulary import SYSTEM_ACTOR, EventKind

log = logging.getLogger(__name__)

# The relay's answer as kept and shown: it may quote the address, which the reporter chose.
MAX_ANSWER = 300
_TICKETS = Ticket.__table__
_EVENTS = Event.__table__


def answer_text(code: int, text: str) -> str:
    """The relay's answer as one bounded, display-safe line ("550 5.1.1 <a@b>: User unknown")."""
    return clean_text(f"{code} {text}", MAX_ANSWER)


def record(connection: Connection, undelivered: Undelivered, now: datetime) -> None:
    """Record on its ticket what *undelivered* says (see the module's docstring). Idempotent: an
    event already written for a recipient of that outbox row is not written again."""
    ticket = connection.execute(select(_TICKETS.c.reference, _TICKETS.c.reporter)
                                .where(_TICKETS.c.id == undelivered.ticket_id)).first()
    if ticket is None:
        return
    what = undelivered.kind.replace("-", " ")
    told = _recipients_told(connection, undelivered)
    rows: list[dict[str, Any]] = []
    unreachable: str | None = None
    for refusal in undelivered.refused:
        answer = answer_text(refusal.code, refusal.text)
        retried_alone = undelivered.retried_in is not None and not refusal.permanent
        if refusal.recipient.lower() in told or not (refusal.permanent or undelivered.given_up or retried_alone):
            continue  # said already, or a 4xx for the whole row, which the outbox retries
        told.add(refusal.recipient.lower())
        if refusal.permanent:
            how = "refused by the relay"
        elif retried_alone:  # the others got a final answer; this recipient goes on in a row of its own
            how = f"deferred by the relay, will be retried (outbox {undelivered.retried_in})"
        else:
            how = f"given up after {_attempts(undelivered)}"
        summary = clean_text(f"{what} to {refusal.recipient} {how}: {answer}", MAX_ANSWER * 2)
        rows.append(event(undelivered.ticket_id, EventKind.UNDELIVERABLE, now, outbox_id=undelivered.outbox_id,
                          mail=undelivered.kind, recipient=refusal.recipient, answer=answer,
                          permanent=refusal.permanent, summary=summary))
        to_reporter = refusal.recipient.lower() == ticket.reporter.lower()
        # The outbox warned already (event=outbox-refused); this line ties it to the ticket.
        log.info("event=mail-undeliverable ticket=%s outbox_id=%d recipient=%s reporter=%s answer=%r",
                    ticket.reference, undelivered.outbox_id, refusal.recipient, to_reporter, answer)
        if to_reporter and (refusal.permanent or undelivered.given_up):
            unreachable = summary
    if undelivered.given_up:
        rows += _given_up(undelivered, told, what, ticket.reference, now)
    if rows:
        audit.add_events(connection, rows)
    if unreachable is not None:
        _flag_reporter(connection, undelivered.ticket_id, ticket.reporter, unreachable, now)


def _recipients_told(connection: Connection, undelivered: Undelivered) -> set[str]:
    """Recipients of this outbox row an event was recorded for already (by an earlier attempt)."""
    details = connection.scalars(select(_EVENTS.c.detail).where(_EVENTS.c.ticket_id == undelivered.ticket_id,
                                                                _EVENTS.c.kind == EventKind.UNDELIVERABLE))
    return {str(detail.get("recipient", "")).lower() for detail in details
            if detail.get("outbox_id") == undelivered.outbox_id}


def _given_up(undelivered: Undelivered, told: set[str], what: str, reference: str,
              now: datetime) -> list[dict[str, Any]]:
    """Events for the recipients of a row given up on that no refusal named: the relay was not
    reachable, or refused the session or the sender, so nothing is known of them."""
    rest = [r for r in undelivered.recipients if r.lower() not in told]
    if not rest:
        return []
    reason = clean_text(undelivered.detail, MAX_ANSWER)
    log.warning("event=mail-undeliverable ticket=%s outbox_id=%d recipients=%s reason=%r", reference,
                undelivered.outbox_id, ",".join(rest), reason)
    return [event(undelivered.ticket_id, EventKind.UNDELIVERABLE, now, outbox_id=undelivered.outbox_id,
                  mail=undelivered.kind, recipient=recipient, answer=reason, permanent=False,
                  summary=clean_text(f"{what} to {recipient} given up after {_attempts(undelivered)}: {reason}",
                                     MAX_ANSWER * 2))
            for recipient in rest]


def _attempts(undelivered: Undelivered) -> str:
    return f"{undelivered.attempts} attempt{'' if undelivered.attempts == 1 else 's'}"


def _flag_reporter(connection: Connection, ticket_id: int, address: str, reason: str, now: datetime) -> None:
    """The reporter unreachable, unless flagged already (the first failure is the one kept)."""
    flagged = connection.execute(update(_TICKETS).where(_TICKETS.c.id == ticket_id,
                                                        _TICKETS.c.reporter_unreachable_at.is_(None))
                                 .values(reporter_unreachable_at=now, updated_at=now)).rowcount
    if flagged:
        audit.add_events(connection, [event(ticket_id, EventKind.REPORTER_UNREACHABLE, now, SYSTEM_ACTOR,
                                            address=address, reason=reason)])


def latest_reason(events: Iterable[Any]) -> str | None:
    """Why the reporter is unreachable, from a ticket's events in order: the latest flag's reason
    (a bounce flagged before reasons were recorded says only that)."""
    reason = None
    for each in events:
        if each.kind == EventKind.REPORTER_UNREACHABLE:
            reason = str(each.detail.get("reason") or "our mail bounced")
    return reason


def reasons(connection: Any, ticket_ids: Iterable[int]) -> dict[int, str]:
    """:func:`latest_reason` of each of *ticket_ids* (a session or connection), in one query."""
    ids = set(ticket_ids)
    if not ids:
        return {}
    found = connection.execute(select(Event.ticket_id, Event.kind, Event.detail)
                               .where(Event.ticket_id.in_(ids), Event.kind == EventKind.REPORTER_UNREACHABLE)
                               .order_by(Event.at, Event.id))
    by_ticket: dict[int, list[Any]] = {}
    for row in found:
        by_ticket.setdefault(row.ticket_id, []).append(row)
    return {ticket_id: latest_reason(rows) or "" for ticket_id, rows in by_ticket.items()}
