"""The SLA engine: duration arithmetic, stage deadlines, states, config validation.

All instants are explicit; every expected value is worked out by hand in the
comment beside it. Property tests at the end check the invariants of the
business-time arithmetic against independent implementations.
"""

from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from intake.sla.calendars import CalendarConfig, add_duration, builtin_calendars, holidays_country_codes, parse_duration
from intake.sla.engine import (
    PolicyConfig, StageConfig, acknowledge_met_at, compute_deadlines, stage_state, validate_policies,
)

BRISBANE = ZoneInfo("Australia/Brisbane")  # UTC+10, no DST
BERLIN = ZoneInfo("Europe/Berlin")  # CET/CEST; 2026 changes on Sun 29 Mar and Sun 25 Oct

BRISBANE_AU = CalendarConfig(timezone="Australia/Brisbane", holidays_country="AU")
BERLIN_OFFICE = CalendarConfig(timezone="Europe/Berlin")
# A night shift every day whose hours contain the 02:00/03:00 DST change.
BERLIN_NIGHTS = CalendarConfig(
    timezone="Europe/Berlin", workdays=["mon", "tue", "wed", "thu", "fri", "sat", "sun"], working_hours="00:00-08:00"
)
BERLIN_EVERY_DAY = CalendarConfig(timezone="Europe/Berlin", workdays=["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
UTC_CALENDAR = builtin_calendars()["utc"]


def at(zone, *args):
    return datetime(*args, tzinfo=zone)


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def bne(*args):
    return datetime(*args, tzinfo=BRISBANE)


def policy(*stages, **settings_):
    return PolicyConfig(auto_ack_counts=False, stages=list(stages), **settings_)


def stage(name, duration=None, **fields):
    return StageConfig(name=name, duration=duration, **fields)


def by_stage(deadlines):
    return {deadline.stage: deadline for deadline in deadlines}


# --------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("72 hours", "72 hours"),
        ("1 day", "1 day"),
        ("1 days", "1 day"),
        ("  2   Business   Days ", "2 business days"),
        ("45 minutes", "45 minutes"),
        ("8 business hours", "8 business hours"),
        ("1 business hour", "1 business hour"),
        ("0 days", "0 days"),
    ],
)
def test_parse_duration_accepts_and_normalises(text, normalised):
    assert str(parse_duration(text)) == normalised


