"""What parsing a message yields: :class:`ParsedMail`, its attachments and its delivery report."""

from __future__ import annotations

from dataclasses import dataclass, field

from intake.vocabulary import ACCEPT_LANGUAGE_HEADER, CONTENT_LANGUAGE_HEADER, LOOP_HEADER, TICKET_HEADER

# Loop- and automation-relevant headers the router reads (RFC 3834 and common practice).
LOOP_HEADERS = (
    "auto-submitted", "precedence", "list-id", "list-unsubscribe", "list-post", "x-auto-response-suppress",
    "x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-reply", LOOP_HEADER.lower(), TICKET_HEADER.lower(),
    "x-mailer", "return-path", "x-spam-flag", "x-failed-recipients", "feedback-id", "content-type",
)
# The headers a reporter's language is read from (intake.language_tags).
LANGUAGE_HEADERS = (CONTENT_LANGUAGE_HEADER.lower(), ACCEPT_LANGUAGE_HEADER.lower())


@dataclass(frozen=True)
class Attachment:
    index: int
    filename: str  # safe to use as a file name
    original_filename: str  # for display only
    content_type: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeliveryReport:
    """What a bounce says about the mail it returns (RFC 3464 DSN, or a recognisable non-standard bounce)."""

    original_message_id: str | None  # from the returned message or headers, else our own In-Reply-To/References
    original_ticket: str | None  # X-Intake-Ticket of the returned headers
    recipient: str | None  # Final-Recipient / Original-Recipient address, without the 'rfc822;' type
    action: str | None  # failed | delayed | delivered | relayed | expanded
    status: str | None  # e.g. "5.1.1"
    diagnostic: str | None  # e.g. "smtp; 550 5.1.1 user unknown" (display-safe, bounded)


@dataclass(frozen=True)
class ParsedMail:
    message_id: str | None
    subject: str
    from_address: str
    from_name: str
    to: list[str]
    in_reply_to: str | None
    references: list[str]
    auto_submitted: str | None
    precedence: str | None
    content_type: str
    body_text: str
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # LOOP_HEADERS and LANGUAGE_HEADERS present: lowercased name -> first value (display-safe, bounded)
    headers: dict[str, str] = field(default_factory=dict)
    cc: list[str] = field(default_factory=list)
    recipient_count: int = 0  # distinct addresses in To + Cc
    undisclosed_recipients: bool = False  # To/Cc is an empty group ("undisclosed-recipients:;") or both are absent
    encrypted: str | None = None  # "pgp-mime" | "inline-pgp" | "smime"
    delivery_report: DeliveryReport | None = None  # DSNs and classic bounces; None for MDNs, feedback reports
    is_report: str | None = None  # report-type of a top-level multipart/report
    part_count: int = 0  # MIME entities read, those of inline embedded messages included
    header_count: int = 0  # header fields of the top-level header block, including any past the limit
    pgp: PgpStatus | None = None  # set when a report encrypted to the organisation's key was read
    public_keys: list[str] = field(default_factory=list)  # OpenPGP public keys the mail carries, armored
    body_language: str = ""  # Content-Language of its first inline text part (multipart mail), display-safe


@dataclass(frozen=True)
class PgpStatus:
    """What OpenPGP made of an encrypted report: whether it was decrypted, and its signature:
    whether it was signed, by which key (upper-case hex), whether it verified and against what
    ("key attached to the report" or "known reporter key")."""

    decrypted: bool
    signed: bool = False
    signer: str | None = None
    verified: bool = False
    verified_with: str | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)
