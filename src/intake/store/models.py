"""The tables (SQLModel). Every instant is stored as UTC and read back timezone-aware."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, Date, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, TypeDecorator, UniqueConstraint, text
from sqlmodel import Field, SQLModel
from intake.vocabulary import InboundStatus, OutboxStatus, TicketState


class UTCDateTime(TypeDecorator):
    """Aware datetimes in, aware UTC datetimes out, on SQLite (no zone support) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; intake stores aware UTC instants")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _instant(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))




class InboundMessage(SQLModel, table=True):
    """A message exactly as received: committed before the listener answers 250."""

    __tablename__ = "inbound_message"
    # status + processed_at: the held messages of a window (digest, metrics, purge) without a scan.
    __table_args__ = (Index("ix_inbound_status_id", "status", "id"),
                      Index("ix_inbound_status_processed_at", "status", "processed_at"))

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = _instant()
    # Envelope sender; '' for the null sender <>.
    mail_from: str = Field(sa_column=Column(Text, nullable=False))
    rcpt_tos: list[str] = Field(sa_column=Column(JSON, nullable=False))
    # The client: the original one when a trusted relay named it (XFORWARD), and its HELO.
    peer: str = Field(default="", sa_column=Column(Text, nullable=False))
    helo: str = Field(default="", sa_column=Column(Text, nullable=False))
    # The trusted relay (smtp.trusted_relays) the message came through; '' for a direct client.
    relay: str = Field(default="", sa_column=Column(Text, nullable=False))
    # intake's own Return-Path: and Received: fields (CRLF lines), kept beside raw so that raw,
    # size and sha256 stay the message as sent; see intake.store.inbound.full_message.
    trace: str = Field(default="", sa_column=Column(Text, nullable=False))
    # When the message reached the organisation, where intake knows it was before received_at: a
    # fetched message's INTERNALDATE (when the hosted mailbox got it), bounded; its SLA starts
    # there (see intake.understand.arrival_time). None for mail handed to intake over SMTP.
    arrived_at: datetime | None = _instant(nullable=True)
    # Mail from before intake, stored by `intake import`: processed (threads rebuilt) but nothing
    # is sent for it, no acknowledgement, notice or forward (see intake.receive.mailbox_import).
    history: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false")))
    # The Message-ID `intake import` read (the listener reads none): a second import finds it.
    message_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True, index=True))
    size: int
    sha256: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    # The message's bytes are in inbound_raw (InboundRaw), not here: this row is updated by every
    # claim, lease renewal and outcome, and a database rewrites a row whole (and logs it whole).
    status: str = Field(default=InboundStatus.PENDING, sa_column=Column(String(16), nullable=False))
    # What the router decided (new-ticket, duplicate, auto-reply, ...).
    decision: str | None = Field(default=None, sa_column=Column(String(32)))
    # Why: which rule decided, and on what evidence ("In-Reply-To <x> is SEC-2026-0001").
    reason: str | None = Field(default=None, sa_column=Column(Text))
    error: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = 0
    processed_at: datetime | None = _instant(nullable=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    # The sender-authentication verdict (intake.understand.sender_auth.Verdict.as_dict()), set with the
    # outcome; None until then, and for messages processed before it was recorded.
    authentication: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True),
                                                                              nullable=True))
    # The data key its raw and trace are sealed with, wrapped by the storage key (see
    # intake.store.sealing.inline_key): in the row, as a data_key row would cost the listener's
    # commit a page more. None: stored in clear, or shredded.
    data_key: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    # The processor ("host/pid/batch") that claimed it, and until when its claim holds: no other
    # takes it up meanwhile (see intake.store.claims). claimed_until is cleared once it is acted
    # on; claimed_by then says which node acted.
    claimed_by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_until: datetime | None = _instant(nullable=True)


class InboundRaw(SQLModel, table=True):
    """A stored message's bytes as the client sent them (what its size and sha256 are of), one row
    per inbound_message row, written once with it and erased with it (see InboundMessage).

    Sealed like the other content, with the message's inline data key and associated data naming
    ``inbound_message.raw``, where the bytes were until migration 0019 moved them here as they were."""

    __tablename__ = "inbound_raw"

    id: int = Field(sa_column=Column(Integer, ForeignKey("inbound_message.id"), primary_key=True,
                                     autoincrement=False))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))