@pytest.mark.parametrize(
    "text",
    ["72 hrs", "two days", "5 business minutes", "-1 days", "1.5 hours", "", "3 weeks", "days 3", "3days", "3654 days"],
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_elapsed_durations_ignore_the_calendar_and_return_utc():
    due, skipped = add_duration(bne(2026, 11, 28, 10), "45 minutes", BRISBANE_AU)  # a Saturday
    assert due == bne(2026, 11, 28, 10, 45) and due.tzinfo is UTC
    assert skipped == []


@pytest.mark.parametrize("text", ["0 minutes", "0 hours", "0 days", "0 business hours", "0 business days"])
def test_zero_durations_return_the_start_even_outside_working_time(text):
    saturday = bne(2026, 11, 28, 10)
    assert add_duration(saturday, text, BRISBANE_AU) == (saturday, [])


# --------------------------------------------------------------------------
# Business hours
# --------------------------------------------------------------------------


def test_business_hours_start_at_the_next_opening():
    # Sat 28 Nov 2026 10:00: the clock starts Mon 30 Nov 09:00, + 1 h = 10:00.
    due, skipped = add_duration(bne(2026, 11, 28, 10), "1 business hour", BRISBANE_AU)
    assert due == bne(2026, 11, 30, 10)
    assert skipped == [(date(2026, 11, 28), "weekend"), (date(2026, 11, 29), "weekend")]
    # Before opening on a working day: Mon 07:00 -> 09:00 + 1 h.
    assert add_duration(bne(2026, 11, 30, 7), "1 business hour", BRISBANE_AU)[0] == bne(2026, 11, 30, 10)


def test_business_hours_deadline_at_closing_stays_at_closing():
    # Mon 09:00 + 8 h of a 09:00-17:00 day ends exactly at 17:00, not Tue 09:00.
    assert add_duration(bne(2026, 11, 30, 9), "8 business hours", BRISBANE_AU)[0] == bne(2026, 11, 30, 17)
    assert add_duration(bne(2026, 11, 30, 16), "1 business hour", BRISBANE_AU)[0] == bne(2026, 11, 30, 17)
    # One hour more rolls to Tue 09:00 + 1 h.
    assert add_duration(bne(2026, 11, 30, 16), "2 business hours", BRISBANE_AU)[0] == bne(2026, 12, 1, 10)
    # Started exactly at closing: nothing left today.
    assert add_duration(bne(2026, 11, 30, 17), "1 business hour", BRISBANE_AU)[0] == bne(2026, 12, 1, 10)


def test_business_hours_over_christmas():
    # Thu 24 Dec 2026 16:00 + 8 h: 1 h on Thursday; Fri 25 Christmas, Sat/Sun weekend;
    # Mon 28 09:00 + 7 h = 16:00.
    due, skipped = add_duration(bne(2026, 12, 24, 16), "8 business hours", BRISBANE_AU)
    assert due == bne(2026, 12, 28, 16)
    assert [day for day, _ in skipped] == [date(2026, 12, 25), date(2026, 12, 26), date(2026, 12, 27)]


def test_business_hours_across_spring_dst_change():
    # Fri 27 Mar 2026 15:00 CET (14:00 UTC) + 8 h: 2 h to 17:00 CET, then Mon 30 Mar
    # 09:00 CEST + 6 h = 15:00 CEST = 13:00 UTC (a fixed UTC+1 would wrongly give 14:00 UTC).
    due, skipped = add_duration(at(BERLIN, 2026, 3, 27, 15), "8 business hours", BERLIN_OFFICE)
    assert due == utc(2026, 3, 30, 13)
    assert [day for day, _ in skipped] == [date(2026, 3, 28), date(2026, 3, 29)]


def test_business_hours_across_autumn_dst_change():
    # Fri 23 Oct 2026 15:00 CEST (13:00 UTC) + 8 h -> Mon 26 Oct 15:00 CET = 14:00 UTC.
    assert add_duration(at(BERLIN, 2026, 10, 23, 15), "8 business hours", BERLIN_OFFICE)[0] == utc(2026, 10, 26, 14)


def test_business_hours_inside_a_dst_change_day():
    # Sun 29 Mar 2026 00:00-08:00 Berlin is 23:00 UTC Sat to 06:00 UTC Sun: only 7 h.
    # 8 h from its opening: 7 h that night, then Mon 30 opens 00:00 CEST (22:00 UTC Sun) + 1 h.
    due, _ = add_duration(at(BERLIN, 2026, 3, 29, 0), "8 business hours", BERLIN_NIGHTS)
    assert due == utc(2026, 3, 29, 23)
    # Sun 25 Oct 2026 00:00 CEST (22:00 UTC Sat) to 08:00 CET (07:00 UTC): 9 h, so 8 h end
    # at 06:00 UTC = 07:00 CET, before the wall-clock closing.
    due, _ = add_duration(at(BERLIN, 2026, 10, 25, 0), "8 business hours", BERLIN_NIGHTS)
    assert due == utc(2026, 10, 25, 6)


# --------------------------------------------------------------------------
# Business days
# --------------------------------------------------------------------------


def test_business_days_from_midnight_end_at_the_midnight_after_the_last_day():
    # Mon 30 Nov 2026 00:00 + 1 day owns all of Monday: due Tue 00:00.
    assert add_duration(bne(2026, 11, 30, 0), "1 business day", BRISBANE_AU)[0] == bne(2026, 12, 1, 0)
    # Fri 27 Nov 00:00 + 1 day ends as Friday ends (Sat 00:00), not on Monday.
    assert add_duration(bne(2026, 11, 27, 0), "1 business day", BRISBANE_AU) == (bne(2026, 11, 28, 0), [])


def test_business_days_started_on_a_holiday():
    # Good Friday 26 Mar 2027 10:00: the clock starts Tue 30 Mar 00:00 (after Easter Monday)
    # and 1 business day owns Tuesday: due Wed 31 Mar 00:00.
    due, skipped = add_duration(bne(2027, 3, 26, 10), "1 business day", BRISBANE_AU)
    assert due == bne(2027, 3, 31, 0)
    assert skipped == [
        (date(2027, 3, 26), "Good Friday"),
        (date(2027, 3, 27), "weekend"),
        (date(2027, 3, 28), "weekend"),
        (date(2027, 3, 29), "Easter Monday"),
    ]


def test_business_days_across_dst_keep_the_wall_clock_time():
    # Fri 27 Mar 2026 15:00 CET + 1 business day = Mon 30 Mar 15:00 CEST = 13:00 UTC.
    assert add_duration(at(BERLIN, 2026, 3, 27, 15), "1 business day", BERLIN_OFFICE)[0] == utc(2026, 3, 30, 13)
    # Every day working: Sat 28 Mar 12:00 CET (11:00 UTC) + 1 day = Sun 29 Mar 12:00 CEST
    # = 10:00 UTC; the 23-hour DST day counts as one whole business day.
    assert add_duration(at(BERLIN, 2026, 3, 28, 12), "1 business day", BERLIN_EVERY_DAY)[0] == utc(2026, 3, 29, 10)
    # Sat 24 Oct 12:00 CEST (10:00 UTC) + 1 day = Sun 25 Oct 12:00 CET = 11:00 UTC (25 h).
    assert add_duration(at(BERLIN, 2026, 10, 24, 12), "1 business day", BERLIN_EVERY_DAY)[0] == utc(2026, 10, 25, 11)


@pytest.mark.parametrize("text", ["24 hours", "1 day"])
def test_elapsed_day_is_24_hours_across_dst(text):
    # Sat 28 Mar 2026 12:00 CET (11:00 UTC) + 24 h = Sun 11:00 UTC = 13:00 CEST.
    assert add_duration(at(BERLIN, 2026, 3, 28, 12), text, BERLIN_OFFICE)[0] == at(BERLIN, 2026, 3, 29, 13)
    # Sat 24 Oct 2026 12:00 CEST (10:00 UTC) + 24 h = Sun 10:00 UTC = 11:00 CET.
    assert add_duration(at(BERLIN, 2026, 10, 24, 12), text, BERLIN_OFFICE)[0] == at(BERLIN, 2026, 10, 25, 11)


def test_extra_holidays_are_skipped_and_named():
    shutdown = CalendarConfig(
        timezone="Australia/Brisbane",
        holidays_country="AU",
        extra_holidays=[date(2026, 12, 28), date(2026, 12, 29), date(2026, 12, 30), date(2026, 12, 31)],
    )
    # Thu 24 Dec 10:00: 25 Christmas, 26/27 weekend, 28-31 shutdown, 1 Jan New Year's Day,
    # 2/3 weekend; Mon 4 Jan (1), Tue 5 Jan (2).
    due, skipped = add_duration(bne(2026, 12, 24, 10), "2 business days", shutdown)
    assert due == bne(2027, 1, 5, 10)
    assert skipped[3:7] == [(date(2026, 12, day), "extra holiday") for day in (28, 29, 30, 31)]
    assert len(skipped) == 10


def test_default_calendar_is_utc_monday_to_friday():
    # A policy naming no calendar uses the built-in "utc": Fri 5 Jun 2026 12:00 UTC + 1 business
    # day skips the weekend: Mon 8 Jun 12:00 UTC.
    (only,) = compute_deadlines(policy(stage("triage", "1 business day")), {}, received_at=utc(2026, 6, 5, 12))
    assert only.due == utc(2026, 6, 8, 12)
    assert only.basis == "1 business day in UTC from receipt; skipped Sat 6 Jun (weekend), Sun 7 Jun (weekend)"


def test_a_configured_calendar_named_utc_wins_over_the_builtin():
    every_day = {"utc": CalendarConfig(timezone="UTC", workdays=["mon", "tue", "wed", "thu", "fri", "sat", "sun"])}
    (only,) = compute_deadlines(policy(stage("triage", "1 business day")), every_day, received_at=utc(2026, 6, 5, 12))
    assert only.due == utc(2026, 6, 6, 12)  # Saturday now counts


def test_basis_summarises_a_long_list_of_skipped_days():
    shutdown = CalendarConfig(
        timezone="Australia/Brisbane",
        holidays_country="AU",
        extra_holidays=[date(2026, 12, 28), date(2026, 12, 29), date(2026, 12, 30), date(2026, 12, 31)],
    )
    (only,) = compute_deadlines(
        policy(stage("acknowledge", "2 business days"), calendar="shutdown"),
        {"shutdown": shutdown},
        received_at=bne(2026, 12, 24, 10),
    )
    # Ten days skipped (see test_extra_holidays_are_skipped_and_named): eight shown, two summarised.
    assert only.basis.endswith("Thu 31 Dec (extra holiday), Fri 1 Jan (New Year's Day) and 2 more")


# --------------------------------------------------------------------------
# Severity
# --------------------------------------------------------------------------

STRICTNESS_POLICY = policy(stage("fix", "3 days", by_severity={"critical": "2 business days"}))


def test_strictest_duration_is_chosen_by_outcome_not_by_text():
    # From Fri 5 Jun 2026 10:00 UTC: "2 business days" = Tue 9 Jun 10:00, "3 days" = Mon 8 Jun
    # 10:00, so "3 days" is stricter here although 3 > 2.
    (friday,) = compute_deadlines(STRICTNESS_POLICY, {}, received_at=utc(2026, 6, 5, 10))
    assert friday.due == utc(2026, 6, 8, 10)
    assert friday.basis == "3 days (severity unknown: strictest) from receipt"
    assert friday.severity_assumed
    # From Mon 8 Jun 10:00: 2 business days = Wed 10 Jun, 3 days = Thu 11 Jun.
    (monday,) = compute_deadlines(STRICTNESS_POLICY, {}, received_at=utc(2026, 6, 8, 10))
    assert monday.due == utc(2026, 6, 10, 10)
    assert monday.basis == "2 business days (severity unknown: strictest) in UTC from receipt"


def test_known_severity_uses_its_own_duration():
    (critical,) = compute_deadlines(STRICTNESS_POLICY, {}, received_at=utc(2026, 6, 5, 10), severity="critical")
    assert critical.due == utc(2026, 6, 9, 10)  # Fri + 2 business days = Tue
    assert not critical.severity_assumed
    (low,) = compute_deadlines(STRICTNESS_POLICY, {}, received_at=utc(2026, 6, 5, 10), severity="low")
    assert low.due == utc(2026, 6, 8, 10)  # the default, 3 days


def test_stage_without_severity_dependence_assumes_nothing():
    (only,) = compute_deadlines(policy(stage("ack", "1 day")), {}, received_at=utc(2026, 6, 5, 10))
    assert not only.severity_assumed
    assert only.basis == "1 day from receipt"


def test_unknown_severity_is_rejected():
    with pytest.raises(ValueError, match="urgent"):
        compute_deadlines(STRICTNESS_POLICY, {}, received_at=utc(2026, 6, 5), severity="urgent")


# --------------------------------------------------------------------------
# Stage and event starts
# --------------------------------------------------------------------------

CHAINED = policy(
    stage("assess", "5 days"),
    stage("fix", "10 days", start="stage:assess"),
    stage("disclose", "7 days", start="event:released"),
)


def test_stage_start_waits_for_the_earlier_stage():
    received = utc(2026, 6, 1)
    deadlines = by_stage(compute_deadlines(CHAINED, {}, received_at=received))
    assert deadlines["fix"].due is None and deadlines["fix"].start is None
    assert deadlines["fix"].basis == "starts when stage 'assess' is met"
    assert stage_state(deadlines["fix"], None, utc(2026, 7, 1), timedelta(days=1)) == "pending"
    # Assessed Wed 3 Jun 12:00: fix due 10 days later, Sat 13 Jun 12:00.
    met = {"assess": utc(2026, 6, 3, 12)}
    deadlines = by_stage(compute_deadlines(CHAINED, {}, received_at=received, met=met))
    assert deadlines["fix"].start == utc(2026, 6, 3, 12)
    assert deadlines["fix"].due == utc(2026, 6, 13, 12)
    assert deadlines["fix"].basis == "10 days from stage 'assess' met"


def test_event_start():
    deadlines = by_stage(
        compute_deadlines(CHAINED, {}, received_at=utc(2026, 6, 1), events={"released": utc(2026, 6, 20, 8)})
    )
    assert deadlines["disclose"].due == utc(2026, 6, 27, 8)
    assert deadlines["disclose"].basis == "7 days from event 'released'"


def test_met_and_event_instants_may_be_in_any_zone():
    released = at(BERLIN, 2026, 6, 20, 10)  # 08:00 UTC (CEST)
    deadlines = by_stage(compute_deadlines(CHAINED, {}, received_at=utc(2026, 6, 1), events={"released": released}))
    assert deadlines["disclose"].due == utc(2026, 6, 27, 8)


def test_naive_instants_are_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_deadlines(CHAINED, {}, received_at=datetime(2026, 6, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        add_duration(datetime(2026, 6, 1), "1 day", UTC_CALENDAR)


# --------------------------------------------------------------------------
# Pauses
# --------------------------------------------------------------------------

PAUSING = policy(
    stage("acknowledge", "24 hours"),
    stage("assess", "2 business days"),
    stage("disclose", "7 days", start="event:released"),
    pause_while_waiting=True,
)
RECEIVED = utc(2026, 6, 1)  # Mon 1 Jun 2026 00:00 UTC; acknowledge due Tue 2 Jun 00:00


def ack_with(pauses, **kwargs):
    return by_stage(compute_deadlines(PAUSING, {}, received_at=RECEIVED, pauses=pauses, **kwargs))["acknowledge"]


def test_a_closed_pause_is_added_back():
    ack = ack_with([(utc(2026, 6, 1, 6), utc(2026, 6, 1, 10))])
    assert ack.due == utc(2026, 6, 2, 4)  # + 4 h
    assert ack.basis == "24 hours from receipt; +4h paused"


def test_an_open_pause_stops_the_clock():
    ack = ack_with([(utc(2026, 6, 1, 6), None)])
    assert ack.due is None and ack.start == RECEIVED
    assert ack.basis == "24 hours from receipt; clock paused since 2026-06-01 06:00 UTC while waiting on the reporter"
    assert stage_state(ack, None, utc(2026, 6, 9), timedelta(hours=1)) == "paused"


def test_a_pause_after_the_deadline_does_not_undo_a_breach():
    ack = ack_with([(utc(2026, 6, 2, 1), utc(2026, 6, 2, 5))])
    assert ack.due == utc(2026, 6, 2)
    assert stage_state(ack, None, utc(2026, 6, 2, 3), timedelta(hours=1)) == "breached"
    assert ack_with([(utc(2026, 6, 2, 1), None)]).due == utc(2026, 6, 2)


def test_pauses_that_start_within_the_extended_clock_count_too():
    pauses = [
        (utc(2026, 6, 1, 20), utc(2026, 6, 2, 2)),  # 6 h: due moves to Tue 06:00
        (utc(2026, 6, 2, 4), utc(2026, 6, 2, 5)),  # began before 06:00: + 1 h, due Tue 07:00
        (utc(2026, 6, 2, 8), utc(2026, 6, 2, 9)),  # began after 07:00: ignored
    ]
    ack = ack_with(pauses)
    assert ack.due == utc(2026, 6, 2, 7)
    assert ack.basis.endswith("+7h paused")


def test_overlapping_pauses_count_once():
    # 06:00-10:00 and 08:00-12:00 cover 06:00-12:00: 6 h, not 8 h.
    assert ack_with([(utc(2026, 6, 1, 8), utc(2026, 6, 1, 12)), (utc(2026, 6, 1, 6), utc(2026, 6, 1, 10))]).due == utc(
        2026, 6, 2, 6
    )


def test_pauses_after_the_stage_was_met_do_not_count():
    met = {"acknowledge": utc(2026, 6, 1, 5)}
    assert ack_with([(utc(2026, 6, 1, 6), utc(2026, 6, 1, 10))], met=met).due == utc(2026, 6, 2)
    still_waiting = ack_with([(utc(2026, 6, 1, 6), None)], met=met)
    assert still_waiting.due == utc(2026, 6, 2)
    assert stage_state(still_waiting, met["acknowledge"], utc(2026, 6, 9), timedelta(hours=1)) == "met"


def test_met_during_a_pause_counts_the_pause_up_to_the_meeting():
    # Paused 20:00 Mon, met 02:00 Tue while still waiting: 6 h counted, due Tue 06:00, met on time.
    met = {"acknowledge": utc(2026, 6, 2, 2)}
    ack = ack_with([(utc(2026, 6, 1, 20), None)], met=met)
    assert ack.due == utc(2026, 6, 2, 6)
    assert stage_state(ack, met["acknowledge"], utc(2026, 6, 9), timedelta(hours=1)) == "met"


def test_pauses_before_a_stage_starts_do_not_count():
    released = {"released": utc(2026, 6, 10)}  # disclose due Wed 17 Jun 00:00 without pauses
    before = [(utc(2026, 6, 5), utc(2026, 6, 8))]
    disclose = by_stage(compute_deadlines(PAUSING, {}, received_at=RECEIVED, events=released, pauses=before))
    assert disclose["disclose"].due == utc(2026, 6, 17)
    # A pause straddling the start counts only from the start: 10 Jun 00:00 to 11 Jun 00:00 = 1 day.
    straddling = [(utc(2026, 6, 9), utc(2026, 6, 11))]
    disclose = by_stage(compute_deadlines(PAUSING, {}, received_at=RECEIVED, events=released, pauses=straddling))
    assert disclose["disclose"].due == utc(2026, 6, 18)


def test_business_clocks_get_the_paused_elapsed_time_back():
    # Received Fri 5 Jun 2026 10:00 UTC: 2 business days = Tue 9 Jun 10:00. Paused Fri 16:00 to
    # Mon 8 Jun 10:00 = 66 elapsed hours (the weekend included, by contract): Fri 12 Jun 04:00.
    pauses = [(utc(2026, 6, 5, 16), utc(2026, 6, 8, 10))]
    assess = by_stage(compute_deadlines(PAUSING, {}, received_at=utc(2026, 6, 5, 10), pauses=pauses))["assess"]
    assert assess.due == utc(2026, 6, 12, 4)
    assert assess.basis.endswith("; +2d 18h paused")


def test_pause_ending_before_it_began_is_rejected():
    with pytest.raises(ValueError, match="before it began"):
        ack_with([(utc(2026, 6, 1, 10), utc(2026, 6, 1, 9))])


# --------------------------------------------------------------------------
# States and acknowledgement
# --------------------------------------------------------------------------


def test_stage_state_met_without_a_due_is_met():
    (pending,) = [d for d in compute_deadlines(CHAINED, {}, received_at=utc(2026, 6, 1)) if d.stage == "disclose"]
    assert stage_state(pending, utc(2026, 6, 5), utc(2026, 6, 9), timedelta(hours=1)) == "met"


def test_auto_ack_counts_when_the_policy_says_so():
    counting = policy(stage("acknowledge", "24 hours")).model_copy(update={"auto_ack_counts": True})
    auto, human = utc(2026, 6, 1, 0, 0, 5), utc(2026, 6, 1, 9)
    assert acknowledge_met_at(counting, auto_ack_sent_at=auto, first_human_reply_at=human) == auto
    assert acknowledge_met_at(counting, auto_ack_sent_at=None, first_human_reply_at=human) == human
    assert acknowledge_met_at(counting, auto_ack_sent_at=None, first_human_reply_at=None) is None


# --------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------


def validation_error(model, **fields):
    with pytest.raises(ValidationError) as caught:
        model(**fields)
    return str(caught.value)


def test_misspelled_keys_are_named():
    assert "workday" in validation_error(CalendarConfig, timezone="UTC", workday=["mon"])
    assert "durations" in validation_error(StageConfig, name="ack", durations="1 day")
    assert "pause_while_wating" in validation_error(
        PolicyConfig, auto_ack_counts=False, pause_while_wating=True, stages=[{"name": "ack", "duration": "1 day"}]
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timezone": "Australia/Brisbaen"}, "unknown IANA time zone"),
        ({"timezone": "UTC", "workdays": ["mon", "tues"]}, "unknown workdays"),
        ({"timezone": "UTC", "workdays": []}, "at least one day"),
        ({"timezone": "UTC", "workdays": ["mon", "mon"]}, "twice"),
        ({"timezone": "UTC", "working_hours": "17:00-09:00"}, "opening must be before closing"),
        ({"timezone": "UTC", "working_hours": "09:00-09:00"}, "opening must be before closing"),
        ({"timezone": "UTC", "working_hours": "9-17"}, "HH:MM-HH:MM"),
        ({"timezone": "UTC", "working_hours": "09:00-24:00"}, "invalid working_hours"),
        ({"timezone": "UTC", "holidays_country": "XX"}, "not known to the holidays package"),
        ({"timezone": "UTC", "holidays_country": "AU", "holidays_subdivision": "ZZ"}, "not a subdivision of AU"),
        ({"timezone": "UTC", "holidays_subdivision": "QLD"}, "needs holidays_country"),
    ],
)
def test_calendar_validation(fields, message):
    assert message in validation_error(CalendarConfig, **fields)


def test_calendar_normalises_country_and_weekdays():
    calendar = CalendarConfig(timezone="UTC", holidays_country="au", holidays_subdivision="QLD", workdays=["Mon"])
    assert calendar.holidays_country == "AU" and calendar.workdays == ["mon"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "fix", "duration": "72 hrs"}, "invalid duration"),
        ({"name": "fix", "duration": "1 day", "by_severity": {"severe": "1 day"}}, "unknown severities"),
        ({"name": "fix", "duration": "1 day", "by_severity": {"high": "soon"}}, "invalid duration"),
        ({"name": "fix"}, "no duration for severities"),
        ({"name": "fix", "by_severity": {"critical": "1 day"}}, "'high', 'medium', 'low', 'none'"),
        ({"name": "fix", "duration": "1 day", "start": "on:released"}, "invalid start"),
        ({"name": "fix", "duration": "1 day", "start": "stage:"}, "invalid start"),
        ({"name": "fix", "duration": "1 day", "start": "event: released"}, "invalid start"),
        ({"name": "fix it", "duration": "1 day"}, "invalid stage name"),
    ],
)
def test_stage_validation(fields, message):
    assert message in validation_error(StageConfig, **fields)


