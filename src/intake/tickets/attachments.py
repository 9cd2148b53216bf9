"""A ticket's attachment read back from its stored message exactly as received (``intake
attachment``); apart from :mod:`intake.tickets.reads` because it needs the mail parser."""

from __future__ import annotations

from sqlalchemy import Engine

from intake.store import inbound, sealing
from intake.tickets.reads import numbered_attachments, ticket_detail
from intake.understand.content import extract_attachment
from intake.understand.parsed_mail import Attachment
from intake.understand.pgp_inbound import Decryption, opened_message


class AttachmentMissing(LookupError):
    """The attachment asked for cannot be given; the message says why."""


def read(engine: Engine, reference: str, number: int, decryption: Decryption | None = None) -> tuple[Attachment, bytes]:
    """Attachment *number* of ticket *reference* (as
    :func:`intake.tickets.reads.numbered_attachments` numbers them) and
    its bytes exactly as received, decoded from the transfer encoding, from the stored message
    (decrypted again with *decryption* when it came as PGP/MIME to the organisation's key).
    Raises :class:`intake.tickets.reads.TicketNotFound` or :class:`AttachmentMissing`."""
    detail = ticket_detail(engine, reference)
    located = {n: key for key, n in numbered_attachments(detail).items()}
    if number not in located:
        raise AttachmentMissing(f"{detail.ticket.reference} has {len(located)} attachment(s); "
                                f"there is no number {number}")
    entry_id, index = located[number]
    entry = next(e for e in detail.entries if e.id == entry_id)
    if not any("filename" in a for a in entry.attachments if a["index"] == index):  # see intake.tickets.erasure
        purged = detail.ticket.content_purged_at
        raise AttachmentMissing(f"attachment {number} was purged{f' on {purged:%Y-%m-%d}' if purged else ''} "
                                "([retention] after_close)")
    try:
        stored = inbound.get(engine, entry.inbound_id) if entry.inbound_id else None
    except sealing.Shredded:
        raise AttachmentMissing(f"attachment {number} was purged with the content of its message") from None
    if stored is None:
        raise AttachmentMissing(f"the stored message of attachment {number} is gone")
    try:
        return extract_attachment(opened_message(stored.raw, decryption), index)
    except LookupError:  # the parser no longer finds it where it was numbered: say so
        raise AttachmentMissing(f"attachment {number} can no longer be read from stored message "
                                f"{stored.message.id}") from None
