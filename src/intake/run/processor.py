"""Stored messages -> decisions -> tickets: the parse, route and act stages driven in batches.

A batch is the messages this processor claimed (:mod:`intake.store.claims`): distinct from those
of the processors on other nodes, at most ``processing.batch_size`` of them and
``processing.batch_bytes`` of mail (or one larger message alone), the claim renewed while the
batch is worked on. It is acted on in chunks of ``processing.messages_per_transaction``
messages, each prepared just before: parsed, scored and its text read (the expensive part)
outside any transaction, so a message's ticket waits for the messages of its chunk, not for the
whole batch to be parsed. A chunk is routed in order against set-based lookups (:mod:`intake.understand.lookups`) and its new tickets are made
ready (:func:`intake.tickets.opening.plan`), replies rendered with the references that come next,
all before the write lock is taken; then one short write transaction takes those references
(:func:`intake.tickets.opening.open_tickets`) and writes the lot in a handful of statements, not a
dozen per message. What acting on each decision does is :mod:`intake.understand.decisions`' table.
A message whose routing depends on an earlier one of its chunk that is not written yet (a second
copy, a reply to it) ends the part planned so far; that part is written and planning goes on
from the message.

If anything in a chunk fails, its transaction is rolled back and its messages are acted on
again one at a time: the message at fault is marked ``failed`` alone, with its error, and its raw
bytes stay for ``intake reprocess``. Messages are re-checked as still pending, and still claimed
by this batch, inside the write transaction: a batch whose claim ran out and was taken over acts
on none of the messages taken, so each message is acted on once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from intake.config.settings import Settings
from intake.store import claims, inbound
from intake.store.db import read_session, write_session
from intake.store.inbound import StoredMessage
from intake.store.models import InboundMessage, Ticket
from intake.tickets import disclosure, maintainer_mail, opening, records, reporter_keys, status_reply
from intake.understand import (
    arrival_time, decisions, dns_lookups, lookups, parse_guard, pgp_inbound, reply_tokens, route, sender_auth,
)
from intake.understand.parsed_mail import ParsedMail
from intake.understand.sender_auth import NONE, Verdict
from intake.understand.text_work import TextWork
from intake.vocabulary import REPORTER_REPLY, THIRD_PARTY_REPLY, InboundStatus, KeySource

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    decisions: Counter[str] = field(default_factory=Counter)
    failed: list[int] = field(default_factory=list)
    tickets_opened: list[str] = field(default_factory=list)
    # Per message acted on: seconds from its batch being taken up to its outcome being written.
    seconds: list[float] = field(default_factory=list)
    claimed: int = 0  # messages the batch claimed
    reclaimed: int = 0  # of them, taken over from a processor whose claim had run out
    full: bool = False  # the claim was cut short by batch_size or batch_bytes: more mail may be waiting

    @property
    def handled(self) -> int:
        return sum(self.decisions.values()) + len(self.failed)


# Mail acted on per write transaction at most (see _chunks), whatever messages_per_transaction says.
_CHUNK_BYTES = 512 * 1024

# Times a message acted on alone is planned again after a unique key was taken under it (see
# _act_on_chunk): once per copy of it being acted on elsewhere at the same moment.
_CONFLICT_RETRIES = 3


@dataclass(frozen=True)
class Prepared:
    """The pure part of processing one message, done before any lock is taken: parsing, scoring
    and all the text work acting on it needs (no text is read under the write lock)."""

    stored: StoredMessage
    # When it arrived for SLA purposes: when the trusted relay accepted it, else when intake did.
    arrived_at: datetime
    mail: ParsedMail | None
    quality: dict[str, Any]
    parse_seconds: float
    error: str | None = None
    work: TextWork = TextWork()
    cpu_seconds: float = 0.0  # the parse helper's CPU time on it (bounded by processing.message_budget)
    # Who the From: domain is (DNS, if any, done here: never under the write lock).
    authentication: Verdict = Verdict(NONE, "not checked")
    size: int = 0  # of the message's bytes (stored.raw may have let them go)


@dataclass(frozen=True)
class Routed:
    """A message and the decision made on it, not yet carried out."""

    prepared: Prepared
    incoming: route.Incoming
    decision: route.Decision


@dataclass(frozen=True)
class Plan:
    """Decisions on a run of messages and the tickets they open, made ready without the write lock."""

    routed: list[Routed]
    new_tickets: opening.NewTickets
    reply_secret: bytes  # signs maintainers' reply addresses in the mail sent to them


@dataclass(frozen=True)
class Outcome:
    """What acting on one message came to: its decision (and the reference of the ticket it opened),
    or the error that failed it."""

    prepared: Prepared
    decision: route.Decision | None = None
    reference: str | None = None
    error: str | None = None


def prepare(settings: Settings, stored: StoredMessage, dns: dns_lookups.Resolver | None = None) -> Prepared:
    """Parse, score, read and authenticate *stored*: everything that needs no lock. DNS lookups
    go through *dns* (the batch's time budget), else the process's resolver."""
    started = time.perf_counter()
    arrived = arrived_at(stored)
    try:
        # The trace fields apart (stored.full would copy the message): the helper puts them on top.
        result = parse_guard.parse_and_score(stored.raw, settings.quality_rules, settings.processing.parse_timeout,
                                             settings.processing.message_budget, pgp_inbound.decryption(settings),
                                             head=stored.trace.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - parse() promises not to raise; if it does, shunt
        log.exception("event=parse-failed inbound_id=%d", stored.id)
        return Prepared(stored, arrived, None, {}, time.perf_counter() - started,
                        f"parse: {type(exc).__name__}: {exc}", size=len(stored.raw))
    return Prepared(stored, arrived, result.mail, result.quality or {}, time.perf_counter() - started,
                    work=result.work, cpu_seconds=result.cpu_seconds,
                    authentication=_authenticate(settings, stored, result.mail, dns), size=len(stored.raw))


def arrived_at(stored: StoredMessage) -> datetime:
    """When *stored* arrived, for its SLA: a fetched message's INTERNALDATE or the trusted relay's
    Received: time, bounded (see :mod:`intake.understand.arrival_time`); intake's receipt for a
    direct client, whose Received: fields are its own writing."""
    if stored.arrived_at is not None:  # bounded when it was stored
        return stored.arrived_at
    if not stored.relay:
        return stored.received_at
    return arrival_time.relayed_sla_start(stored.raw, stored.received_at)


def _authenticate(settings: Settings, stored: StoredMessage, mail: ParsedMail,
                  dns: dns_lookups.Resolver | None) -> Verdict:
    """The sender's verdict; DNS lookups only for mail that could gain privilege by it."""
    may_gain = sender_auth.may_gain_privilege(settings, mail, stored.mail_from, stored.rcpt_tos)
    resolver = (dns or dns_lookups.system_resolver(settings.sender_auth)) if may_gain else None
    # The message as sent: intake's own trace fields are no evidence of who sent it.
    return sender_auth.authenticate(stored.raw, mail.from_address, settings.sender_auth, resolver)


def process_batch(engine: Engine, settings: Settings, now: datetime, limit: int | None = None) -> BatchResult:
    """Claim a batch of pending messages as of *now* (at most *limit*, else ``batch_size``) and
    process it."""
    started = time.perf_counter()
    processing = settings.processing
    lease = timedelta(seconds=processing.claim_lease)
    claim = claims.claim(engine, claims.new_owner(), now, lease, limit or processing.batch_size,
                         processing.batch_bytes)
    result = BatchResult(claimed=len(claim.ids), reclaimed=claim.reclaimed, full=claim.full)
    if not claim.ids:
        return result
    dns = dns_lookups.TimeBudget(dns_lookups.system_resolver(settings.sender_auth),
                                 dns_lookups.batch_dns_seconds(settings.sender_auth))
    kept = claims.Lease(engine, claim, now, lease)
    for chunk in _chunks(_prepared(settings, kept.kept(inbound.by_ids(engine, claim.ids)), dns),
                         processing.messages_per_transaction):
        _tally(result, _act_on_chunk(engine, settings, chunk, now, claim.owner), time.perf_counter() - started)
    return result


def _prepared(settings: Settings, stored: Iterator[StoredMessage], dns: dns_lookups.Resolver) -> Iterator[Prepared]:
    """Each of *stored* (read as it is asked for, small messages many per query) prepared; a
    large one without its bytes once parsed (acting reads them again if it needs them), so the
    worker never holds two large messages, even while the next is read."""
    for message in stored:
        prepared = prepare(settings, message, dns)
        del message  # not kept while the next is read
        if prepared.size > _CHUNK_BYTES:
            prepared = replace(prepared, stored=prepared.stored.without_raw())
        yield prepared


def _chunks(prepared: Iterable[Prepared], most: int) -> Iterator[list[Prepared]]:
    """*prepared* in chunks of at most *most* messages and, but for a single larger message, of
    at most ``_CHUNK_BYTES`` of mail: the write lock is held while a chunk's rows are written. A
    chunk that is full goes at once, before the next message is prepared: a large message is
    acted on before the next is read."""
    return inbound.byte_groups(prepared, _CHUNK_BYTES, most)


def _act_on_chunk(engine: Engine, settings: Settings, chunk: list[Prepared], now: datetime,
                  owner: str) -> list[Outcome]:
    """Act on *chunk* (claimed by *owner*): as many messages at a time as can go together, planned
    without the write lock and written in one short transaction (the listener's commits wait for
    its lock). If that fails, the messages not yet written are acted on one by one, so only the
    one at fault fails."""
    unparsed = [(item, item.error or "parse failed") for item in chunk if item.mail is None]
    outcomes = _record_failures(engine, unparsed, now, owner) if unparsed else []
    items = [item for item in chunk if item.mail is not None]
    conflicts = 0
    while items:
        try:
            plan = _plan(engine, settings, items, now)
            with write_session(engine) as session:
                outcomes += _write(session, settings, plan, now, owner)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the rest
            if len(items) == 1 and isinstance(exc, IntegrityError) and conflicts < _CONFLICT_RETRIES:
                # A unique key taken by a transaction that committed after our snapshot: another
                # node stored a copy of this message meanwhile. Planned again on a fresh snapshot it
                # is a duplicate; a fault of the message itself fails again, and then for good.
                conflicts += 1
                continue
            if len(items) == 1:
                log.exception("event=process-failed inbound_id=%d", items[0].stored.id)
                return outcomes + _record_failures(engine, [(items[0], f"{type(exc).__name__}: {exc}")], now,
                                                   owner)
            log.warning("event=chunk-failed inbound_ids=%s error=%r: acting on each message alone",
                        [item.stored.id for item in items], exc)
            return outcomes + [outcome for item in items
                               for outcome in _act_on_chunk(engine, settings, [item], now, owner)]
        items = items[len(plan.routed):]
    return outcomes


def _plan(engine: Engine, settings: Settings, items: list[Prepared], now: datetime) -> Plan:
    """Route *items* up to the first that depends on an earlier one, and make ready the tickets they
    open, replies rendered, all without the write lock.

    Routing reads a snapshot taken just before. The writers it could miss are another processor
    acting on the same message (caught by the re-check of its status in :func:`_write`) or on a
    copy of it (caught by the unique message key: the chunk fails and each message is then acted
    on again alone, on a fresh snapshot)."""
    reply_secret = reply_tokens.secret(engine)
    with read_session(engine) as session:
        routed = _with_known_signers(session, settings, _route(session, settings, items, reply_secret, now))
        reports = [opening.NewReport(r.prepared.stored, r.incoming, r.decision, r.prepared.quality,
                                     r.prepared.arrived_at,
                                     r.prepared.work.report_credit)
                   for r in routed if decisions.handling(r.decision).record is decisions.Record.NEW_TICKET]
        reads = opening.read_for_plan(session, settings, reports, now)
    # Templates rendered after the read transaction ends: it need not stay open for them.
    return Plan(routed, opening.plan(settings, reports, reads, now, reply_secret), reply_secret)


def _with_known_signers(session: Session, settings: Settings, routed: list[Routed]) -> list[Routed]:
    """*routed* with the signatures of decrypted reports checked against their senders' keys on
    file too (the parse helper only had the keys each report carries)."""
    decryption = pgp_inbound.decryption(settings)
    signed = [r for r in routed if r.incoming.mail.pgp is not None and r.incoming.mail.pgp.signed]
    if decryption is None or not signed:
        return routed
    on_file = reporter_keys.newest(session, [r.incoming.sender for r in signed])
    checked = []
    for r in routed:
        key = on_file.get(r.incoming.sender.lower())
        if key is not None and r.incoming.mail.pgp is not None and r.incoming.mail.pgp.signed:
            full = inbound.full_message(r.prepared.stored.trace, inbound.raw_of(session, r.prepared.stored))
            mail = pgp_inbound.verify_with_known(full, r.incoming.mail, decryption, [key.armored], {key.fingerprint})
            r = replace(r, incoming=replace(r.incoming, mail=mail))
        checked.append(r)
    return checked


def _keys_carried(session: Session, routed: Routed, ticket_id: int, now: datetime) -> None:
    """Keep the OpenPGP keys a reporter's own mail carries, for the mail we send them later."""
    if routed.incoming.mail.public_keys:
        reporter_keys.keep(session, routed.incoming.sender, routed.incoming.mail.public_keys, ticket_id,
                           KeySource.ATTACHED, now)


def _write(session: Session, settings: Settings, plan: Plan, now: datetime, owner: str) -> list[Outcome]:
    """Carry out the decisions of *plan* on the messages still pending and claimed by *owner*, as
    :data:`intake.understand.decisions.HANDLING` says: their new tickets all together, additions to
    existing tickets one by one (replies are few, and may change a ticket's state), each with the
    mail it sends; then record each message's outcome."""
    pending = claims.still_mine(session, owner, [r.prepared.stored.id for r in plan.routed])
    opened = opening.open_tickets(session, settings, plan.new_tickets, pending, now)
    outcomes = []
    for r in plan.routed:
        if r.prepared.stored.id not in pending:
            continue  # another processor took it over (this batch's claim had run out)
        handling = decisions.handling(r.decision)
        if handling.record is decisions.Record.NEW_TICKET:
            ticket = opened[r.prepared.stored.id]
            _keys_carried(session, r, ticket.id, now)
            if r.prepared.work.disclosure_date and not r.prepared.stored.history:
                # A report may name its own disclosure date: the reporter proposes it at once.
                disclosure.propose(session, settings, session.get(Ticket, ticket.id), r.prepared.work.disclosure_date,
                                   r.incoming, now)
            outcomes.append(Outcome(r.prepared, replace(r.decision, ticket_id=ticket.id), ticket.reference))
            continue
        if handling.records_on_ticket(r.decision):
            records.record_on_ticket(session, settings, r.prepared.stored, r.incoming, r.decision, now,
                                     r.prepared.work.reply_credit)
            if handling.on_ticket is decisions.OnTicket.REPORTER_BACK:
                _keys_carried(session, r, r.decision.ticket_id, now)
            if not r.prepared.stored.history:  # imported history: recorded, never forwarded nor carried out
                maintainer_mail.act_on(session, settings, r.prepared.stored, r.incoming, r.decision, now,
                                       plan.reply_secret, r.prepared.work)
                _answer_status_request(session, settings, r, now)
                _disclosure_proposal(session, settings, r, now)
        elif (handling.mail is decisions.Mail.REFUSAL and r.decision.refused is not None
              and not r.prepared.stored.history):
            maintainer_mail.refused(session, settings, r.incoming, r.decision, now, plan.reply_secret)
        outcomes.append(Outcome(r.prepared, r.decision))
    _mark(session, outcomes, now)
    return outcomes


def _answer_status_request(session: Session, settings: Settings, routed: Routed, now: datetime) -> None:
    """A reporter's own reply asking for the status gets the automatic status reply (see
    :mod:`intake.tickets.status_reply`); a third party's or a maintainer's never does."""
    mail = routed.incoming.mail
    reporters_own = decisions.handling(routed.decision).on_ticket is decisions.OnTicket.REPORTER_BACK
    if reporters_own and status_reply.is_request(mail.subject, mail.body_text):
        ticket = session.get(Ticket, routed.decision.ticket_id)
        assert ticket is not None  # recorded on it just before
        status_reply.answer(session, settings, ticket, routed.incoming, now)


def _disclosure_proposal(session: Session, settings: Settings, routed: Routed, now: datetime) -> None:
    """A disclosure date named in mail to a ticket: the reporter's own reply proposes it (see
    :mod:`intake.tickets.disclosure`); a third party's is only noted, never taken as theirs."""
    proposed = routed.prepared.work.disclosure_date
    if proposed is None or routed.decision.kind not in (REPORTER_REPLY, THIRD_PARTY_REPLY):
        return
    ticket = session.get(Ticket, routed.decision.ticket_id)
    assert ticket is not None  # recorded on it just before
    if routed.decision.kind == REPORTER_REPLY:
        disclosure.propose(session, settings, ticket, proposed, routed.incoming, now)
    else:
        disclosure.noted(session, ticket, proposed, routed.incoming, now, "not from the reporter's address")


def _record_failures(engine: Engine, failures: list[tuple[Prepared, str]], now: datetime,
                     owner: str) -> list[Outcome]:
    """Mark each message of *failures* failed with its error (unless another processor took it over)."""
    with write_session(engine) as session:
        pending = claims.still_mine(session, owner, [item.stored.id for item, _ in failures])
        outcomes = [Outcome(item, error=error) for item, error in failures if item.stored.id in pending]
        _mark(session, outcomes, now)
    return outcomes


def _route(session: Session, settings: Settings, items: list[Prepared], reply_secret: bytes,
           now: datetime) -> list[Routed]:
    """Decide *items* in order, up to the first whose decision depends on one made before it here
    (and not yet written); returns the decisions made, at least the first."""
    incomings = [route.Incoming(mail=item.mail, mail_from=item.stored.mail_from, rcpt_tos=item.stored.rcpt_tos,
                                message_key=lookups.message_key(item.mail, item.stored),
                                authentication=item.authentication) for item in items]
    decided = lookups.route_chunk(session, settings, incomings, reply_secret, now)
    return [Routed(item, incoming, decision) for item, incoming, decision in zip(items, incomings, decided)]


_INBOUND = InboundMessage.__table__
# Values named after columns become SET clauses, one row each (executemany). Built once: this
# runs for every chunk, however small.
_BY_ID = update(_INBOUND).where(_INBOUND.c.id == bindparam("inbound_id"))
_MARK_DECIDED = _BY_ID.values(processed_at=bindparam("processed"), error=None, attempts=_INBOUND.c.attempts + 1,
                              claimed_until=None)
_MARK_FAILED = _BY_ID.values(status=InboundStatus.FAILED, processed_at=bindparam("processed"),
                             attempts=_INBOUND.c.attempts + 1, claimed_until=None)


def _mark(session: Session, outcomes: list[Outcome], now: datetime) -> None:
    """Record each message's outcome on its stored row (one statement for all the decided ones,
    one for all the failed ones), and end its claim."""
    decided = [{"inbound_id": o.prepared.stored.id, "processed": now,
                "status": decisions.handling(o.decision).status,
                "decision": o.decision.kind, "reason": o.decision.reason[:2000], "ticket_id": o.decision.ticket_id,
                "authentication": o.prepared.authentication.as_dict()}
               for o in outcomes if o.decision is not None]
    failed = [{"inbound_id": o.prepared.stored.id, "processed": now, "error": o.error[:2000],
               "authentication": o.prepared.authentication.as_dict()} for o in outcomes if o.decision is None]
    if decided:
        session.execute(_MARK_DECIDED, decided)
    if failed:
        session.execute(_MARK_FAILED, failed)


def _tally(result: BatchResult, outcomes: list[Outcome], seconds: float) -> None:
    for outcome in outcomes:
        result.seconds.append(seconds)
        stored, mail, decision = outcome.prepared.stored, outcome.prepared.mail, outcome.decision
        if decision is None:
            result.failed.append(stored.id)
            continue
        result.decisions[decision.kind] += 1
        if outcome.reference:
            result.tickets_opened.append(outcome.reference)
        log.info("event=processed inbound_id=%d message_id=%s decision=%s ticket=%s parse_ms=%.1f cpu_ms=%.1f "
                 "total_ms=%.1f warnings=%d reason=%r", stored.id, mail.message_id, decision.kind,
                 outcome.reference or decision.ticket_id or "-", outcome.prepared.parse_seconds * 1000,
                 outcome.prepared.cpu_seconds * 1000, seconds * 1000, len(mail.warnings), decision.reason[:200])


def process_all(engine: Engine, settings: Settings, now: datetime) -> BatchResult:
    """Process until nothing is pending that another processor has not claimed (messages failing
    again stay failed, so this ends)."""
    total = BatchResult()
    while True:
        batch = process_batch(engine, settings, now)
        if not batch.claimed:
            return total
        total.decisions.update(batch.decisions)
        total.failed.extend(batch.failed)
        total.tickets_opened.extend(batch.tickets_opened)
        total.seconds.extend(batch.seconds)