def test_stage_may_list_every_severity_without_a_default():
    full = {severity: "1 day" for severity in ("critical", "high", "medium", "low", "none")}
    assert StageConfig(name="fix", by_severity=full).duration_for("low") == "1 day"


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "duration": "1 day"}, {"name": "a", "duration": "2 days"}], "duplicate stage names ['a']"),
        ([{"name": "a", "duration": "1 day", "start": "stage:b"}], "unknown stage 'b'"),
        ([{"name": "a", "duration": "1 day", "start": "stage:a"}], "itself"),
        (
            [
                {"name": "a", "duration": "1 day", "start": "stage:b"},
                {"name": "b", "duration": "1 day", "start": "stage:a"},
            ],
            "cycle: a -> b -> a",
        ),
        ([], "at least 1 item"),
    ],
)
def test_policy_validation(stages, message):
    assert message in validation_error(PolicyConfig, auto_ack_counts=False, stages=stages)


def test_policy_must_say_whether_the_auto_ack_counts():
    assert "auto_ack_counts" in validation_error(PolicyConfig, stages=[{"name": "a", "duration": "1 day"}])


def test_validate_policies_names_unknown_calendars():
    brisbane = {"brisbane": BRISBANE_AU}
    fine = policy(stage("acknowledge", "1 day", calendar="brisbane"), stage("fix", "1 day", calendar="utc"))
    validate_policies({"fine": fine}, brisbane)
    with pytest.raises(ValueError, match="policy 'vectis' stage 'acknowledge': calendar 'brisbaen' is not defined"):
        validate_policies({"vectis": policy(stage("acknowledge", "1 day", calendar="brisbaen"))}, brisbane)
    with pytest.raises(ValueError, match="policy 'vectis': calendar 'sydney' is not defined"):
        validate_policies({"vectis": policy(stage("acknowledge", "1 day"), calendar="sydney")}, brisbane)