class PurgeLog(SQLModel, table=True):
    """One run of ``intake purge`` (or ``intake messages purge``) that erased something of one kind:
    when, how many, of what (see :mod:`intake.tickets.retention`)."""

    __tablename__ = "purge_log"

    id: int | None = Field(default=None, primary_key=True)
    # PurgeKind: held messages deleted, ticket content erased, sent mail bodies erased.
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    purged_at: datetime = _instant()
    cutoff: datetime = _instant()  # what was purged was older than it (received, closed, sent)
    total: int
    # Per label: a held message's decision, a ticket's state or close reason, a mail's kind.
    by_decision: dict[str, int] = Field(sa_column=Column(JSON, nullable=False))


class Ticket(SQLModel, table=True):
    """A tracked report, known by its public reference (SEC-2026-0001)."""

    # state + severity: the digest's table of open tickets and `intake stats` count from the index
    # alone (SQLite otherwise reads every ticket row: 0.11 s against 0.016 s at 100,000).
    # policy + state: the sweep's keep-in-loop scan (the tickets of some policies in the states worked on).
    __table_args__ = (Index("ix_ticket_state_severity", "state", "severity"),
                      Index("ix_ticket_policy_state", "policy", "state"))

    id: int | None = Field(default=None, primary_key=True)
    reference: str = Field(sa_column=Column(String(40), nullable=False, unique=True))
    subject: str = Field(sa_column=Column(Text, nullable=False))
    reporter: str = Field(sa_column=Column(Text, nullable=False, index=True))
    reporter_name: str = Field(default="", sa_column=Column(Text, nullable=False))
    # The intake address the report came in on; replies go out from it.
    intake_address: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(default=TicketState.NEW, sa_column=Column(String(24), nullable=False, index=True))
    severity: str | None = Field(default=None, sa_column=Column(String(16)))
    # The CVSS v3.x / v4.0 vector the severity was assessed with, and its base score.
    cvss_vector: str | None = Field(default=None, sa_column=Column(Text))
    cvss_score: float | None = None
    policy: str = Field(sa_column=Column(String(64), nullable=False))
    assignee: str | None = Field(default=None, sa_column=Column(Text))
    close_reason: str | None = Field(default=None, sa_column=Column(String(16)))
    labels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Other tickets this one relates to: [{"kind": "mentions", "reference": "SEC-2026-0001"}] (LinkKind).
    links: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Low-quality score of the report: {"score", "matched", "threshold", "low_quality"}.
    quality: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The language (BCP 47, one of [intake] languages) mail to the reporter is written in: read
    # from the report's headers, changed with `intake language`.
    language: str = Field(default="en", sa_column=Column(String(35), nullable=False, server_default="en"))
    # Set when our mail to the reporter bounced for good (a failed DSN); `intake show` says so.
    reporter_unreachable_at: datetime | None = _instant(nullable=True)
    # When `intake purge` erased its content ([retention] after_close); its metadata stays.
    content_purged_at: datetime | None = _instant(nullable=True)
    received_at: datetime = _instant()
    created_at: datetime = _instant()
    updated_at: datetime = _instant()
    # When `intake import` opened it from history (None: it came in live). The SLA sweep mails no
    # reminder, breach notice or escalation that fell due before this instant (see sla/reminders).
    imported_at: datetime | None = _instant(nullable=True)

    # -- credit and advisory (see :mod:`intake.tickets.credit`, :mod:`intake.tickets.advisory`) --
    # How the reporter wants to be credited, None until known:
    # {"anonymous", "name", "handle", "url", "source": "report" | "cli", "statement"}.
    credit: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True), nullable=True))


class ThreadEntry(SQLModel, table=True):
    """One message in or out of a ticket, or an internal note."""

    __tablename__ = "thread_entry"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound_message.id")
    direction: str = Field(sa_column=Column(String(8), nullable=False))  # Direction
    kind: str = Field(sa_column=Column(String(24), nullable=False))  # EntryKind, a decision or a MailKind
    # Message-ID of inbound mail, or "sha256:<hex>" when it has none: one entry per message.
    message_key: str | None = Field(default=None, sa_column=Column(Text, unique=True))
    message_id: str | None = Field(default=None, sa_column=Column(Text, index=True))
    in_reply_to: str | None = Field(default=None, sa_column=Column(Text))
    references: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    sender: str = Field(default="", sa_column=Column(Text, nullable=False))
    subject: str = Field(default="", sa_column=Column(Text, nullable=False))
    body_text: str = Field(default="", sa_column=Column(Text, nullable=False))
    # [{"index", "filename", "original_filename", "content_type", "size", "sha256"}]
    attachments: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # How an inbound message found this ticket ("+tag", "In-Reply-To <…>", "subject tag").
    threaded_by: str | None = Field(default=None, sa_column=Column(Text))
    # Set for encrypted reports: "pgp-mime", "inline-pgp", "smime".
    encrypted: str | None = Field(default=None, sa_column=Column(String(16)))
    # What OpenPGP made of it (PgpStatus.as_dict()): decrypted, signed, signer, verified, verified_with.
    pgp: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _instant()


