"""The route stage's view of the database and configuration: what :mod:`intake.understand.route`'s
rules look up, for a chunk of messages at a time (:func:`route_chunk` decides a chunk).

:class:`ChunkKnown` implements :class:`intake.understand.route.Known` with set-based queries over
the stored tables (thread entries, outbox, tickets); :func:`routing_config` builds the rules'
:class:`~intake.understand.route.RoutingConfig` from the settings; :func:`message_key` is what
the duplicate rule compares.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select, true
from sqlmodel import Session

from intake.config.settings import Settings
from intake.store.inbound import StoredMessage
from intake.store.models import Outbox, ThreadEntry, Ticket
from intake.understand import decisions, reply_tokens, route
from intake.understand.parsed_mail import ParsedMail
from intake.vocabulary import Direction

# Message-IDs of one message looked up for threading: In-Reply-To and the latest References.
_MESSAGE_IDS_LOOKED_UP = 50

# The chunk's queries, built once (they run for every chunk, however small; building one cost
# more than running it); the keys and ids looked up are bound at each run.
_TICKETS_BY_KEY = select(ThreadEntry.message_key, ThreadEntry.ticket_id).where(
    ThreadEntry.message_key.in_(bindparam("keys", expanding=True)))
_STORED_MESSAGES = (select(ThreadEntry.message_id, ThreadEntry.kind, ThreadEntry.direction == Direction.OUT, Ticket.id,
                           Ticket.reference, Ticket.reporter)
                    .join(Ticket, Ticket.id == ThreadEntry.ticket_id)
                    .where(ThreadEntry.message_id.in_(bindparam("ids", expanding=True))))
_SENT_MESSAGES = (select(Outbox.message_id, Outbox.kind, true(), Ticket.id, Ticket.reference, Ticket.reporter)
                  .join(Ticket, Ticket.id == Outbox.ticket_id)
                  .where(Outbox.message_id.in_(bindparam("ids", expanding=True))))


class DependsOnPlanned(Exception):
    """A lookup's answer depends on a message routed earlier in the same chunk, not yet written."""


class ChunkKnown:
    """The route stage's view of the database (see :class:`intake.understand.route.Known`) for a chunk of
    messages routed one after the other and written together afterwards.

    What the rules will ask is fetched up front with set-based queries: one for all the chunk's
    message keys, one per table for all the Message-IDs its messages refer to. Anything else is
    looked up when asked. Because nothing is written until the whole chunk is routed, a lookup
    whose answer a message routed earlier in the chunk would change (a second copy of it, a reply
    to it, a ticket reference it is about to be given) raises :class:`DependsOnPlanned`: the
    caller writes what it routed so far and routes that message again. The first message of a
    chunk never raises it.
    """

    def __init__(self, session: Session, incomings: list[route.Incoming]):
        self._session = session
        self._tickets_by_key: dict[str, int | None] = {}
        self._messages: dict[str, route.KnownMessage | None] = {}
        self._tickets_by_reference: dict[str, route.TicketRef | None] = {}
        self._planned_keys: set[str] = set()
        self._planned_message_ids: set[str] = set()
        self._plans_new_tickets = False
        self._fetch_keys({incoming.message_key for incoming in incomings})
        self._fetch_messages({m for incoming in incomings for m in _message_ids_referred_to(incoming.mail)})

    def planned(self, incoming: route.Incoming, decision: route.Decision) -> None:
        """Note that *decision* on *incoming* will be written with the chunk."""
        handling = decisions.handling(decision)
        if handling.writes_message(decision):
            self._planned_keys.add(incoming.message_key)
            if incoming.mail.message_id:
                self._planned_message_ids.add(incoming.mail.message_id)
        self._plans_new_tickets |= handling.record is decisions.Record.NEW_TICKET

    def ticket_for_message_key(self, message_key: str) -> int | None:
        if message_key in self._planned_keys:
            raise DependsOnPlanned(message_key)
        if message_key not in self._tickets_by_key:
            self._fetch_keys({message_key})
        return self._tickets_by_key[message_key]

    def ticket_by_reference(self, reference: str) -> route.TicketRef | None:
        reference = reference.upper()
        if reference not in self._tickets_by_reference:
            row = self._session.execute(select(Ticket.id, Ticket.reference, Ticket.reporter)
                                        .where(Ticket.reference == reference)).first()
            self._tickets_by_reference[reference] = route.TicketRef(*row) if row else None
        ticket = self._tickets_by_reference[reference]
        if ticket is None and self._plans_new_tickets:
            raise DependsOnPlanned(reference)  # it may be the reference a planned ticket is about to get
        return ticket

    def message_by_ids(self, message_ids: list[str], sent_only: bool = False) -> route.KnownMessage | None:
        """The first of *message_ids* (most relevant first) that we stored or (*sent_only*: only) sent."""
        candidates = [m for m in message_ids if m][:_MESSAGE_IDS_LOOKED_UP]
        if not sent_only and self._planned_message_ids.intersection(candidates):
            raise DependsOnPlanned(candidates)  # (what is planned is received mail, never sent)
        self._fetch_messages({m for m in candidates if m not in self._messages})
        found = (self._messages[m] for m in candidates)
        return next((known for known in found if known is not None and (known.sent or not sent_only)), None)

    def _fetch_keys(self, message_keys: set[str]) -> None:
        if not message_keys:
            return
        found = dict(self._session.execute(_TICKETS_BY_KEY, {"keys": list(message_keys)}).all())
        self._tickets_by_key.update({key: found.get(key) for key in message_keys})

    def _fetch_messages(self, message_ids: set[str]) -> None:
        if not message_ids:
            return
        ids = {"ids": list(message_ids)}
        rows = self._session.execute(_STORED_MESSAGES, ids).all() + self._session.execute(_SENT_MESSAGES, ids).all()
        found = {message_id: (kind, bool(sent), ticket) for message_id, kind, sent, *ticket in rows}  # sent wins
        for message_id in message_ids:
            kind, sent, ticket = found.get(message_id, (None, False, None))
            self._messages[message_id] = (route.KnownMessage(route.TicketRef(*ticket), message_id, kind, sent)
                                          if ticket else None)