def test_validate_policies_wants_every_stage_met_by_a_milestone():
    with pytest.raises(ValueError, match="policy 'p' stage 'triage' needs met_by"):
        validate_policies({"p": policy(stage("triage", "1 day"))}, {})
    validate_policies({"p": policy(stage("triage", "1 day", met_by="assessed"))}, {})
    with pytest.raises(ValueError, match="starts at unknown event 'shipped'"):
        validate_policies({"p": policy(stage("disclose", "7 days", start="event:shipped"))}, {})
    with pytest.raises(ValueError, match="unknown milestone 'fixed'"):
        stage("fix", "1 day", met_by="fixed")
    assert stage("fix", "1 day").milestone == "released"
    with pytest.raises(ValueError, match="must be elapsed time"):
        policy(stage("fix", "1 day"), due_soon="1 business day")


def test_validate_policies_names_unknown_stages_even_when_built_unvalidated():
    unchecked = PolicyConfig.model_construct(
        auto_ack_counts=False,
        calendar="utc",
        stages=[stage("fix", "1 day").model_copy(update={"start": "stage:asess"})],
    )
    with pytest.raises(ValueError, match="policy 'p': stage 'fix' starts at unknown stage 'asess'"):
        validate_policies({"p": unchecked}, {})


def test_compute_rejects_an_unknown_calendar():
    with pytest.raises(ValueError, match="calendar 'nowhere' is not defined"):
        compute_deadlines(policy(stage("a", "1 day"), calendar="nowhere"), {}, received_at=utc(2026, 6, 1))


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