class ReporterKey(SQLModel, table=True):
    """An OpenPGP public key a reporter gave (attached to a report, or `intake key REF FILE`):
    mail to that address is encrypted to the newest one."""

    __tablename__ = "reporter_key"
    __table_args__ = (UniqueConstraint("address", "fingerprint"),)

    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(sa_column=Column(Text, nullable=False, index=True))  # lowercased
    fingerprint: str = Field(sa_column=Column(String(64), nullable=False))  # upper-case hex
    armored: str = Field(sa_column=Column(Text, nullable=False))
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id")  # where it came from
    source: str = Field(sa_column=Column(String(16), nullable=False))  # KeySource
    created_at: datetime = _instant()


class Event(SQLModel, table=True):
    """Append-only audit trail: who did what to which ticket, when."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    at: datetime = _instant()
    actor: str = Field(sa_column=Column(Text, nullable=False))
    kind: str = Field(sa_column=Column(String(40), nullable=False))  # EventKind, QUEUED_EVENT, RECEIVED_EVENT
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class AuditEntry(SQLModel, table=True):
    """One link of the tamper-evident audit chain (see :mod:`intake.store.audit`): an event sealed,
    or a maintainer's read of report content. No foreign keys: an entry must outlive an event or
    ticket deleted behind intake's back, so that verification can name what went missing."""

    __tablename__ = "audit_entry"

    # 1, 2, 3, ... without gaps: the chain's order (a gap is an entry deleted).
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime = _instant()
    actor: str = Field(sa_column=Column(Text, nullable=False))
    # "event:<kind>", "sealed:<kind>" (history from before the chain) or "read:<what>" (AuditAction).
    action: str = Field(sa_column=Column(String(64), nullable=False))
    ticket_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True, index=True))
    event_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True, unique=True))
    # What a read read (attachment number, message id, backup path); {} for events (the event has it).
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # SHA-256 of the event row's canonical content (for events) or of detail (for reads).
    digest: str = Field(sa_column=Column(String(64), nullable=False))
    prev_mac: str = Field(sa_column=Column(String(64), nullable=False))
    # HMAC-SHA256 under the audit key of prev_mac and this entry's canonical content.
    mac: str = Field(sa_column=Column(String(64), nullable=False))


