"""Decide what a parsed message is: small named rules, tried in a declared order.

Each rule looks at the message (and, through :class:`Known`, at what the database already
holds) and either returns a :class:`Decision` or ``None`` to pass. The first decision wins;
``new-ticket`` is the fallback. Rules are pure functions so each can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from intake.parse import ParsedMail

NEW_TICKET = "new-ticket"
DUPLICATE = "duplicate"
AUTO_REPLY = "auto-reply"
BOUNCE = "bounce"


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str
    # Whether the sender may get an automatic reply from us (RFC 3834).
    may_auto_reply: bool = False
    ticket_id: int | None = None


@dataclass(frozen=True)
class Incoming:
    """What the rules see: the parsed message plus its envelope."""

    mail: ParsedMail
    mail_from: str
    message_key: str


class Known(Protocol):
    """Database lookups the rules need (implemented by the ticket service)."""

    def ticket_for_message_key(self, message_key: str) -> int | None: ...


Rule = Callable[[Incoming, Known], Decision | None]


def duplicate(incoming: Incoming, known: Known) -> Decision | None:
    """The same message (Message-ID, or content hash without one) was already handled."""
    ticket_id = known.ticket_for_message_key(incoming.message_key)
    if ticket_id is None:
        return None
    return Decision(DUPLICATE, f"already stored as {incoming.message_key}", ticket_id=ticket_id)


def null_sender(incoming: Incoming, known: Known) -> Decision | None:
    """A null envelope sender is a delivery status notification (RFC 5321 4.5.5)."""
    if incoming.mail_from:
        return None
    return Decision(BOUNCE, "null envelope sender")


def auto_submitted(incoming: Incoming, known: Known) -> Decision | None:
    """Mail that declares itself automatic (RFC 3834 Auto-Submitted other than 'no')."""
    value = incoming.mail.auto_submitted
    if value is None or value.split(";")[0].strip() == "no":
        return None
    return Decision(AUTO_REPLY, f"Auto-Submitted: {value}")


RULES: tuple[Rule, ...] = (duplicate, null_sender, auto_submitted)


def decide(incoming: Incoming, known: Known, rules: tuple[Rule, ...] = RULES) -> Decision:
    for rule in rules:
        decision = rule(incoming, known)
        if decision is not None:
            return decision
    return Decision(NEW_TICKET, "no earlier rule matched", may_auto_reply=True)