ALL_WEEK = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
PROPERTY_CALENDARS = [
    BRISBANE_AU,
    CalendarConfig(timezone="Europe/Berlin", holidays_country="DE", holidays_subdivision="BE"),
    BERLIN_NIGHTS,
    # DST changes at midnight here, so some days have no 00:00.
    CalendarConfig(timezone="America/Santiago", workdays=ALL_WEEK, working_hours="08:00-18:00"),
    CalendarConfig(timezone="Asia/Jerusalem", workdays=["sun", "mon", "tue", "wed", "thu"], holidays_country="IL"),
    UTC_CALENDAR,
]

calendars = st.sampled_from(PROPERTY_CALENDARS)
# Minute-aligned UTC instants over five years, all DST changes included.
starts = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2029, 12, 31)).map(
    lambda naive: naive.replace(second=0, microsecond=0, tzinfo=UTC)
)


@cache
def reference_holidays(country, subdivision, year):
    return frozenset(holidays.country_holidays(country, subdiv=subdivision, years=year)) if country else frozenset()


def reference_is_working_day(calendar, day):
    # Independent of CalendarConfig's own lookup: straight from the holidays package.
    return (
        ALL_WEEK[day.weekday()] in calendar.workdays
        and day not in reference_holidays(calendar.holidays_country, calendar.holidays_subdivision, day.year)
        and day not in calendar.extra_holidays
    )


