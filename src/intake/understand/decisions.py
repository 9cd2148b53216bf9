"""What carrying out each routing decision does, declared once.

:mod:`intake.understand.route` says what a message is (the rule that decides it); :data:`HANDLING`
says what acting on that decision comes to: what is recorded, what changes on the ticket, what
mail goes out and the status the stored message is left in. The route lookups, the processor,
the ticket writes and the maintainers' mail read this table instead of testing decision names,
so a new decision is a rule in ``route.py`` and an entry here (and code only for a new kind of
effect).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from intake.understand.route import Decision
from intake.vocabulary import (
    AUTO_REPLY, BOUNCE, DUPLICATE, LOOP, MAINTAINER_REPLY, NEW_TICKET, REJECTED, REPORTER_REPLY, SPAM,
    THIRD_PARTY_REPLY, InboundStatus,
)


class Record(enum.Enum):
    """What is written for the message itself."""

    NEW_TICKET = "a new ticket with the message as its report (intake.tickets.opening)"
    THREAD = "a thread entry and an event on the ticket it threads into, if it threads (intake.tickets.records)"
    NOTHING = "nothing: stored and logged only"


class OnTicket(enum.Enum):
    """What else recording the message changes on its ticket (intake.tickets.records)."""

    NOTHING = "nothing"
    REPORTER_BACK = "the credit the reply states is set; a ticket waiting on the reporter resumes"
    BOUNCE = "the bounce recorded as an event; the reporter flagged unreachable if mail to them failed"


class Mail(enum.Enum):
    """The mail acting on the message sends."""

    ACKNOWLEDGE = ("the automatic reply to the reporter (unless loop safety or the rate limit forbid it) and the "
                   "new-ticket notice to the maintainers (intake.tickets.opening)")
    FORWARD = "forwarded to the maintainers, a third party's marked as such (intake.tickets.maintainer_mail)"
    MAINTAINER_MAIL = ("if authenticated: its commands carried out, its text relayed to the reporter, a "
                       "confirmation to the maintainer (intake.tickets.maintainer_mail)")
    REFUSAL = ("if it was to a maintainer's refused reply address: that maintainer is told why, never the sender "
               "(intake.tickets.maintainer_mail)")
    NONE = "none"


@dataclass(frozen=True)
class Handling:
    """What acting on one kind of decision does."""

    record: Record
    on_ticket: OnTicket
    mail: Mail
    status: str  # an InboundStatus: processed when the message adds to a ticket, else ignored

    def records_on_ticket(self, decision: Decision) -> bool:
        """Whether *decision* adds its message to an existing ticket (it threads into one)."""
        return self.record is Record.THREAD and decision.ticket_id is not None

    def writes_message(self, decision: Decision) -> bool:
        """Whether acting on *decision* writes its message to a ticket, new or existing."""
        return self.record is Record.NEW_TICKET or self.records_on_ticket(decision)


_PROCESSED, _IGNORED = InboundStatus.PROCESSED, InboundStatus.IGNORED

HANDLING: dict[str, Handling] = {
    NEW_TICKET: Handling(Record.NEW_TICKET, OnTicket.NOTHING, Mail.ACKNOWLEDGE, _PROCESSED),
    REPORTER_REPLY: Handling(Record.THREAD, OnTicket.REPORTER_BACK, Mail.FORWARD, _PROCESSED),
    MAINTAINER_REPLY: Handling(Record.THREAD, OnTicket.NOTHING, Mail.MAINTAINER_MAIL, _PROCESSED),
    THIRD_PARTY_REPLY: Handling(Record.THREAD, OnTicket.NOTHING, Mail.FORWARD, _PROCESSED),
    AUTO_REPLY: Handling(Record.THREAD, OnTicket.NOTHING, Mail.NONE, _IGNORED),
    BOUNCE: Handling(Record.THREAD, OnTicket.BOUNCE, Mail.NONE, _IGNORED),
    # A copy of a message already handled: its ticket is named, nothing is added to it.
    DUPLICATE: Handling(Record.NOTHING, OnTicket.NOTHING, Mail.NONE, _IGNORED),
    LOOP: Handling(Record.NOTHING, OnTicket.NOTHING, Mail.NONE, _IGNORED),
    SPAM: Handling(Record.NOTHING, OnTicket.NOTHING, Mail.NONE, _IGNORED),
    REJECTED: Handling(Record.NOTHING, OnTicket.NOTHING, Mail.REFUSAL, _IGNORED),
}


def handling(decision: Decision) -> Handling:
    """What acting on *decision* does."""
    return HANDLING[decision.kind]