def route_chunk(session: Session, settings: Settings, incomings: list[route.Incoming], reply_secret: bytes,
                now: datetime) -> list[route.Decision]:
    """Decide *incomings* in order against one :class:`ChunkKnown`, up to the first whose decision
    depends on one made before it here (and not yet written); returns the decisions made, at
    least the first."""
    known = ChunkKnown(session, incomings)
    config = routing_config(settings, reply_secret, now)
    decided = []
    for incoming in incomings:
        try:
            decision = route.decide(incoming, known, config)
        except DependsOnPlanned:
            break
        known.planned(incoming, decision)
        decided.append(decision)
    return decided


def _message_ids_referred_to(mail: ParsedMail) -> list[str]:
    """The Message-IDs the threading rules will look up for *mail*, to fetch them all at once."""
    threading = [m for m in [mail.in_reply_to, *reversed(mail.references)] if m][:_MESSAGE_IDS_LOOKED_UP]
    report = mail.delivery_report
    return threading + ([report.original_message_id] if report and report.original_message_id else [])


def routing_config(settings: Settings, reply_secret: bytes | None = None,
                   now: datetime | None = None) -> route.RoutingConfig:
    """What the routing rules read; without *reply_secret* (and the *now* tokens are checked at) no
    reply address verifies."""
    return route.RoutingConfig(
        our_addresses=frozenset(settings.smtp.addresses),
        loop_marker=settings.intake.message_id_domain,
        reference_prefix=settings.intake.reference_prefix,
        is_maintainer=settings.is_maintainer,
        never_answered=settings.never_answered,
        ticket_auto_generated=settings.intake.ticket_auto_generated,
        ticket_spam=settings.intake.ticket_spam,
        check_reply_token=(lambda reference, token: reply_tokens.check(
            reply_secret, reference, token, [m.email for m in settings.maintainers], now,
            reply_tokens.max_age(settings)))
        if reply_secret and now else (lambda reference, token: reply_tokens.TokenCheck(reply_tokens.INVALID)),
    )


def message_key(mail: ParsedMail, stored: StoredMessage) -> str:
    """What makes two deliveries 'the same message': its Message-ID, else its bytes."""
    return mail.message_id or f"sha256:{stored.sha256}"