def wall_hours(calendar):
    opening, closing = calendar.working_hours.split("-")
    return time.fromisoformat(opening), time.fromisoformat(closing)


@settings(deadline=None)
@given(calendar=calendars, start=starts, hours=st.integers(1, 80))
def test_business_hours_land_inside_working_hours(calendar, start, hours):
    due, _ = add_duration(start, f"{hours} business hours", calendar)
    local = due.astimezone(calendar.zone)
    opening, closing = wall_hours(calendar)
    assert reference_is_working_day(calendar, local.date())
    assert opening < local.time() <= closing  # exactly at closing is allowed, at opening impossible


@settings(deadline=None)
@given(calendar=calendars, start=starts, days=st.integers(1, 40))
def test_business_days_land_on_a_working_day_or_the_midnight_after_one(calendar, start, days):
    due, _ = add_duration(start, f"{days} business days", calendar)
    local = due.astimezone(calendar.zone)
    if reference_is_working_day(calendar, local.date()):
        return
    assert local.time() == time(0)
    assert reference_is_working_day(calendar, local.date() - timedelta(days=1))


@settings(deadline=None)
@given(
    calendar=calendars,
    start=starts,
    unit=st.sampled_from(["minutes", "hours", "days", "business hours", "business days"]),
    shorter=st.integers(0, 60),
    extra=st.integers(0, 60),
)
def test_deadlines_never_move_earlier_when_the_duration_grows(calendar, start, unit, shorter, extra):
    short_due, _ = add_duration(start, f"{shorter} {unit}", calendar)
    long_due, _ = add_duration(start, f"{shorter + extra} {unit}", calendar)
    assert start <= short_due <= long_due


