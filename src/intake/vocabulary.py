"""intake's words, each defined once: states, decisions, milestones, severities, event kinds, mail and
thread-entry kinds, link kinds, header names, labels.

Every other module imports these names; none spells the strings itself. The values are stored in
the database and shown to operators, so changing one is a migration, not a rename.
"""

from __future__ import annotations

from dataclasses import dataclass


class InboundStatus:
    """Where a stored message is in processing."""

    PENDING = "pending"
    PROCESSED = "processed"
    IGNORED = "ignored"
    FAILED = "failed"


class Milestone:
    """What maintainers record as a report moves on; each meets a stage and can start others
    (``event:<name>``). A milestone moves the ticket to the state of its name."""

    ACKNOWLEDGED = "acknowledged"
    ASSESSED = "assessed"  # with the severity
    RELEASED = "released"  # a patched release is out
    RESOLVED = "resolved"
    DISCLOSED = "disclosed"


class StageState:
    """Where one stage of a ticket's policy stands at an instant (``intake show``, notices)."""

    PENDING = "pending"  # its start has not happened
    PAUSED = "paused"  # started, its clock stopped (waiting on the reporter)
    OK = "ok"
    DUE_SOON = "due-soon"
    BREACHED = "breached"  # past due and not met, on an open ticket
    MET = "met"
    MET_LATE = "met-late"
    CLOSED = "closed"  # not met, and never will be: the ticket was resolved or closed first


STAGE_STATES = (StageState.PENDING, StageState.PAUSED, StageState.OK, StageState.DUE_SOON, StageState.BREACHED,
                StageState.MET, StageState.MET_LATE, StageState.CLOSED)


class TicketState:
    """A ticket's state: new, a milestone's name (see MILESTONE_SPECS), waiting or closed."""

    NEW = "new"
    WAITING = "waiting"  # on the reporter
    RESOLVED = Milestone.RESOLVED  # finished, as closed is (see FINISHED_STATES)
    CLOSED = "closed"  # with a close_reason


class OutboxStatus:
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class CloseReason:
    """Why a ticket was closed (``intake close --reason``)."""

    FIXED = "fixed"  # wants a recorded release
    INVALID = "invalid"
    DUPLICATE = "duplicate"  # also what merging sets
    OUT_OF_SCOPE = "out-of-scope"
    SPAM = "spam"


CLOSE_REASONS = (CloseReason.FIXED, CloseReason.INVALID, CloseReason.DUPLICATE, CloseReason.OUT_OF_SCOPE,
                 CloseReason.SPAM)


class UpdateKind:
    """A progress update the reporter gets when a ticket moves on (``[policies.X] updates``); each
    is the template ``update-<kind>.txt.j2`` (see :mod:`intake.tickets.updates`)."""

    ASSESSED = "assessed"  # `intake assess`: the severity
    FIX_RELEASED = "fix-released"  # `intake released`: the version
    DISCLOSURE_SCHEDULED = "disclosure-scheduled"  # `intake released`, when the policy's disclose stage has a date
    DISCLOSED = "disclosed"  # `intake disclose`: the advisory
    CLOSED = "closed"  # `intake close`: the reason in plain words


UPDATE_KINDS = (UpdateKind.ASSESSED, UpdateKind.FIX_RELEASED, UpdateKind.DISCLOSURE_SCHEDULED, UpdateKind.DISCLOSED,
                UpdateKind.CLOSED)
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
# Held mail: the decisions that make no ticket of their own (`intake messages` lists them, with
# the messages processing failed on, whose status stands in for a decision: HELD_FAILED).
HELD_DECISIONS = (SPAM, AUTO_REPLY, BOUNCE, LOOP, REJECTED, DUPLICATE)
HELD_FAILED = InboundStatus.FAILED
HELD = (*HELD_DECISIONS, HELD_FAILED)
# The start of a promoted message's reason: `intake promote` made its ticket (see intake.run.promotion).
PROMOTED_REASON = "promoted by "

# -- severities and the milestones in order --
SEVERITIES = ("critical", "high", "medium", "low", "none")


