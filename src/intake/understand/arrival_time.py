"""When a message arrived, for SLA purposes: when our MX accepted it, not when intake got it.

Behind a trusted relay (``smtp.trusted_relays``) the topmost ``Received:`` field of the message
as the relay sent it is the relay's own (Postfix prepends one for every message it accepts): its
timestamp is when the organisation accepted the report, and the relay may have queued it for
hours while intake was down. That timestamp is believed within bounds, because a relay that adds
no field of its own would hand us a line the sender wrote:

* never later than intake's own receipt (a relay clock ahead cannot push deadlines out);
* never earlier than the previous hop's ``Received:`` (the next one down): a message is not
  accepted before it was sent to us;
* never earlier than the sender's ``Date:`` minus :data:`DATE_MARGIN`;
* never more than :data:`MAX_QUEUED` before intake's receipt.

A timestamp that cannot be read gives intake's receipt. Mail from a direct client never comes
here: its ``Received:`` fields are all the sender's own writing.

Mail fetched from a hosted mailbox (``[[fetch]]``) starts where the mailbox's server says it
arrived, its IMAP ``INTERNALDATE``, within the same bounds: a report that waited in the mailbox
while intake was down is not given extra time. The bounds matter more there: INTERNALDATE is
whatever an APPEND said, so a message dragged into the folder from an archive (or a migration
that kept the dates) brings a date of years ago, and would start with every deadline breached.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

from intake.understand.header_text import scan_header_block

# Postfix's maximal_queue_lifetime default: an MX gives up on (bounces) mail it could not pass on
# for this long, so nothing it accepted earlier reaches us.
MAX_QUEUED = timedelta(days=5)

# How far after the relay's timestamp a sender's Date: may be. A Date: is written by the sender's
# mail program, and the usual error there is not minutes but a local time under the wrong zone,
# up to 14 hours (UTC+14) off, plus an hour of clock skew. A tighter margin would move the start
# of such a sender's SLA later (in their disfavour) for a clock that is not ours; this one still
# keeps a forged or misread Received: from starting a clock days before a freshly dated message.
DATE_MARGIN = timedelta(hours=15)


def sla_start(relay_received: datetime | None, previous_hop: datetime | None, sender_date: datetime | None,
              received: datetime) -> datetime:
    """When a relayed message arrived: *relay_received* (the relay's ``Received:`` timestamp)
    within the bounds of the module docstring, or *received* (intake's receipt) if unknown.
    Naive datetimes are read as UTC."""
    received = _utc(received)
    if relay_received is None:
        return received
    earliest = received - MAX_QUEUED
    if previous_hop is not None:
        earliest = max(earliest, _utc(previous_hop))
    if sender_date is not None:
        earliest = max(earliest, _utc(sender_date) - DATE_MARGIN)
    return min(max(_utc(relay_received), earliest), received)


def relayed_sla_start(raw: bytes, received: datetime) -> datetime:
    """:func:`sla_start` from the header block of *raw*, a message as a trusted relay sent it."""
    fields = scan_header_block(raw)
    stamps = fields.get("received", [])
    relay_received = _received_time(stamps[0]) if stamps else None
    previous_hop = _received_time(stamps[1]) if len(stamps) > 1 else None
    dates = fields.get("date", [])
    return sla_start(relay_received, previous_hop, _date(dates[0]) if dates else None, received)


def fetched_sla_start(internal_date: datetime | None, raw: bytes, received: datetime) -> datetime:
    """When a message fetched from a hosted mailbox arrived: its *internal_date* (IMAP
    INTERNALDATE) within :func:`sla_start`'s bounds (not after *received*, intake's receipt; not
    more than MAX_QUEUED before it; not more than DATE_MARGIN before the Date: of *raw*)."""
    dates = scan_header_block(raw).get("date", [])
    return sla_start(internal_date, None, _date(dates[0]) if dates else None, received)


def _received_time(value: str) -> datetime | None:
    """The date-time after the last ``;`` of a Received: field (RFC 5321 4.4)."""
    _, semicolon, stamp = value.rpartition(";")
    return _date(stamp) if semicolon else None


def _date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(" ".join(value.split()))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
