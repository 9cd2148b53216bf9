"""Decide what a parsed message is: small named rules, tried in a declared order.

Each rule looks at the message, at a little configuration (:class:`RoutingConfig`) and, through
:class:`Known`, at what the database already holds; it returns a :class:`Decision` or ``None``
to pass. The first decision wins; ``new-ticket`` is the fallback. Rules are pure functions so
each can be tested on its own.

Mail that is no correspondence at all is sorted out first: a duplicate, a loop, a bounce, an
automatic reply (recorded on the ticket it threads into, by the threading order below), a bare
null sender, an upstream spam verdict, an empty message. Then threading, first match wins:

1. a maintainer's signed reply address (``security+SEC-2026-0001.<token>@``, :func:`reply_address`):
   mail to one is decided there, privileged or refused (a refusal threads nowhere); else a ticket
   reference in a ``+tag`` recipient (``security+SEC-2026-0001@``);
2. ``In-Reply-To``, else ``References`` (latest first), naming a Message-ID we stored or sent;
3. a ``[SEC-2026-0001]`` tag in the subject (:data:`THREADING`: the routes after the reply address);
4. else a new ticket (:func:`decide`), which *mentions* any existing ticket it quoted.

A reference is guessable, so the ``+tag`` and subject routes count only for mail from the ticket's
reporter's address or a maintainer; from anyone else they are no evidence and the next route
decides. A Message-ID is harder to come by, so a reply that quotes one threads whoever sends it.
So when the ``+tag`` and ``In-Reply-To`` name different tickets, the reporter's or a maintainer's
mail goes to the ``+tag``'s ticket, anyone else's to the ``In-Reply-To``'s (as a third party there,
unless they are that ticket's reporter); a stranger quoting only references opens a new ticket.

Threading into a ticket is not being its reporter (:func:`is_reporter`): envelope sender and
From: must both be the reporter's address, authenticated where the domain publishes DMARC.
Anyone else who threads in, by Message-ID or from the reporter's envelope address without those,
is a ``third-party-reply``: recorded and forwarded, and it changes nothing. A bounce attaches to
a ticket only when it names a Message-ID we sent (ours are random); a ticket reference in it
proves nothing.

Whether a new ticket's sender may get an automatic reply is a separate question
(:func:`auto_reply_suppressed`, RFC 3834); the per-recipient rate limit needs the database
and lives with the ticket service.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from intake import patterns
from intake.understand.parsed_mail import ParsedMail
from intake.understand.reply_tokens import EXPIRED, INVALID, OLD_FORMAT, TokenCheck
from intake.understand.sender_auth import NONE, Verdict
from intake.vocabulary import (
    AUTO_REPLY, BOUNCE, DUPLICATE, LOOP, LOOP_HEADER, MAINTAINER_REPLY, NEW_TICKET, REJECTED, REPORTER_REPLY, SPAM,
    THIRD_PARTY_REPLY, TICKET_HEADER,
)


# Subject prefixes of out-of-office mail that lacks Auto-Submitted (Outlook, Exchange, Lotus, ...).
_AUTO_REPLY_SUBJECT = patterns.compile(
    r"^\s*(out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|autoreply|"
    r"abwesenheitsnotiz|r[ée]ponse automatique|respuesta autom[áa]tica|risposta automatica|"
    r"automatisch antwoord|vacation( reply)?|on vacation|away from (the )?office)\s*[:\-]",
    ignorecase=True,
)
_AUTO_REPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-reply")
_BULK_PRECEDENCE = {"bulk", "junk", "list"}
_SUPPRESS_VALUES = {"all", "autoreply", "oof"}  # X-Auto-Response-Suppress values that ask us to stay quiet


@dataclass(frozen=True)
class TicketRef:
    id: int
    reference: str
    reporter: str


@dataclass(frozen=True)
class KnownMessage:
    """A message we stored or sent, found by its Message-ID."""

    ticket: TicketRef
    message_id: str
    kind: str  # thread entry kind ("report", ...) or outbox kind ("acknowledgement", ...)
    sent: bool = False  # we sent it (its Message-ID is ours, random); else someone sent it to us


class Known(Protocol):
    """The database lookups the rules need (implemented by the ticket service)."""

    def ticket_for_message_key(self, message_key: str) -> int | None: ...

    def ticket_by_reference(self, reference: str) -> TicketRef | None: ...

    def message_by_ids(self, message_ids: list[str], sent_only: bool = False) -> KnownMessage | None:
        """The first of *message_ids* we stored or (*sent_only*: only) sent."""
        ...


@dataclass(frozen=True)
class RoutingConfig:
    """The configuration the rules read."""

    our_addresses: frozenset[str]
    loop_marker: str
    reference_prefix: str
    is_maintainer: Callable[[str], bool]
    never_answered: Callable[[str], bool]
    # (reference, token) -> whose reply address token it is among the maintainers, and whether it is
    # still valid (see intake.understand.reply_tokens.check); without a secret, no token is anyone's.
    check_reply_token: Callable[[str, str], TokenCheck] = lambda reference, token: TokenCheck(INVALID)
    # [intake] ticket_auto_generated: Auto-Submitted: auto-generated mail threading nowhere is a new
    # report (answered by no automatic reply, see auto_reply_suppressed), not a held auto-reply.
    ticket_auto_generated: bool = True
    # [intake] ticket_spam: an upstream spam verdict holds nothing; the message is routed as any other.
    ticket_spam: bool = False

    # Cached on the instance: a config is built from the settings for each batch, and these were
    # derived again for every rule that reads them.
    @functools.cached_property
    def _reference(self) -> str:
        return rf"{patterns.escape(self.reference_prefix)}-\d{{4}}-\d{{4,}}"

    @functools.cached_property
    def reference_pattern(self) -> patterns.Pattern:
        return patterns.compile(rf"\b({self._reference})\b", ignorecase=True)

    @functools.cached_property
    def reply_address_tag(self) -> patterns.Pattern:
        """A signed reply address's +tag: ``SEC-2026-0001.<token>`` (see intake.understand.reply_tokens)."""
        return patterns.compile(rf"({self._reference})\.([a-z2-7]+)", ignorecase=True)

    def is_ours(self, address: str) -> bool:
        local, _, domain = address.lower().rpartition("@")
        return f"{local.split('+', 1)[0]}@{domain}" in self.our_addresses