@dataclass(frozen=True)
class MilestoneSpec:
    name: str
    verb: str  # ``intake <verb> REFERENCE``
    follows: tuple[str, ...]  # recorded before it, unless forced
    stage: str  # the stage of this name is met by it unless the stage says ``met_by``
    stage_label: str  # how the acknowledgement names that stage
    credit_out: bool  # once reached, the reporter's credit belongs in release notes
    summary: str  # what ``intake <verb>`` does, as its help says


# Every milestone, declared once and in the order they normally come; the SLA engine's default
# ``met_by``, the acknowledgement's stage names, the order checks and the credits derive from it.
# Resolving follows the assessment, not a release: an invalid report is resolved without one.
MILESTONE_SPECS = (
    MilestoneSpec(Milestone.ACKNOWLEDGED, "ack", (), "acknowledge", "Acknowledgement by a person", False,
                  "Record that a person acknowledged the report to the reporter."),
    MilestoneSpec(Milestone.ASSESSED, "assess", (Milestone.ACKNOWLEDGED,), "assess", "Initial assessment", False,
                  "Record the assessment of the report, with its severity."),
    MilestoneSpec(Milestone.RELEASED, "released", (Milestone.ASSESSED,), "fix", "Fix released (target)", True,
                  "Record that a patched release is out (starts the disclosure clock where the policy has one)."),
    MilestoneSpec(Milestone.RESOLVED, "resolve", (Milestone.ASSESSED,), "resolve", "Resolution (target)", True,
                  "Record that the report is resolved."),
    MilestoneSpec(Milestone.DISCLOSED, "disclose", (Milestone.RELEASED,), "disclose", "Public disclosure", True,
                  "Record that the vulnerability was disclosed publicly."),
)
MILESTONES = tuple(spec.name for spec in MILESTONE_SPECS)
MILESTONE_SPEC = {spec.name: spec for spec in MILESTONE_SPECS}
# Every state a ticket can be in: a recorded milestone moves it to the state of that name.
TICKET_STATES = (TicketState.NEW, TicketState.WAITING, *MILESTONES, TicketState.CLOSED)
# States in which the report is being worked on, so a reporter who has heard nothing for a while
# gets a keep-in-loop mail: not waiting on them, not finished, not disclosed (the story is public).
WORKED_ON_STATES = (TicketState.NEW, Milestone.ACKNOWLEDGED, Milestone.ASSESSED, Milestone.RELEASED)

# -- what a ticket's history records: ``event.kind`` --


# Who events are recorded as (Event.actor). intake's own actions: SYSTEM_ACTOR, which no maintainer
# may be named. A CLI action: the maintainer whose `login` is the Unix account running it, else
# UNIX_ACTOR_PREFIX + the account's name, or UID_ACTOR_PREFIX + the uid when it has no name.
SYSTEM_ACTOR = "intake"
UNIX_ACTOR_PREFIX = "unix:"
UID_ACTOR_PREFIX = "uid:"