class Deadline(SQLModel, table=True):
    """When one stage of a ticket's policy is due, as last computed (see :mod:`intake.sla.deadlines`).

    Kept in step with the ticket by every change that moves a deadline, so the scheduler finds
    due work through the index on unmet ``due_at`` instead of recomputing every ticket."""

    __table_args__ = (
        UniqueConstraint("ticket_id", "stage"),
        Index("ix_deadline_unmet_due", "due_at", sqlite_where=text("met_at IS NULL"),
              postgresql_where=text("met_at IS NULL")),
        Index("ix_deadline_unmet_notify", "notify_at", sqlite_where=text("met_at IS NULL"),
              postgresql_where=text("met_at IS NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    stage: str = Field(sa_column=Column(String(64), nullable=False))
    # Position of the stage in its policy, for display in policy order.
    position: int
    # None while the stage has not started (it waits on another) or its clock is paused.
    due_at: datetime | None = _instant(nullable=True)
    started_at: datetime | None = _instant(nullable=True)
    met_at: datetime | None = _instant(nullable=True)
    # One line for people: "2 business days in Australia/Brisbane from receipt; skipped ...".
    basis: str = Field(sa_column=Column(Text, nullable=False))
    # The strictest duration was used because the severity is not known yet.
    severity_assumed: bool = Field(sa_column=Column(Boolean, nullable=False))
    computed_at: datetime = _instant()
    # When the scheduler's sweep next has to look at this stage: its next reminder point, its due
    # instant (breach notice), the next repeat or escalation; None: nothing to tell (met, paused,
    # pending). Derived from due_at, so the sweep reads only due work through its index.
    notify_at: datetime | None = _instant(nullable=True)




class Outbox(SQLModel, table=True):
    """Mail waiting to be sent; the dedupe key makes every notification exactly-once."""

    __table_args__ = (
        Index("ix_outbox_status_next", "status", "next_attempt_at"),
        Index("ix_outbox_rate", "rate_key", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    kind: str = Field(sa_column=Column(String(24), nullable=False))  # MailKind
    # Envelope sender; '' is the null sender <> (automatic replies, RFC 3834).
    envelope_from: str = Field(sa_column=Column(Text, nullable=False))
    recipients: list[str] = Field(sa_column=Column(JSON, nullable=False))
    # Automatic mail only: the lowercased recipient, for the per-recipient rate limit.
    rate_key: str | None = Field(default=None, sa_column=Column(Text))
    message_id: str = Field(sa_column=Column(Text, nullable=False))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(default=OutboxStatus.PENDING, sa_column=Column(String(16), nullable=False))
    attempts: int = 0
    created_at: datetime = _instant()
    next_attempt_at: datetime = _instant()
    sent_at: datetime | None = _instant(nullable=True)
    # A sender's claim on the row while it sends; an expired lease is claimable again.
    lease_until: datetime | None = _instant(nullable=True)
    lease_owner: str | None = Field(default=None, sa_column=Column(String(32)))
    last_error: str | None = Field(default=None, sa_column=Column(Text))


class ServiceSecret(SQLModel, table=True):
    """A secret the service made for itself, shared by every node through the database (used only
    when the operator gave none; see :mod:`intake.understand.reply_tokens`)."""

    __tablename__ = "service_secret"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _instant()


class Notification(SQLModel, table=True):
    """A reminder, breach notice, escalation, new-ticket notice or digest that was queued.

    The unique key ("remind:SEC-2026-0001:assess:50%", "breach:SEC-2026-0001:assess:2",
    "escalate:…", "new:…", "digest:daily:2026-03-30T06:00Z") is written in the transaction that
    queues the mail, so each notification goes out exactly once, whoever sweeps."""

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    kind: str = Field(sa_column=Column(String(24), nullable=False))  # NotificationKind
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    stage: str | None = Field(default=None, sa_column=Column(String(64)))
    # The reminder point ("50%", "24 hours before", "breach", "repeat 2") or the digest's name.
    label: str = Field(sa_column=Column(Text, nullable=False))
    # When it fell due: the reminder point, the due instant (+ repeats), the digest's scheduled time.
    due_at: datetime = _instant()
    created_at: datetime = _instant()
    recipients: list[str] = Field(sa_column=Column(JSON, nullable=False))
    # The outbox row that carries it (several notifications of one ticket can share one mail).
    outbox_key: str = Field(sa_column=Column(Text, nullable=False))


class DataKey(SQLModel, table=True):
    """A data key content is sealed with, wrapped by a storage key (see :mod:`intake.store.sealing`).

    One per ticket (its thread, its outbox mail), one per stored message (its raw and trace), one
    per ticketless outbox mail. Deleting the row makes what it sealed unreadable (crypto-shredding);
    no foreign key, so a purge may delete it whatever else it keeps. Written beside every message
    the listener stores, so it has as few indexes as it can: its rowid, and tickets' keys unique."""

    __tablename__ = "data_key"
    __table_args__ = (Index("ux_data_key_ticket", "ticket_id", unique=True,
                            sqlite_where=text("ticket_id IS NOT NULL"),
                            postgresql_where=text("ticket_id IS NOT NULL")),)

    # Random (2 to 2^63-1), not a sequence: sealed values name it in their header, so it is chosen
    # before the row that uses it is written (the listener seals before it inserts). INTEGER on
    # SQLite: the rowid itself, no index of its own.
    id: int = Field(sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                     autoincrement=False))
    # The ticket it belongs to; None for a stored message's key or a ticketless mail's.
    ticket_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    # Which storage key wrapped it (its key id): what `intake storage rotate` and `status` count by.
    storage_key: str = Field(sa_column=Column(String(16), nullable=False))
    wrapped: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _instant()


class ReferenceCounter(SQLModel, table=True):
    """Last number handed out per prefix and year (SEC-2026-0001, SEC-2026-0002, ...)."""

    __tablename__ = "reference_counter"
    __table_args__ = (UniqueConstraint("prefix", "year"),)

    id: int | None = Field(default=None, primary_key=True)
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    year: int
    last: int = 0


class DisclosurePlan(SQLModel, table=True):
    """A ticket's coordinated disclosure date: the reporter's latest proposal and the date a
    maintainer agreed (accepting it or countering), each with who and when; the history of both
    is in the ticket's events (see :mod:`intake.tickets.disclosure`)."""

    __tablename__ = "disclosure_plan"

    ticket_id: int = Field(foreign_key="ticket.id", primary_key=True)
    proposed_date: date | None = Field(default=None, sa_column=Column(Date, nullable=True))
    proposed_by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # the reporter's address
    proposed_at: datetime | None = _instant(nullable=True)
    # The sweep's reminders read this (7 and 1 days before), through its index.
    agreed_date: date | None = Field(default=None, sa_column=Column(Date, nullable=True, index=True))
    agreed_by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # the maintainer
    agreed_at: datetime | None = _instant(nullable=True)
