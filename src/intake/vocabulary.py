"""intake's words, each defined once: states, decisions, milestones, severities, header names, labels.

Every other module imports these names; none spells the strings itself. The values are stored in
the database and shown to operators, so changing one is a migration, not a rename.
"""

from __future__ import annotations


class InboundStatus:
    """Where a stored message is in processing."""

    PENDING = "pending"
    PROCESSED = "processed"
    IGNORED = "ignored"
    FAILED = "failed"


class TicketState:
    """A ticket's state; ``resolved`` is a milestone recorded as a state (see FINISHED_STATES)."""

    NEW = "new"
    WAITING = "waiting"  # on the reporter
    RESOLVED = "resolved"
    CLOSED = "closed"  # with a close_reason


class OutboxStatus:
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


# Why a ticket was closed (``intake close --reason``).
CLOSE_REASONS = ("fixed", "invalid", "duplicate", "out-of-scope", "spam")
# States in which a ticket has nothing left to meet: no deadlines listed, no reminders sent,
# never counted as breached.
FINISHED_STATES = (TicketState.RESOLVED, TicketState.CLOSED)

# -- routing decisions: what a stored message is (see intake.understand.route) --
NEW_TICKET = "new-ticket"
REPORTER_REPLY = "reporter-reply"
MAINTAINER_REPLY = "maintainer-reply"
THIRD_PARTY_REPLY = "third-party-reply"
AUTO_REPLY = "auto-reply"
BOUNCE = "bounce"
DUPLICATE = "duplicate"
LOOP = "loop"
SPAM = "spam"  # an upstream filter's X-Spam-Flag, not intake's quality score
REJECTED = "rejected"
DECISIONS = (NEW_TICKET, REPORTER_REPLY, MAINTAINER_REPLY, THIRD_PARTY_REPLY, AUTO_REPLY, BOUNCE, DUPLICATE, LOOP,
             SPAM, REJECTED)

# -- severities and milestones --
SEVERITIES = ("critical", "high", "medium", "low", "none")
# What maintainers record as a report moves on (``intake ack|assess|released|resolve|disclose``),
# in the order they normally come; each meets a stage and can start others (``event:<name>``).
class Milestone:
    ACKNOWLEDGED = "acknowledged"
    ASSESSED = "assessed"
    RELEASED = "released"  # a patched release is out
    RESOLVED = "resolved"  # also a state, a finished one
    DISCLOSED = "disclosed"


MILESTONES = (Milestone.ACKNOWLEDGED, Milestone.ASSESSED, Milestone.RELEASED, Milestone.RESOLVED, Milestone.DISCLOSED)
# Every state a ticket can be in: a recorded milestone moves it to the state of that name.
TICKET_STATES = (TicketState.NEW, TicketState.WAITING, *MILESTONES, TicketState.CLOSED)

# -- header names on mail we send --
LOOP_HEADER = "X-Intake-Loop"  # our loop marker: mail carrying it is never answered
TICKET_HEADER = "X-Intake-Ticket"  # the ticket a message belongs to; bounces quote it back

# -- labels intake sets itself --
LOW_QUALITY_LABEL = "low-quality"