class EventKind:
    OPENED = "opened"
    LINKED = "linked"  # to another ticket it mentions
    LABELLED = "labelled"
    STATE_CHANGED = "state-changed"
    MILESTONE = "milestone"  # recorded by a maintainer; which one is in the detail
    SEVERITY_CHANGED = "severity-changed"
    ASSIGNED = "assigned"
    CREDIT_SET = "credit-set"
    NOTE_ADDED = "note-added"
    REOPENED = "reopened"
    MERGED = "merged"  # on the ticket that took a duplicate in
    MERGED_INTO = "merged-into"  # on the duplicate
    RECEIVED_AT_CHANGED = "received-at-changed"
    ACKNOWLEDGEMENT_SUPPRESSED = "acknowledgement-suppressed"  # loop safety or the rate limit
    BOUNCED = "bounced"
    # The relay refused mail of the ticket for a recipient (5xx at RCPT or after DATA), or the
    # outbox gave up on it after retrying: one per recipient and outbox row.
    UNDELIVERABLE = "undeliverable"
    REPORTER_UNREACHABLE = "reporter-unreachable"  # a bounce or a refusal of mail to the reporter
    PROMOTED = "promoted"  # a held message made into this ticket by a maintainer (`intake promote`)
    REPORTER_KEY_ADDED = "reporter-key-added"  # an OpenPGP key kept for the reporter (attached, or `intake key`)
    CONTENT_PURGED = "content-purged"  # `intake purge`: its report, thread and mail erased after [retention]
    # The reporter asked for the status by mail and got no automatic answer (why is in the detail).
    STATUS_REQUEST_UNANSWERED = "status-request-unanswered"
    # A progress update not sent: --quiet, its policy leaves it out, the reporter is unreachable,
    # it went already, or the ticket was closed as spam (sent ones are "progress-update-queued").
    UPDATE_SUPPRESSED = "update-suppressed"
    LANGUAGE_CHANGED = "language-changed"  # `intake language`: mail to the reporter in another language
    # Coordinated disclosure (see intake.tickets.disclosure): the reporter proposed a date by mail;
    # someone else's mail in the thread named one (not the reporter's: only noted); a maintainer
    # set the agreed date (accepting the proposal or countering it).
    DISCLOSURE_PROPOSED = "disclosure-proposed"
    DISCLOSURE_PROPOSAL_NOTED = "disclosure-proposal-noted"
    DISCLOSURE_DATE_SET = "disclosure-date-set"


class PurgeKind:
    """What one ``purge_log`` row counts (see :mod:`intake.tickets.retention`)."""

    HELD = "held-messages"  # held messages deleted, per decision
    TICKET_CONTENT = "ticket-content"  # closed tickets whose content was erased, per state / close reason
    SENT_MAIL = "sent-mail"  # bodies of sent (or given up) outbox mail erased, per mail kind


class AuditAction:
    """What an audit chain entry records (``audit_entry.action``, see :mod:`intake.store.audit`)."""

    EVENT = "event:"  # + the event's kind: an event, sealed as it was written
    SEALED = "sealed:"  # + the event's kind: an event from before the chain, sealed when it started
    # Maintainers' reads of report content (who saw what): `intake show`, `attachment`,
    # `messages show`, and the exports `advisory`, `credits` and `backup`.
    SHOW = "read:show"
    ATTACHMENT = "read:attachment"
    MESSAGE = "read:message"
    ADVISORY = "read:advisory"
    CREDITS = "read:credits"
    BACKUP = "read:backup"


# -- mail intake sends (``outbox.kind``) and the notifications recorded for it (``notification.kind``) --


class NotificationKind:
    NEW_TICKET = NEW_TICKET  # the maintainers' notice of a new report
    REMINDER = "reminder"  # a stage is coming due
    BREACH = "breach"  # a stage is past due
    ESCALATION = "escalation"  # a breach, to ``escalate_to``
    DIGEST = "digest"
    # The agreed disclosure date is 7 or 1 days away: the maintainers' notice and the reporter's
    # mail (MailKind.DISCLOSURE_REMINDER), each once per point and date.
    DISCLOSURE_REMINDER = "disclosure-reminder"
    # Never mailed: fell due before its ticket was imported from history (`intake import`).
    SUPPRESSED = "suppressed"


