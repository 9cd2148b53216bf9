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


class Milestone:
    """What maintainers record as a report moves on (``intake ack|assess|released|resolve|disclose``);
    each meets a stage and can start others (``event:<name>``)."""

    ACKNOWLEDGED = "acknowledged"
    ASSESSED = "assessed"  # with the severity
    RELEASED = "released"  # a fixed release is out
    RESOLVED = "resolved"
    DISCLOSED = "disclosed"


# The milestones in the order they normally come.
MILESTONES = (Milestone.ACKNOWLEDGED, Milestone.ASSESSED, Milestone.RELEASED, Milestone.RESOLVED, Milestone.DISCLOSED)

# -- header names on mail we send --
LOOP_HEADER = "X-Intake-Loop"  # our loop marker: mail carrying it is never answered
TICKET_HEADER = "X-Intake-Ticket"  # the ticket a message belongs to; bounces quote it back

# -- labels intake sets itself --
LOW_QUALITY_LABEL = "low-quality"


class MailKind:
    """What a mail we send is: the outbox's kind, and the ``<kind>-queued`` event. (The SLA's
    notices are sent as the kind of their notice: reminder, breach, escalation, catch-up.)"""

    ACKNOWLEDGEMENT = "acknowledgement"  # automatic reply to a new report
    OUT_OF_SCOPE = "out-of-scope"  # automatic reply to a low-quality one, where the policy says so
    NEW_TICKET = "new-ticket"  # notice to maintainers
    DIGEST = "digest"
    REPLY_REFUSED = "reply-refused"  # to a maintainer whose reply address was refused
    CONFIRMATION = "confirmation"  # what a maintainer's mail did
    REPORTER_REPLY_FORWARD = "reporter-reply-forward"
    THIRD_PARTY_FORWARD = "third-party-forward"
    CORRESPONDENCE = "correspondence"  # a maintainer's words to the reporter
    DUPLICATE_NOTICE = "duplicate-notice"  # to the reporter of a ticket merged into another
