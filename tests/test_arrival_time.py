"""When relayed mail arrived, for its SLA: the trusted relay's Received: time, within each bound."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from intake.understand.arrival_time import DATE_MARGIN, MAX_QUEUED, relayed_sla_start, sla_start

RECEIVED = datetime(2026, 12, 3, 10, 0, tzinfo=timezone.utc)  # when intake got it
HOUR = timedelta(hours=1)


def test_the_relays_time_is_the_start_when_it_is_within_every_bound():
    assert sla_start(RECEIVED - 6 * HOUR, RECEIVED - 7 * HOUR, RECEIVED - 8 * HOUR, RECEIVED) == RECEIVED - 6 * HOUR


def test_never_later_than_intakes_own_receipt():
    """A relay clock ahead of ours cannot push the deadlines out."""
    assert sla_start(RECEIVED + 2 * HOUR, None, None, RECEIVED) == RECEIVED
    assert sla_start(RECEIVED + timedelta(seconds=1), None, None, RECEIVED) == RECEIVED


def test_never_earlier_than_the_previous_hop():
    assert sla_start(RECEIVED - 6 * HOUR, RECEIVED - 2 * HOUR, None, RECEIVED) == RECEIVED - 2 * HOUR


def test_never_earlier_than_the_senders_date_less_the_margin():
    date = RECEIVED - 3 * HOUR
    assert sla_start(RECEIVED - 30 * HOUR, None, date, RECEIVED) == date - DATE_MARGIN
    # Within the margin the relay's time stands: a Date: written in the wrong zone is hours off.
    assert sla_start(date - DATE_MARGIN + HOUR, None, date, RECEIVED) == date - DATE_MARGIN + HOUR


def test_never_more_than_the_longest_queue_before_intakes_receipt():
    assert MAX_QUEUED == timedelta(days=5)
    assert sla_start(RECEIVED - timedelta(days=9), None, None, RECEIVED) == RECEIVED - MAX_QUEUED
    # ... even when the other bounds (also the sender's writing) would allow it.
    assert sla_start(RECEIVED - timedelta(days=9), RECEIVED - timedelta(days=8), RECEIVED - timedelta(days=8),
                     RECEIVED) == RECEIVED - MAX_QUEUED


def test_the_upper_bound_wins_over_lower_bounds_past_it():
    """A previous hop or a Date: in the future (the sender's clock) still starts no later than receipt."""
    assert sla_start(RECEIVED - HOUR, RECEIVED + 5 * HOUR, RECEIVED + 30 * HOUR, RECEIVED) == RECEIVED


def test_no_relay_time_is_intakes_receipt_and_naive_times_are_utc():
    assert sla_start(None, RECEIVED - HOUR, RECEIVED - HOUR, RECEIVED) == RECEIVED
    naive = (RECEIVED - HOUR).replace(tzinfo=None)
    assert sla_start(naive, None, None, RECEIVED) == RECEIVED - HOUR


def _message(*received: str, date: str | None = None) -> bytes:
    lines = [f"Received: {value}" for value in received] + ([f"Date: {date}"] if date else [])
    in_body = "Received: from body.example; " + format_datetime(RECEIVED - 90 * HOUR)  # not a header
    return ("\r\n".join(lines + ["From: a@researcher.test", "Subject: x", "", "body", in_body]) + "\r\n").encode()


def _stamp(at: datetime) -> str:
    return format_datetime(at)


def test_read_from_the_header_block_topmost_first():
    raw = _message(
        f"from client.test (mail.client.test [192.0.2.7])\r\n\tby mx.example.com (Postfix) with ESMTPS id 4AB\r\n"
        f"\tfor <security@example.com>; {_stamp(RECEIVED - 4 * HOUR)} (UTC)",
        f"from laptop by mail.client.test; {_stamp(RECEIVED - 5 * HOUR)}",
        date=_stamp(RECEIVED - 5 * HOUR))
    assert relayed_sla_start(raw, RECEIVED) == RECEIVED - 4 * HOUR
    # The next Received: down bounds it; another zone is the same instant.
    tokyo = (RECEIVED - 3 * HOUR).astimezone(timezone(timedelta(hours=9)))
    later_hop = _message(f"by mx; {_stamp(RECEIVED - 4 * HOUR)}", f"by hop; {tokyo:%a, %d %b %Y %H:%M:%S %z}")
    assert relayed_sla_start(later_hop, RECEIVED) == RECEIVED - 3 * HOUR
    dated = _message(f"by mx; {_stamp(RECEIVED - 40 * HOUR)}", date=_stamp(RECEIVED - 2 * HOUR))
    assert relayed_sla_start(dated, RECEIVED) == RECEIVED - 2 * HOUR - DATE_MARGIN


@pytest.mark.parametrize("received", [
    "from mx.example.com by intake",                       # no timestamp
    "by mx.example.com; not a date",
    "by mx.example.com; Thu, 99 Dec 2026 25:61:00 +0000",
    "by mx.example.com; " + "9" * 500,
])
def test_an_unreadable_relay_time_is_intakes_receipt(received):
    assert relayed_sla_start(_message(received, f"by hop; {_stamp(RECEIVED - 3 * HOUR)}"), RECEIVED) == RECEIVED


def test_no_received_field_is_intakes_receipt_and_unreadable_bounds_are_no_bounds():
    assert relayed_sla_start(_message(date=_stamp(RECEIVED - HOUR)), RECEIVED) == RECEIVED
    raw = _message(f"by mx; {_stamp(RECEIVED - 4 * HOUR)}", "by hop; garbage", date="yesterday-ish")
    assert relayed_sla_start(raw, RECEIVED) == RECEIVED - 4 * HOUR