offsets = st.integers(0, 20 * 24 * 60).map(lambda minutes: timedelta(minutes=minutes))
pause_lists = st.lists(
    st.tuples(offsets, st.none() | st.integers(0, 5 * 24 * 60).map(lambda minutes: timedelta(minutes=minutes))),
    max_size=4,
)

PROPERTY_POLICY = PolicyConfig(
    calendar="brisbane",
    auto_ack_counts=False,
    pause_while_waiting=True,
    stages=[
        StageConfig(name="acknowledge", duration="2 business days"),
        StageConfig(name="assess", duration="8 business hours"),
        StageConfig(name="fix", duration="90 days", by_severity={"critical": "30 days"}),
        StageConfig(name="disclose", duration="7 days", start="stage:assess"),
    ],
)


def as_pauses(received, relative):
    return [(received + begin, None if length is None else received + begin + length) for begin, length in relative]


@settings(deadline=None)
@given(received=starts, relative=pause_lists, extra=pause_lists, met_after=st.none() | offsets)
def test_adding_paused_time_never_makes_a_deadline_earlier(received, relative, extra, met_after):
    met = {} if met_after is None else {"assess": received + met_after}

    def deadlines(relative_pauses):
        return compute_deadlines(
            PROPERTY_POLICY,
            {"brisbane": BRISBANE_AU},
            received_at=received,
            met=met,
            pauses=as_pauses(received, relative_pauses),
        )

    unpaused, fewer, more = deadlines([]), deadlines(relative), deadlines(relative + extra)
    for baseline, with_some, with_more in zip(unpaused, fewer, more, strict=True):
        assert baseline.due is not None or baseline.start is None
        if with_some.due is not None:
            assert with_some.due >= baseline.due
        if with_some.due is None or with_more.due is None:
            continue
        assert with_more.due >= with_some.due