class MailKind:
    # to the reporter
    ACKNOWLEDGEMENT = "acknowledgement"
    OUT_OF_SCOPE = "out-of-scope"
    CORRESPONDENCE = "correspondence"  # a maintainer's reply
    DUPLICATE_NOTICE = "duplicate-notice"  # the ticket was merged into another
    STATUS_REPLY = "status-reply"  # the automatic answer to the reporter's "status" mail
    PROGRESS_UPDATE = "progress-update"  # assessed, fix released, disclosure scheduled, disclosed, closed
    KEEP_IN_LOOP = "keep-in-loop"  # "still being worked on": after [policies.X] keep_in_loop without mail to them
    DISCLOSURE_RECEIVED = "disclosure-received"  # "we received your proposed disclosure date"
    DISCLOSURE_REMINDER = "disclosure-reminder"  # 7 and 1 days before the agreed disclosure date
    # to maintainers
    NEW_TICKET = NotificationKind.NEW_TICKET
    REMINDER = NotificationKind.REMINDER
    BREACH = NotificationKind.BREACH
    ESCALATION = NotificationKind.ESCALATION
    CATCH_UP = "catch-up"  # several notices of one ticket in one mail
    KEEP_IN_LOOP_NOTICE = "keep-in-loop-notice"  # the sweep told the reporter the report is still worked on
    DIGEST = NotificationKind.DIGEST
    CONFIRMATION = "confirmation"  # of a maintainer's mail command
    REPLY_REFUSED = "reply-refused"
    REPORTER_REPLY_FORWARD = "reporter-reply-forward"
    THIRD_PARTY_FORWARD = "third-party-forward"


class Audience:
    """Who a mail of a ticket is for (``intake reminders REF`` says it of each)."""

    REPORTER = "reporter"
    MAINTAINERS = "maintainers"


class DigestStatus:
    """What sending a digest for its period did (``intake digest --send``, the scheduler)."""

    SENT = "sent"
    ALREADY_SENT = "already-sent"  # for this period, by this or another process
    EMPTY = "empty"  # skipped: nothing to say and the schedule does not send empty ones
    NO_RECIPIENTS = "no-recipients"


# The event recorded when mail of each kind is queued to the reporter; the SLA reads the
# automatic acknowledgement from these (see intake.sla.deadlines), so they are spelled here only.
QUEUED_EVENT = {
    MailKind.ACKNOWLEDGEMENT: "acknowledgement-queued",
    MailKind.OUT_OF_SCOPE: "out-of-scope-queued",
    MailKind.CORRESPONDENCE: "correspondence-queued",
    MailKind.DUPLICATE_NOTICE: "duplicate-notice-queued",
    MailKind.STATUS_REPLY: "status-reply-queued",
    MailKind.PROGRESS_UPDATE: "progress-update-queued",
    MailKind.KEEP_IN_LOOP: "keep-in-loop-queued",  # its detail names the maintainers told
    MailKind.DISCLOSURE_RECEIVED: "disclosure-received-queued",
    MailKind.DISCLOSURE_REMINDER: "disclosure-reminder-queued",
}
# The event recorded when a routed message is added to its ticket, by decision.
RECEIVED_EVENT = {decision: f"{decision}-received" for decision in DECISIONS}

# -- a ticket's thread (``thread_entry``): which way an entry went, and what it is --


class Direction:
    IN = "in"
    OUT = "out"
    INTERNAL = "internal"  # a note: never sent


class EntryKind:
    """Besides these, an inbound entry's kind is its routing decision and an outgoing one's its mail kind."""

    REPORT = "report"  # the message that opened the ticket
    AUTOMATIC = "automatic"  # the automatic reply to it
    NOTE = "note"


class KeySource:
    """Where a reporter's OpenPGP key (``reporter_key.source``) came from."""

    ATTACHED = "attached"  # carried by a report or reply (an application/pgp-keys part or an armored block)
    GIVEN = "given"  # given by a maintainer: `intake key REF FILE`


# -- how tickets relate (``ticket.links``) --


class LinkKind:
    MENTIONS = "mentions"  # the report names another ticket's reference
    DUPLICATE = "duplicate"  # this ticket took that one in
    DUPLICATE_OF = "duplicate-of"


# -- header names on mail we send --
LOOP_HEADER = "X-Intake-Loop"  # our loop marker: mail carrying it is never answered
TICKET_HEADER = "X-Intake-Ticket"  # the ticket a message belongs to; bounces quote it back
# RFC 3282: the language a message is written in; read on reports, written on our mail to reporters.
CONTENT_LANGUAGE_HEADER = "Content-Language"
ACCEPT_LANGUAGE_HEADER = "Accept-Language"  # the languages a sender reads, best first (RFC 9110 12.5.4)

# -- labels intake sets itself --
LOW_QUALITY_LABEL = "low-quality"