@dataclass(frozen=True)
class Incoming:
    """What the rules see: the parsed message plus its envelope."""

    mail: ParsedMail
    mail_from: str
    rcpt_tos: list[str]
    message_key: str
    # Who the From: domain is, as far as we could authenticate it (see intake.understand.sender_auth).
    authentication: Verdict = Verdict(NONE, "not checked")

    @property
    def sender(self) -> str:
        """Who it is from: the envelope sender, else the From: header (null-sender mail)."""
        return (self.mail_from or self.mail.from_address).lower()


@dataclass(frozen=True)
class RefusedReplyAddress:
    """Mail to a maintainer's reply address that was refused: whose address it is, on which ticket."""

    ticket: TicketRef
    maintainer: str


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str
    ticket_id: int | None = None
    # How the message found its ticket: "+tag", "In-Reply-To <…>", "subject tag".
    threaded_by: str | None = None
    # New tickets: references the sender quoted but may not write into.
    mentions: tuple[str, ...] = field(default_factory=tuple)
    # Bounces: what the bounce says, for the ticket's record.
    bounced: KnownMessage | None = None
    # A maintainer's mail to their own signed reply address: its commands apply, its text is relayed.
    authenticated: bool = False
    # Mail to a maintainer's reply address refused (expired, or its sender not authenticated): the
    # ticket and the maintainer the address belongs to, who is told why (never the sender).
    refused: RefusedReplyAddress | None = None


Rule = Callable[[Incoming, Known, RoutingConfig], Decision | None]


def _header(incoming: Incoming, name: str) -> str:
    return (incoming.mail.headers.get(name) or "").strip().lower()


def _named_message(incoming: Incoming, known: Known, sent_only: bool = False) -> tuple[KnownMessage, str] | None:
    """The message we stored or (*sent_only*) sent that In-Reply-To names, else the latest of
    References that we know, and how it was found ("In-Reply-To <id>" or "References <id>")."""
    ids = [i for i in [incoming.mail.in_reply_to, *reversed(incoming.mail.references)] if i]
    found = known.message_by_ids(ids, sent_only) if ids else None
    if found is None:
        return None
    via = "In-Reply-To" if found.message_id == incoming.mail.in_reply_to else "References"
    return found, f"{via} {found.message_id}"