def reference_business_hours(start, hours, calendar):
    """Step minute by minute, counting minutes whose local wall time is inside working hours."""
    opening, closing = wall_hours(calendar)
    cursor, counted = start, 0
    while counted < hours * 60:
        local = cursor.astimezone(calendar.zone)
        if reference_is_working_day(calendar, local.date()) and opening <= local.time() < closing:
            counted += 1
        cursor += timedelta(minutes=1)
    return cursor


@settings(deadline=None, max_examples=60)
@given(calendar=calendars, start=starts, hours=st.integers(1, 12))
@example(calendar=BERLIN_NIGHTS, start=utc(2026, 3, 28, 22, 30), hours=8)  # Sun 29 Mar: 7-hour night
@example(calendar=BERLIN_NIGHTS, start=utc(2026, 10, 24, 21), hours=10)  # Sun 25 Oct: 9-hour night
@example(calendar=BRISBANE_AU, start=utc(2026, 12, 24, 6, 30), hours=3)  # Christmas Eve 16:30
def test_business_hours_match_a_minute_by_minute_count(calendar, start, hours):
    due, _ = add_duration(start, f"{hours} business hours", calendar)
    assert due == reference_business_hours(start, hours, calendar)


try:
    import numpy
except ImportError:  # a test-only extra; the rest of this module must still run
    numpy = None


def numpy_business_days(start, days, calendar):
    """The contract restated with numpy.busday_offset and the holidays package's dates."""
    local = start.astimezone(calendar.zone)
    weekmask = "".join("1" if day in calendar.workdays else "0" for day in ALL_WEEK)
    holiday_dates = sorted(
        {
            day
            for year in range(local.year, local.year + 3)
            for day in reference_holidays(calendar.holidays_country, calendar.holidays_subdivision, year)
        }
        | set(calendar.extra_holidays)
    )
    rules = {"weekmask": weekmask, "holidays": [numpy.datetime64(day) for day in holiday_dates]}
    start_day = numpy.datetime64(local.date())
    if numpy.is_busday(start_day, **rules) and local.time() != time(0):
        # Same wall-clock time on the N-th working day after the start day.
        end_day = numpy.busday_offset(start_day, days, roll="forward", **rules).astype(date)
        return datetime.combine(end_day, local.time(), calendar.zone)
    # The clock owns whole days from the first working day: it ends at the midnight after the N-th.
    last_day = numpy.busday_offset(start_day, days - 1, roll="forward", **rules).astype(date)
    return datetime.combine(last_day + timedelta(days=1), time(0), calendar.zone)


@pytest.mark.skipif(numpy is None, reason="numpy (test extra) is not installed")
@settings(deadline=None)
@given(calendar=calendars, start=starts, days=st.integers(1, 60))
@example(calendar=BRISBANE_AU, start=bne(2026, 12, 24, 10), days=5)
@example(calendar=BRISBANE_AU, start=bne(2027, 3, 26, 0), days=1)
# Same wall-clock time 35 days on is 02:00 on 25 Mar 2029, which Berlin skips: the instant is 01:00 UTC.
@example(calendar=BERLIN_EVERY_DAY, start=utc(2029, 2, 18, 1), days=35)
def test_business_days_match_numpy_busday_offset(calendar, start, days):
    # Compared as UTC instants: a local time in a DST gap compares unequal to every other zone's
    # time (PEP 495), even to the same instant.
    due, _ = add_duration(start, f"{days} business days", calendar)
    assert due.astimezone(UTC) == numpy_business_days(start, days, calendar).astimezone(UTC)


def test_the_country_codes_checked_are_those_the_holidays_package_supports():
    """holidays_country is checked against the package's registry (no country imported for it):
    the same set as list_supported_countries(), which imports them all."""
    assert holidays_country_codes() == set(holidays.list_supported_countries())