def duplicate(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """The same message (Message-ID, or content hash without one) was already handled."""
    ticket_id = known.ticket_for_message_key(incoming.message_key)
    if ticket_id is None:
        return None
    return Decision(DUPLICATE, f"already stored as {incoming.message_key}", ticket_id=ticket_id)


def loop(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """Our own mail coming back: it carries our loop marker, or claims to be from us."""
    marker = _header(incoming, LOOP_HEADER.lower())
    if marker and marker == config.loop_marker.lower():
        return Decision(LOOP, f"carries our loop marker {LOOP_HEADER}: {marker}")
    for address in (incoming.mail_from, incoming.mail.from_address):
        if address and config.is_ours(address):
            return Decision(LOOP, f"sent from our own address {address}")
    return None


def bounce(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """A delivery status notification: attached to the ticket whose mail bounced if it names a
    Message-ID we sent (returned, or in its own In-Reply-To/References), else unmatched. Anyone can
    write a DSN: a ticket reference or a Message-ID someone sent us proves nothing."""
    report = incoming.mail.delivery_report
    if report is None and incoming.mail.is_report != "delivery-status":
        return None
    found = None
    if report is not None and report.original_message_id:
        found = known.message_by_ids([report.original_message_id], sent_only=True)
    if found is None:
        threaded = _named_message(incoming, known, sent_only=True)
        found = threaded[0] if threaded else None
    detail = " ".join(filter(None, [report and report.status, report and report.diagnostic])) or "no status"
    reason = f"delivery status notification ({detail})"
    if found is None:
        reason += "; unmatched: concerns no mail of ours we can find (names no Message-ID we sent"
        if report is not None and report.original_ticket:
            reason += f", though it says {TICKET_HEADER}: {report.original_ticket}"
        return Decision(BOUNCE, reason + ")")
    return Decision(BOUNCE, reason, ticket_id=found.ticket.id, threaded_by=f"bounced {found.message_id}",
                    bounced=found)


def _auto_reply_evidence(incoming: Incoming) -> str | None:
    mail = incoming.mail
    value = (mail.auto_submitted or "").split(";")[0].strip()
    if value and value != "no":
        return f"Auto-Submitted: {value}"
    for name in _AUTO_REPLY_HEADERS:
        if name in mail.headers:
            return f"{name} header"
    if (mail.precedence or "") == "auto_reply":
        return "Precedence: auto_reply"
    if mail.is_report in ("disposition-notification", "feedback-report"):
        return f"multipart/report; report-type={mail.is_report}"
    if _AUTO_REPLY_SUBJECT.match(mail.subject):
        return f"out-of-office subject {mail.subject[:60]!r}"
    return None


def auto_reply(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """Out-of-office and other automatic mail: recorded on its ticket if it threads, else held; but
    ``Auto-Submitted: auto-generated`` mail threading nowhere goes on to the next rules (it may be
    a report) when ``ticket_auto_generated`` says so."""
    evidence = _auto_reply_evidence(incoming)
    if evidence is None:
        return None
    threaded = next(filter(None, (rule(incoming, known, config) for rule in THREADING)), None)
    if threaded is None and config.ticket_auto_generated and _auto_generated(incoming):
        return None  # a web form's or scanner's report: the rules after this one decide
    if threaded is None:
        return Decision(AUTO_REPLY, evidence + "; threads into no ticket")
    return Decision(AUTO_REPLY, evidence, ticket_id=threaded.ticket_id, threaded_by=threaded.threaded_by)


def _auto_generated(incoming: Incoming) -> bool:
    """Auto-Submitted: auto-generated (RFC 3834): made by a program, not a reply to anything."""
    return (incoming.mail.auto_submitted or "").split(";")[0].strip().lower() == "auto-generated"


def bare_null_sender(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """A null envelope sender without a recognisable report is still a notification (RFC 5321 4.5.5)."""
    if incoming.mail_from:
        return None
    threaded = _named_message(incoming, known, sent_only=True)
    if threaded is None:
        return Decision(BOUNCE, "null envelope sender; unmatched: names no Message-ID we sent")
    return Decision(BOUNCE, "null envelope sender", ticket_id=threaded[0].ticket.id, threaded_by=threaded[1])


def spam(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """An upstream filter's verdict (X-Spam-Flag: YES): stored and held (never a ticket, never
    answered) unless ``ticket_spam`` says such mail is routed as any other."""
    if not config.ticket_spam and _header(incoming, "x-spam-flag") == "yes":
        return Decision(SPAM, "X-Spam-Flag: YES from an upstream filter")
    return None


def empty(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """Nothing to act on: no subject, no text, no attachment."""
    mail = incoming.mail
    if mail.subject.strip() or mail.body_text.strip() or mail.attachments:
        return None
    return Decision(REJECTED, "empty message: no subject, no text, no attachment")


def _plus_tag(recipient: str) -> str:
    """What follows the ``+`` of *recipient*'s local part; empty without one, or when it is not all
    ASCII (under IGNORECASE [a-z] matches "ſ" and the Kelvin sign, \\d any digit: no tag at all)."""
    local = recipient.rpartition("@")[0]
    tag = local.split("+", 1)[1] if "+" in local else ""
    return tag if tag.isascii() else ""


def _reply_address_tag(incoming: Incoming, config: RoutingConfig) -> tuple[str, str, str] | None:
    """(recipient, reference, token) of the first recipient that is a signed reply address."""
    pattern = config.reply_address_tag
    for recipient in incoming.rcpt_tos:
        if match := pattern.fullmatch(_plus_tag(recipient)):
            return recipient, match.group(1).upper(), match.group(2)
    return None


def reply_address(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """Mail to a maintainer's signed reply address: privileged only when the token is the sender's
    and still valid, and the sender is authenticated (intake.understand.sender_auth); anything else to such an
    address changes nothing. When the address is the sender's own but expired or the sender is not
    authenticated, the maintainer it belongs to is told why (a forged sender never hears back)."""
    tagged = _reply_address_tag(incoming, config)
    if tagged is None:
        return None
    recipient, reference, token = tagged
    ticket = known.ticket_by_reference(reference)
    if ticket is None:
        return Decision(REJECTED, f"reply address {recipient} names no ticket: nothing changed")
    if not config.is_maintainer(incoming.sender):
        return Decision(REJECTED, f"reply address {recipient} used by {incoming.sender}, not a maintainer: "
                                  "nothing changed")
    checked = config.check_reply_token(reference, token)
    if checked.status == INVALID or checked.maintainer != incoming.sender:
        return Decision(REJECTED, f"reply address {recipient}: token is not {incoming.sender}'s: nothing changed")
    refused = RefusedReplyAddress(ticket, checked.maintainer)
    if checked.status == OLD_FORMAT:
        return Decision(REJECTED, f"reply address expired: {recipient} is of the old format without an issue "
                                  "date, treated as expired: nothing changed", refused=refused)
    if checked.status == EXPIRED:
        return Decision(REJECTED, f"reply address expired: {recipient} was issued on {checked.issued}, longer "
                                  "ago than reply_token_max_age: nothing changed", refused=refused)
    if not incoming.authentication.authenticated:
        return Decision(REJECTED, f"sender authentication failed for {incoming.sender} "
                                  f"({incoming.authentication.result}: {incoming.authentication.reason}): "
                                  "nothing changed", refused=refused)
    return Decision(MAINTAINER_REPLY, f"reply address of {incoming.sender} for {reference}", ticket_id=ticket.id,
                    threaded_by=f"reply address {recipient}", authenticated=True)


def _may_write_by_reference(incoming: Incoming, ticket: TicketRef, config: RoutingConfig) -> bool:
    """A ticket reference is guessable: it threads only mail from the ticket's reporter's address or
    a maintainer (whether they really are who they say is :func:`_reply_decision`'s question)."""
    return incoming.sender == ticket.reporter.lower() or config.is_maintainer(incoming.sender)


def is_reporter(incoming: Incoming, ticket: TicketRef) -> bool:
    """Whether *incoming* is from *ticket*'s reporter: envelope sender and From: both their address,
    and authenticated if their domain publishes DMARC (where it does not, or we could not learn
    whether it does, nothing better than the addresses is to be had)."""
    reporter = ticket.reporter.lower()
    if incoming.mail_from.lower() != reporter or incoming.mail.from_address.lower() != reporter:
        return False
    return _not_spoofed(incoming)


def _not_spoofed(incoming: Incoming) -> bool:
    """Authenticated, or from a domain that does not publish DMARC (or we could not learn whether
    it does): nothing better than the addresses is to be had there."""
    return incoming.authentication.dmarc_published is not True or incoming.authentication.authenticated


def _reply_decision(incoming: Incoming, config: RoutingConfig, ticket: TicketRef, via: str) -> Decision:
    """What mail threading into *ticket* (found by *via*) is: only the reporter (:func:`is_reporter`)
    makes a ``reporter-reply`` and only a maintainer a ``maintainer-reply``; anyone else is a third
    party, recorded and forwarded but changing nothing."""
    if config.is_maintainer(incoming.sender):
        if _not_spoofed(incoming):
            return Decision(MAINTAINER_REPLY, f"threads by {via}", ticket_id=ticket.id, threaded_by=via)
        return Decision(THIRD_PARTY_REPLY, f"threads by {via}; a maintainer's address, but not authenticated and "
                                           f"its domain publishes DMARC ({incoming.authentication.reason})",
                        ticket_id=ticket.id, threaded_by=via)
    if is_reporter(incoming, ticket):
        return Decision(REPORTER_REPLY, f"threads by {via}", ticket_id=ticket.id, threaded_by=via)
    return Decision(THIRD_PARTY_REPLY, f"threads by {via}; {_not_the_reporter(incoming, ticket)}",
                    ticket_id=ticket.id, threaded_by=via)


def thread_by_plus_tag(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """Mail to ``security+SEC-2026-0001@`` (the first such recipient naming a ticket the sender may
    write into): from anyone else, a ``+tag`` is no evidence, and the next rule decides."""
    pattern = config.reference_pattern
    for recipient in incoming.rcpt_tos:
        match = pattern.fullmatch(_plus_tag(recipient))
        if (match and (ticket := known.ticket_by_reference(match.group(1).upper()))
                and _may_write_by_reference(incoming, ticket, config)):
            return _reply_decision(incoming, config, ticket, f"+tag {recipient}")
    return None


def thread_by_message_id(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """A reply naming a Message-ID we stored or sent, whoever sends it: In-Reply-To, else the latest
    References entry we know."""
    threaded = _named_message(incoming, known)
    return _reply_decision(incoming, config, threaded[0].ticket, threaded[1]) if threaded else None


def thread_by_subject_tag(incoming: Incoming, known: Known, config: RoutingConfig) -> Decision | None:
    """A ``[SEC-2026-0001]`` in the subject (the first naming a ticket the sender may write into)."""
    for match in config.reference_pattern.finditer(incoming.mail.subject):
        if (match.group(1).isascii() and (ticket := known.ticket_by_reference(match.group(1).upper()))
                and _may_write_by_reference(incoming, ticket, config)):
            return _reply_decision(incoming, config, ticket, f"subject tag [{ticket.reference}]")
    return None


def _not_the_reporter(incoming: Incoming, ticket: TicketRef) -> str:
    """Why *incoming*, threading into *ticket*, is not from its reporter."""
    if incoming.sender != ticket.reporter.lower():
        return f"{incoming.sender} is not the reporter"
    if incoming.mail.from_address.lower() != ticket.reporter.lower():
        return f"the reporter's envelope address, but From: {incoming.mail.from_address or '(none)'}"
    verdict = incoming.authentication
    return f"the reporter's address, but not authenticated and their domain publishes DMARC ({verdict.reason})"


def _mentions(incoming: Incoming, known: Known, config: RoutingConfig) -> tuple[str, ...]:
    texts = [incoming.mail.subject, *(r.rpartition("@")[0] for r in incoming.rcpt_tos)]
    found: list[str] = []
    for text in texts:
        for match in config.reference_pattern.finditer(text):
            reference = match.group(1).upper()
            if reference not in found and known.ticket_by_reference(reference):
                found.append(reference)
    return tuple(found)


# The threading order, first match wins; a signed reply address (reply_address) comes before it.
THREADING: tuple[Rule, ...] = (thread_by_plus_tag, thread_by_message_id, thread_by_subject_tag)
RULES: tuple[Rule, ...] = (duplicate, loop, bounce, auto_reply, bare_null_sender, spam, empty, reply_address,
                           *THREADING)


def decide(incoming: Incoming, known: Known, config: RoutingConfig, rules: tuple[Rule, ...] = RULES) -> Decision:
    """The first decision of *rules*, in order; else a new ticket, mentioning the tickets it quotes."""
    for rule in rules:
        decision = rule(incoming, known, config)
        if decision is not None:
            return decision
    mentions = _mentions(incoming, known, config)
    reason = "no earlier rule matched" + (f"; mentions {', '.join(mentions)}" if mentions else "")
    return Decision(NEW_TICKET, reason, mentions=mentions)


def auto_reply_suppressed(incoming: Incoming, config: RoutingConfig) -> str | None:
    """Why this sender must get no automatic reply (RFC 3834 and common practice), or None."""
    mail = incoming.mail
    if not incoming.mail_from:
        return "null envelope sender"
    evidence = _auto_reply_evidence(incoming)
    if evidence:
        return evidence
    if (mail.precedence or "") in _BULK_PRECEDENCE:
        return f"Precedence: {mail.precedence}"
    for name in ("list-id", "list-unsubscribe"):
        if name in mail.headers:
            return f"{name} header (mailing list)"
    suppress = {v.strip().lower() for v in _header(incoming, "x-auto-response-suppress").split(",")}
    if suppress & _SUPPRESS_VALUES:
        return f"X-Auto-Response-Suppress: {mail.headers.get('x-auto-response-suppress')}"
    if config.never_answered(incoming.mail_from):
        return f"sender {incoming.mail_from} is a robot address"
    if config.is_ours(incoming.mail_from):
        return "sender is our own address"
    if _header(incoming, LOOP_HEADER.lower()) == config.loop_marker.lower():
        return "carries our loop marker"
    return None
